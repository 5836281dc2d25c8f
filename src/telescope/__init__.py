"""telescope: see how a neural network learns through its tangent kernels.

Public API (see README.md; docs/architecture.md maps the code):

- :func:`ntk` -- empirical neural tangent kernel of any ``torch.nn.Module``
- :func:`lowrank_ntk` -- matrix-free low-rank factorization ``K ~= U diag(s) U^T``
- :mod:`telescope.infinite` -- infinite-width NNGP/NTK of architectures described layer by
  layer (dense, conv, attention, LayerNorm, residual), with their finite networks;
  :func:`infinite_ntk` is its fully-connected shortcut and :func:`monte_carlo_kernel` averages
  finite networks over initializations
- :func:`kernel_regression` -- gradient-flow (NTK-theory) predictions with a kernel
- :mod:`telescope.kernels` -- kernel metrics (alignment, distance, spectrum, effective rank)
- :class:`Telescope` -- the telescoping model of a network in training, on probe points
- :class:`Smoother` -- smoother weights and effective parameters through training
- :func:`configure_threads` -- a sane torch thread count for shared machines
- :mod:`telescope.train` -- one training loop (:func:`telescope.train.fit`) with the lenses as
  callbacks
"""

from telescope._threads import configure_threads
from telescope.infinite import infinite_ntk, monte_carlo_kernel
from telescope.kernels import kernel_regression, lowrank_ntk, ntk
from telescope.lens import Smoother, Telescope

__all__ = ["ntk", "lowrank_ntk", "infinite_ntk", "monte_carlo_kernel", "kernel_regression",
           "Telescope", "Smoother", "configure_threads"]
__version__ = "0.1.0"
