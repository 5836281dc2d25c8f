"""What an infinite-width layer is: a map of covariances, a map of shapes and a finite module.

Every layer of :mod:`telescope.infinite` implements the three methods of :class:`Layer`:

* :meth:`Layer.apply` maps the :class:`~telescope.infinite._state.Covariances` of its input
  (NNGP, NTK and both batches' own covariances) to those of its output: the infinite-width
  limit of the layer, applied to one block of example pairs at a time;
* :meth:`Layer.geometry` maps the per-example shape of its input to that of its output (with
  ``features=None`` inside the kernel, where widths are infinite);
* :meth:`Layer.build` returns the finite ``nn.Module`` (NTK parametrization) for a concrete
  input shape.

One description thus gives both the finite network and its limit kernel, so the two cannot
drift apart. :class:`ElementwiseLayer` is the base of every nonlinearity: a subclass gives the
elementwise function and its two Gaussian expectations, nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from telescope.errors import UsageError
from telescope.infinite import _front
from telescope.infinite._state import Covariances, Geometry

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Layer", "ElementwiseLayer", "ElementwiseModule", "one_branch"]

State = Covariances | tuple  # a tuple of states between FanOut and FanInSum
Shape = Geometry | tuple


class Layer:
    """Base class of the infinite-width layers (see the module docstring)."""

    #: the input layout the layer needs (``"flat"``/``"channels_first"``/``"channels_last"``
    #: or a tuple of those it accepts), ``None`` for any
    requires_layout: ClassVar[tuple[str, ...] | None] = None

    def apply(self, state: State) -> State:
        raise NotImplementedError

    def geometry(self, shape: Shape) -> Shape:
        return shape

    def build(self, shape: Shape) -> nn.Module:
        raise NotImplementedError

    def first_layout(self) -> str | None:
        """The input layout the first layout-bound layer of this description fixes (``None``:
        none does). ``"channels_first"`` for a Conv, ``"channels_last"`` for Dense, LayerNorm
        and SelfAttention."""
        need = self.requires_layout
        if need is None:
            return None
        return "channels_first" if "channels_first" in need else "channels_last"

    def max_pair_entries(self, shape: Shape) -> int:
        """The largest number of covariance entries per pair of examples this layer holds for
        an input of ``shape`` (sizes the blocks of example pairs)."""
        return _pair_entries(shape)

    def kernel(self, x1: Tensor, x2: Tensor | None = None, *, layout: str | None = None,
               block_size: int | None = None, max_memory_gb: float = 1.0,
               dtype: torch.dtype = torch.float64, progress: bool = False) -> dict[str, Tensor]:
        """The infinite-width NNGP and NTK of this architecture between two batches.

        Parameters
        ----------
        x1, x2:
            Inputs ``[N1, ...]`` and ``[N2, ...]`` in PyTorch's layout: ``[N, F]``,
            ``[N, C, *spatial]`` for convolutions, ``[N, T, D]`` for Dense / LayerNorm /
            SelfAttention on sequences. ``x2=None`` (or ``x2 is x1``) computes the kernel of
            ``x1`` with itself, exactly symmetric, each off-diagonal block once.
        layout:
            ``"flat"``, ``"channels_first"`` or ``"channels_last"``; inferred from the first
            layer that needs one (Conv: channels first; Dense, LayerNorm, SelfAttention:
            channels last) when ``None``.
        block_size, max_memory_gb:
            Examples per block of pairs; chosen so a block's covariances (``[b, b]`` times
            the spatial or token pairs of the widest layer) fit ``max_memory_gb``.
        dtype:
            Computation and output dtype (float64 by default).
        progress:
            A progress bar over blocks.

        Returns
        -------
        dict
            ``{"nngp": K, "ntk": Theta}``, each ``[N1, N2]`` per output channel (with the
            pairs of spatial axes ``[N1, N2, s1, s1', ...]`` appended when the architecture
            does not end with a flat output) -- the numbers of neural-tangents' ``kernel_fn(x1,
            x2, ("nngp", "ntk"))`` for the same stax description (Novak et al. 2020).
        """
        return _front.kernel(self, x1, x2, layout=layout, block_size=block_size,
                             max_memory_gb=max_memory_gb, dtype=dtype, progress=progress)

    def module(self, in_shape: int | tuple[int, ...], *, layout: str | None = None) -> nn.Module:
        """The finite network of this description for examples of shape ``in_shape`` (no batch
        axis), in NTK parametrization with the widths as given: every weight and bias ``N(0,
        1)``, scaled by ``W_std / sqrt(fan_in)`` and ``b_std``. Its empirical NTK and output
        covariance over initializations converge to :meth:`kernel` as the widths grow. Built
        with torch's global RNG (seed it with ``torch.manual_seed``), in the default dtype."""
        return _front.module(self, in_shape, layout=layout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def one_branch(shape: Shape | State, layer: Layer) -> None:
    """Refuse a tuple of branches where a layer takes one."""
    if isinstance(shape, tuple):
        raise UsageError(
            f"{layer!r} takes one input but got {len(shape)} branches (after FanOut): apply it "
            "per branch with parallel(...) or merge the branches with FanInSum() first")


def _pair_entries(shape: Shape) -> int:
    if isinstance(shape, tuple):
        return sum(_pair_entries(s) for s in shape)
    n = 1
    for size in shape.spatial:
        n *= size * size
    return n


class ElementwiseModule(nn.Module):
    """The finite counterpart of an :class:`ElementwiseLayer`: ``y = fn(x)`` entrywise."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class ElementwiseLayer(Layer):
    """A nonlinearity ``phi`` applied entrywise.

    Subclasses implement :meth:`function` (the finite map) and :meth:`expectations`: for
    ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])``, elementwise over broadcastable tensors,

    ``E[phi(u) phi(v)]`` (the new NNGP) and ``E[phi'(u) phi'(v)]`` (the factor on the NTK),

    so that ``nngp' = E[phi phi]`` and ``ntk' = E[phi' phi'] * ntk`` (Jacot et al. 2018;
    Lee et al. 2019). :attr:`odd` declares ``phi(-u) = -phi(u)`` (it keeps a branch
    uncorrelated with the others, see ``Covariances.fresh``).
    """

    @property
    def odd(self) -> bool:
        """Whether ``phi(-u) = -phi(u)`` (override for odd nonlinearities)."""
        return False

    def function(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def expectations(self, k12: Tensor, k11: Tensor, k22: Tensor, *,
                     derivative: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(E[phi(u) phi(v)], E[phi'(u) phi'(v)])``; the second is ``None`` when
        ``derivative=False`` (a batch's own covariance needs no NTK factor)."""
        raise NotImplementedError

    def apply(self, state: State) -> State:
        one_branch(state, self)
        assert isinstance(state, Covariances)
        state = state.with_exact_diagonal()
        v1, v2 = state.diagonal_variances()
        nngp, dot = self.expectations(state.nngp, v1, v2)
        assert dot is not None
        row, col = state.own_variances(1)
        var1, _ = self.expectations(state.var1, row, col, derivative=False)
        if state.symmetric:
            var2 = var1
        else:
            row, col = state.own_variances(2)
            var2, _ = self.expectations(state.var2, row, col, derivative=False)
        return state.replace(nngp=nngp, ntk=dot * state.ntk, var1=var1, var2=var2,
                             gaussian=False, fresh=state.fresh and self.odd)

    def geometry(self, shape: Shape) -> Shape:
        one_branch(shape, self)
        return shape

    def build(self, shape: Shape) -> nn.Module:
        return ElementwiseModule(self.function, repr(self))
