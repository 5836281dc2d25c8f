"""Training-time instruments attached to an optimizer (the telescoping lens).

- :class:`Telescope` -- the telescoping model ``f~_T(x) = f_0(x) + sum_t grad f_{t-1}(x)^T
  (theta_t - theta_{t-1})`` of Jeffares, Curth & van der Schaar (NeurIPS 2024), the model
  linearized around the initialization, and their errors against the actual network.
- :class:`Smoother` -- the model as a linear smoother of the training labels,
  ``f~(x) = S(x) vec(Y) + c(x)``, and its effective parameters.
"""

from telescope.lens.smoother import Smoother
from telescope.lens.telescope import Telescope

__all__ = ["Telescope", "Smoother"]
