"""telescope: see how a neural network learns through its tangent kernels.

Public API (see README.md; docs/architecture.md maps the code):

- :func:`ntk` -- empirical neural tangent kernel of any ``torch.nn.Module``
- :func:`lowrank_ntk` -- matrix-free low-rank factorization ``K ~= U diag(s) U^T``
- :func:`infinite_ntk` -- infinite-width NNGP/NTK kernels of fully-connected nets
- :func:`kernel_regression` -- gradient-flow (NTK-theory) predictions with a kernel
- :mod:`telescope.kernels` -- kernel metrics (alignment, distance, spectrum, effective rank)
- :class:`Telescope` -- the telescoping model of a network in training, on probe points
- :class:`Smoother` -- smoother weights and effective parameters through training
- :func:`configure_threads` -- a sane torch thread count for shared machines
- :mod:`telescope.train` -- one training loop (:func:`telescope.train.fit`) with the lenses as
  callbacks
"""

from telescope._threads import configure_threads
from telescope.kernels import infinite_ntk, kernel_regression, lowrank_ntk, ntk
from telescope.lens import Smoother, Telescope

__all__ = ["ntk", "lowrank_ntk", "infinite_ntk", "kernel_regression", "Telescope", "Smoother",
           "configure_threads"]
__version__ = "0.1.0"
