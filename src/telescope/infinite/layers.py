"""The linear, normalization and pooling layers of :mod:`telescope.infinite`.

Each layer is a finite ``nn.Module`` in NTK parametrization and its infinite-width map of
covariances (``_state.Covariances``: NNGP, NTK and each batch's own covariance, per pair of
positions). With ``W, b ~ N(0, 1)`` and the fan-in ``n`` of the layer:

* :class:`Dense` ``y = (W_std / sqrt(n)) W x + b_std b`` on the last axis:
  ``K' = W_std^2 K + b_std^2``, ``Theta' = K' + W_std^2 Theta`` (Jacot et al. 2018; Lee et al.
  2019), at every pair of tokens.
* :class:`Conv` (in ``conv.py``) and :class:`SelfAttention` (in ``attention.py``).
* :class:`LayerNorm` over channels: ``K'(x, x')[s, s'] = K[s, s'] / sqrt((eps + K(x, x)[s, s])
  (eps + K(x', x')[s', s']))``, the NTK divided by the same (in the limit the channel mean of a
  Gaussian layer is 0 and its channel variance is the diagonal of ``K``).
* :class:`GlobalAvgPool`: the mean over all pairs of positions; :class:`Flatten`: the mean over
  the diagonal pairs (``s = s'``), i.e. a following Dense of fan-in ``C * prod(spatial)``.
* :class:`Identity`.

These are the numbers of neural-tangents' ``stax`` layers of the same names (Novak et al.
2020) for PyTorch's layouts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from telescope.errors import UsageError, check_positive_int, check_std
from telescope.infinite._layer import Layer, Shape, State, one_branch
from telescope.infinite._state import Covariances, Geometry
from telescope.models.mlp import NTKLinear

__all__ = ["Dense", "LayerNorm", "GlobalAvgPool", "Flatten", "Identity", "affine"]


def affine(state: Covariances, w_var: float, b_var: float) -> Covariances:
    """A random linear layer applied to covariances already mixed by the layer's weight
    pattern: ``K' = w_var K + b_var``, ``Theta' = K' + w_var Theta``, own covariances like
    ``K``. The output is Gaussian and fresh (odd in the layer's own weights)."""
    nngp = w_var * state.nngp + b_var
    var1 = w_var * state.var1 + b_var
    var2 = var1 if state.symmetric else w_var * state.var2 + b_var
    return state.replace(nngp=nngp, ntk=nngp + w_var * state.ntk, var1=var1, var2=var2,
                         gaussian=True, fresh=True)


class Dense(Layer):
    """Fully-connected layer on the last axis (``nn.Linear``-like) in NTK parametrization:
    ``y = (W_std / sqrt(n_in)) W x + b_std b`` with ``W, b ~ N(0, 1)``; on ``[N, F]`` or at every
    token of ``[N, T, D]``. Infinite width: ``K' = W_std^2 K + b_std^2``,
    ``Theta' = K' + W_std^2 Theta`` (neural-tangents' ``stax.Dense``)."""

    requires_layout = ("flat", "channels_last")

    def __init__(self, out_features: int, W_std: float = 1.0, b_std: float = 0.0) -> None:
        self.out_features = check_positive_int(out_features, "out_features")
        self.W_std = check_std(W_std, "W_std")
        self.b_std = check_std(b_std, "b_std")

    def __repr__(self) -> str:
        return f"Dense({self.out_features}, W_std={self.W_std}, b_std={self.b_std})"

    def geometry(self, shape: Shape) -> Shape:
        one_branch(shape, self)
        assert isinstance(shape, Geometry)
        _needs_last_axis(shape, self)
        return Geometry(shape.layout, shape.spatial,
                        None if shape.features is None else self.out_features)

    def apply(self, state: State) -> State:
        one_branch(state, self)
        assert isinstance(state, Covariances)
        return affine(state, self.W_std**2, self.b_std**2)

    def build(self, shape: Shape) -> nn.Module:
        assert isinstance(shape, Geometry) and shape.features is not None
        return NTKLinear(shape.features, self.out_features, weight_std=self.W_std,
                         bias_std=self.b_std, bias=self.b_std > 0)


def _needs_last_axis(shape: Geometry, layer: Layer) -> None:
    if shape.layout == "channels_first":
        raise UsageError(
            f"{layer!r} acts on the last axis, but its input is [N, C, *spatial] (after a Conv "
            "or a channels-first input): reduce the spatial axes first with GlobalAvgPool() or "
            "Flatten(), or use Conv with a kernel_size of ones")


class _ChannelLayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps)`` over the channel axis, no learned scale or bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(self.dim, keepdim=True)
        var = x.var(self.dim, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


class LayerNorm(Layer):
    """Layer normalization over the channels (the last axis, or axis 1 of ``[N, C,
    *spatial]``), without learned scale or bias: ``y = (x - mean) / sqrt(var + eps)``.

    Infinite width (the input must be Gaussian: right after Dense/Conv/SelfAttention or a sum
    of their outputs): ``K'[s, s'] = K[s, s'] / sqrt((eps + K(x, x)[s, s]) (eps + K(x', x')[s',
    s']))`` and the NTK divided by the same (neural-tangents' ``stax.LayerNorm``, Xiong et al.
    2020 for the transformer's placement)."""

    def __init__(self, eps: float = 1e-12) -> None:
        eps = check_std(eps, "eps")
        self.eps = eps

    def __repr__(self) -> str:
        return f"LayerNorm(eps={self.eps})"

    def geometry(self, shape: Shape) -> Shape:
        one_branch(shape, self)
        return shape

    def apply(self, state: State) -> State:
        one_branch(state, self)
        assert isinstance(state, Covariances)
        if not state.gaussian:
            raise UsageError(
                "LayerNorm's infinite-width kernel needs Gaussian inputs: put it right after "
                "Dense, Conv or SelfAttention (or a FanInSum of such branches), not after a "
                "nonlinearity")
        v1, v2 = state.diagonal_variances()
        scale = torch.rsqrt((self.eps + v1) * (self.eps + v2))
        row, col = state.own_variances(1)
        var1 = state.var1 * torch.rsqrt((self.eps + row) * (self.eps + col))
        if state.symmetric:
            var2 = var1
        else:
            row, col = state.own_variances(2)
            var2 = state.var2 * torch.rsqrt((self.eps + row) * (self.eps + col))
        return state.replace(nngp=state.nngp * scale, ntk=state.ntk * scale, var1=var1,
                             var2=var2)

    def build(self, shape: Shape) -> nn.Module:
        assert isinstance(shape, Geometry)
        return _ChannelLayerNorm(1 if shape.layout == "channels_first" else -1, self.eps)


class _MeanOver(nn.Module):
    """The mean over the spatial (or token) axes."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class GlobalAvgPool(Layer):
    """The mean over the spatial axes of ``[N, C, *spatial]`` (or the tokens of ``[N, T,
    D]``): ``[N, C]``. Infinite width: the mean of the covariances over all pairs of positions
    (neural-tangents' ``stax.GlobalAvgPool``)."""

    def geometry(self, shape: Shape) -> Shape:
        one_branch(shape, self)
        assert isinstance(shape, Geometry)
        if shape.layout == "flat":
            raise UsageError("GlobalAvgPool() needs spatial or token axes, but its input is "
                             "already flat [N, F]")
        return Geometry("flat", (), shape.features)

    def apply(self, state: State) -> State:
        one_branch(state, self)
        assert isinstance(state, Covariances)
        var1 = state.var1.mean(tuple(range(1, state.var1.dim())))
        return state.replace(
            nngp=state.nngp.mean(tuple(range(2, state.nngp.dim()))),
            ntk=state.ntk.mean(tuple(range(2, state.ntk.dim()))),
            var1=var1,
            var2=var1 if state.symmetric else state.var2.mean(tuple(range(1, state.var2.dim()))),
            geometry=Geometry("flat", ()))

    def build(self, shape: Shape) -> nn.Module:
        assert isinstance(shape, Geometry)
        k = len(shape.spatial)
        dims = tuple(range(2, 2 + k)) if shape.layout == "channels_first" else tuple(
            range(1, 1 + k))
        return _MeanOver(dims)


def _diagonal_mean(t: Tensor, batch_ndim: int) -> Tensor:
    while t.dim() > batch_ndim:
        t = t.diagonal(dim1=-2, dim2=-1).mean(-1)
    return t


class Flatten(Layer):
    """Flatten every axis but the batch (``nn.Flatten(1)``). Infinite width: the mean of the
    covariances over the diagonal pairs of positions ``s = s'`` (a Dense layer after it has fan
    in ``C * prod(spatial)``; neural-tangents' ``stax.Flatten``)."""

    def geometry(self, shape: Shape) -> Shape:
        one_branch(shape, self)
        assert isinstance(shape, Geometry)
        if shape.features is None:
            return Geometry("flat", ())
        return Geometry("flat", (), shape.features * math.prod(shape.spatial))

    def apply(self, state: State) -> State:
        one_branch(state, self)
        assert isinstance(state, Covariances)
        var1 = _diagonal_mean(state.var1, 1)
        return state.replace(nngp=_diagonal_mean(state.nngp, 2), ntk=_diagonal_mean(state.ntk, 2),
                             var1=var1,
                             var2=var1 if state.symmetric else _diagonal_mean(state.var2, 1),
                             geometry=Geometry("flat", ()))

    def build(self, shape: Shape) -> nn.Module:
        return nn.Flatten(1)


class Identity(Layer):
    """``y = x`` (a residual branch's skip connection)."""

    def geometry(self, shape: Shape) -> Shape:
        return shape

    def apply(self, state: State) -> State:
        return state

    def build(self, shape: Shape) -> nn.Module:
        return nn.Identity()
