"""The state that flows through an infinite-width architecture: covariances of a pair of batches.

In the infinite-width limit every channel of a layer's output is an independent copy of one
Gaussian process (for the NNGP) and the NTK is the same for every channel, so the channel axis
disappears and what remains is, for every pair of examples ``(x, x')`` of the two batches, the
covariance between every position of ``x`` and every position of ``x'``:

* ``nngp[i, j, s1, s1', s2, s2', ...] = E[h(x_i)[s] h(x'_j)[s']]`` (per channel),
* ``ntk[i, j, s1, s1', ...]``: the NTK between the same outputs,
* ``var1[i, s1, s1', ...]``: the covariance of ``x_i`` with itself (``E[h(x_i)[s] h(x_i)[s']]``),
  which the nonlinearities and normalizations need, and ``var2`` for the second batch.

The pair axes of each spatial (or token) dimension are interleaved, ``(s1, s1', s2, s2', ...)``,
as in neural-tangents' ``diagonal_spatial=False`` layout (Novak et al. 2020). A fully-connected
state has no pair axes: ``nngp`` is ``[n1, n2]`` and ``var1`` is ``[n1]``.

``layout`` says where the channel axis of the finite network sits: ``"flat"`` (``[N, F]``),
``"channels_first"`` (``[N, C, *spatial]``, PyTorch's convolution layout) or ``"channels_last"``
(``[N, T, D]``, PyTorch's ``nn.Linear`` / ``batch_first`` attention layout); ``spatial`` holds the
sizes of the spatial (or token) axes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Covariances", "Geometry", "LAYOUTS"]

LAYOUTS = ("flat", "channels_first", "channels_last")


@dataclass(frozen=True)
class Geometry:
    """The per-example shape of a layer's output, without the batch axis.

    ``features`` is the channel count of the finite network (``None`` while computing the
    infinite-width kernel, where it is infinite).
    """

    layout: str
    spatial: tuple[int, ...]
    features: int | None = None


@dataclass(frozen=True)
class Covariances:
    """Covariances of a layer's outputs on a pair of batches (see the module docstring).

    ``symmetric``: the two batches are the same tensor (``var2 is var1`` and ``nngp``/``ntk``
    are symmetric under swapping ``(i, s)`` with ``(j, s')``). ``gaussian``: the outputs are
    jointly Gaussian (true after a random linear layer; LayerNorm and attention need it).
    ``fresh``: the outputs are an odd function of the last random linear layer's weights, hence
    uncorrelated with every other branch (a sum of branches is exact only if all but one are
    fresh).
    """

    nngp: Tensor
    ntk: Tensor
    var1: Tensor
    var2: Tensor
    geometry: Geometry
    symmetric: bool = False
    gaussian: bool = True
    fresh: bool = False

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.geometry.spatial

    @property
    def layout(self) -> str:
        return self.geometry.layout

    def replace(self, **changes: object) -> Covariances:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def with_exact_diagonal(self) -> Covariances:
        """For a batch with itself: ``nngp[i, i]`` set to ``var1[i]`` exactly. The two hold the
        same numbers but may round differently (different einsum/matmul shapes), and the
        nonlinearities' angle ``atan2(sqrt(k11 k22 - k12^2), k12)`` turns a 1e-16 difference
        on the diagonal into a 1e-8 one; a nonlinearity calls this first."""
        if not self.symmetric:
            return self
        # in place (no copy of a large block) unless autograd records the computation; a
        # branch sharing this tensor gets the same, equal-in-exact-arithmetic values
        nngp = self.nngp.clone() if self.nngp.requires_grad else self.nngp
        torch.diagonal(nngp, 0, 0, 1).copy_(self.var1.movedim(0, -1))
        return self if nngp is self.nngp else self.replace(nngp=nngp)

    def diagonal_variances(self) -> tuple[Tensor, Tensor]:
        """Per-position variances of both batches, shaped to broadcast against ``nngp``.

        Returns ``(v1, v2)`` with ``v1[i, 0, s1, 0, s2, 0, ...] = var1[i, s1, s1, s2, s2, ...]``
        and ``v2[0, j, 0, s1', 0, s2', ...] = var2[j, s1', s1', ...]``.
        """
        return (_diagonal(self.var1, first=True, two_batches=True),
                _diagonal(self.var2, first=False, two_batches=True))

    def own_variances(self, which: int) -> tuple[Tensor, Tensor]:
        """Per-position variances of batch ``which`` (1 or 2), shaped to broadcast against that
        batch's own covariance ``var1``/``var2``: ``(row, col)`` with ``row[i, s1, 0, ...]``
        and ``col[i, 0, s1', ...]``."""
        var = self.var1 if which == 1 else self.var2
        return (_diagonal(var, first=True, two_batches=False),
                _diagonal(var, first=False, two_batches=False))


def _diagonal(var: Tensor, *, first: bool, two_batches: bool) -> Tensor:
    """The diagonal of every pair axis of ``var`` (``[n, s1, s1', ...]``), broadcastable.

    ``first``: the variances sit on the first axis of each pair (``x``'s positions) and on the
    first batch axis, else on the second ones. ``two_batches``: insert the other batch's axis.
    """
    d = var
    k = (var.dim() - 1) // 2
    for _ in range(k):
        # the leading remaining pair is at axes (1, 2); move its diagonal to the end
        d = d.diagonal(dim1=1, dim2=2)
    # d is [n, s1, s2, ...]; put a singleton next to every position axis
    shape: list[int] = [d.shape[0]]
    for size in d.shape[1:]:
        shape += [size, 1] if first else [1, size]
    d = d.reshape(shape)
    if two_batches:
        d = d.unsqueeze(1) if first else d.unsqueeze(0)
    return d
