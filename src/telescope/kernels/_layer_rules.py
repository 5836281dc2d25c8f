"""The built-in per-layer rules of the structured NTK: :class:`LinearRule` (``y = W a + b`` at
every token; also Hugging Face's ``Conv1D``), :class:`AffineRule` (``y = w * u(x) + b``: the norm
layers), :class:`EmbeddingRule`, :class:`ConvRule` (grouped convolutions included) and
:class:`BlockDiagonalRule` (a linear layer whose weight is block-diagonal), and the dense factor
the linear-like rules (and the attention rule's projections, ``_attention_rule.py``) are built
from, one per group for the grouped layers (:func:`_grouped_factors`).

The math, and which layer types get which rule, are in :mod:`telescope.kernels.rules`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from telescope.kernels._rule_protocol import GradFactor, RuleMismatch, TokenFactor

# --------------------------------------------------------------------------------------------
# Rules: module -> factors, from the captured inputs and output deltas of every call
# --------------------------------------------------------------------------------------------


def _dense_factor(prefix: str, a: Tensor, d: Tensor, weight: Tensor, bias: Tensor | None,
                  weight_scale: float = 1.0, bias_scale: float = 1.0, *,
                  weight_name: str = "weight", bias_name: str | None = "bias",
                  transposed: bool = False, rows: slice | None = None) -> TokenFactor:
    """Factor of ``y_s = weight_scale * W a_s + bias_scale * b`` with ``W`` viewed as ``[p, q]``
    (``weight`` itself is ``[p, ...]``, or ``[q, p]`` when ``transposed``: ``y = a @ weight``;
    with ``rows``, ``W`` and ``b`` are those rows of ``weight`` and ``bias``, e.g. one of the
    q/k/v blocks of a packed projection, and parameter-shaped gradients are zero elsewhere).

    ``a`` is ``[B, S, q]`` and ``d`` is ``[O, B, S, p]``; a constant column ``bias_scale`` is
    appended to ``a`` for the bias, so the bias gradient is the last column of ``sum_s d_s a_s^T``.
    """
    has_w = weight.requires_grad
    has_b = bias is not None and bias.requires_grad
    n_in = a.shape[-1]
    cols = [a * weight_scale] if has_w else []
    if has_b:
        cols.append(torch.full_like(a[..., :1], bias_scale))
    a_aug = torch.cat(cols, dim=-1)
    w_shape = tuple(weight.shape)
    b_shape = () if bias is None else tuple(bias.shape)
    w_key, b_key = f"{prefix}{weight_name}", f"{prefix}{bias_name}"

    def padded(g: Tensor, shape: tuple[int, ...]) -> Tensor:
        if rows is None:
            return g
        full = g.new_zeros(*g.shape[:2], *shape)
        full[:, :, rows] = g
        return full

    def to_params(g: Tensor) -> dict[str, Tensor]:
        o, b = g.shape[:2]
        out = {}
        if has_w:
            gw = g[..., :n_in]
            gw = gw.transpose(2, 3) if transposed else gw.reshape(o, b, -1, *w_shape[1:])
            out[w_key] = padded(gw, w_shape)
        if has_b:
            out[b_key] = padded(g[..., -1], b_shape)
        return out

    def from_params(theta: dict[str, Tensor]) -> Tensor:
        cols = []
        if has_w:
            w = theta[w_key] if rows is None else theta[w_key][rows]
            cols.append(w.T if transposed else w.reshape(w.shape[0], -1))
        if has_b:
            b = theta[b_key] if rows is None else theta[b_key][rows]
            cols.append(b.reshape(-1, 1))
        return torch.cat(cols, dim=1)

    return TokenFactor.create(d, a_aug, None, a_aug.shape[-1], to_params, from_params)


def _grouped_factors(prefix: str, a: Tensor, d: Tensor, weight: Tensor, bias: Tensor | None,
                     groups: int, weight_scale: float = 1.0, bias_scale: float = 1.0, *,
                     weight_name: str = "weight",
                     bias_name: str | None = "bias") -> list[TokenFactor]:
    """The factors of a grouped (block-diagonal) linear-like layer, one :func:`_dense_factor`
    per group.

    ``a [B, S, G q]`` and ``d [O, B, S, G p]`` split into ``G = groups`` consecutive blocks of
    their last axes; group ``g`` maps ``a_g = a[..., g q:(g+1) q]`` to the outputs ``g p:(g+1)
    p`` with the rows ``g p:(g+1) p`` of ``weight`` (``[G p, q, ...]``, the layout of a grouped
    ``nn.Conv``'s ``[out, in / groups, *kernel_size]``) and of ``bias``. Its parameters get no
    gradient from the other groups, so the kernel is a sum over groups of linear kernels,

        Theta(x, x') = sum_g sum_{s,s'} <a_{g,s}, a'_{g,s'}> <delta_{g,s}, delta'_{g,s'}>,

    which the engine contracts exactly, factor by factor (the cost is that of the groups'
    blocks, never of the dense ``[G p, G q]`` matrix). ``groups = 1`` is one dense factor.
    """
    if groups == 1:
        return [_dense_factor(prefix, a, d, weight, bias, weight_scale, bias_scale,
                              weight_name=weight_name, bias_name=bias_name)]
    p, q = weight.shape[0] // groups, a.shape[-1] // groups
    return [_dense_factor(prefix, a[..., g * q:(g + 1) * q], d[..., g * p:(g + 1) * p], weight,
                          bias, weight_scale, bias_scale, weight_name=weight_name,
                          bias_name=bias_name, rows=slice(g * p, (g + 1) * p))
            for g in range(groups)]


def _groups(module: nn.Module, value: int | str) -> int:
    """The number of groups: ``value`` itself, or the module's attribute of that name."""
    groups = getattr(module, value, None) if isinstance(value, str) else value
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise RuleMismatch(f"groups {groups!r} is not a positive int")
    return groups


def _tokens(ts: list[Tensor], width: int, lead: int = 1) -> Tensor:
    """Concatenate the calls' tensors as ``[..., tokens, width]`` (``lead`` leading dims kept)."""
    parts = [t.reshape(*t.shape[:lead], -1, width) for t in ts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=lead)


def _scale(module: nn.Module, value: float | str) -> float:
    return float(getattr(module, value)) if isinstance(value, str) else float(value)


@dataclass(frozen=True)
class LinearRule:
    """``y_s = weight_scale * W a_s + bias_scale * b`` at every token ``s`` of the input's
    leading axes (``a_s`` the last axis of the module's first positional input).

    ``weight``/``bias`` name the parameters (``bias=None``: none); ``transposed=True`` for a
    weight stored ``[in, out]`` (``y = a @ W + b``, Hugging Face's ``Conv1D``);
    ``weight_scale``/``bias_scale`` are numbers or names of the module's attributes.
    """

    weight: str = "weight"
    bias: str | None = "bias"
    transposed: bool = False
    weight_scale: float | str = 1.0
    bias_scale: float | str = 1.0
    name: str = "linear"

    def __call__(self, module: nn.Module, prefix: str, inputs: list[Tensor],
                 deltas: list[Tensor]) -> list:
        w = getattr(module, self.weight)
        b = getattr(module, self.bias) if self.bias else None
        if w.ndim != 2:
            raise RuleMismatch(f"{self.weight} is not a matrix")
        n_in, n_out = (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])
        if any(x.shape[-1] != n_in for x in inputs) or any(d.shape[-1] != n_out for d in deltas):
            raise RuleMismatch("the input's last axis does not match the weight")
        a, d = _tokens(inputs, n_in), _tokens(deltas, n_out, lead=2)
        return [_dense_factor(prefix, a, d, w, b, _scale(module, self.weight_scale),
                              _scale(module, self.bias_scale), weight_name=self.weight,
                              bias_name=self.bias, transposed=self.transposed)]


@dataclass(frozen=True)
class BlockDiagonalRule:
    """A linear layer whose weight is block-diagonal, ``G = groups`` blocks on the diagonal:
    at every token ``s`` of the input's leading axes,

        ``y_{s, g} = weight_scale * W_g a_{s, g} + bias_scale * b_g``,  ``g = 0 .. G-1``,

    where ``a_{s, g}`` is the ``g``-th of ``G`` equal consecutive blocks of the input's last
    axis (``in / G`` features) and ``y_{s, g}`` the ``g``-th block of the output's (``out / G``).
    The weight is stored as the blocks stacked, ``[out, in / G]`` (rows ``g out/G:(g+1) out/G``
    are ``W_g``; the layout of ``nn.Conv1d(in, out, 1, groups=G)``'s weight without its kernel
    axis), the bias as ``[out]``. The kernel is the sum over blocks of linear kernels,
    ``Theta = sum_g sum_{s,s'} <a_{s,g}, a'_{s',g}> <delta_{s,g}, delta'_{s',g}>`` (one factor
    per block): an ensemble of ``G`` networks run side by side through block-diagonal layers
    has the sum of their kernels (Littwin et al. 2020, "Collegial Ensembles").

    ``groups``, ``weight_scale``, ``bias_scale`` are numbers or names of the module's
    attributes; ``weight``/``bias`` name the parameters (``bias=None``: none). This is the
    declared rule (kind ``"block_diagonal"``) of :class:`telescope.models.BlockDiagonalLinear`.
    """

    weight: str = "weight"
    bias: str | None = "bias"
    groups: int | str = "groups"
    weight_scale: float | str = 1.0
    bias_scale: float | str = 1.0
    name: str = "block-diagonal linear"

    def __call__(self, module: nn.Module, prefix: str, inputs: list[Tensor],
                 deltas: list[Tensor]) -> list:
        w = getattr(module, self.weight, None)
        b = getattr(module, self.bias, None) if self.bias else None
        if not isinstance(w, Tensor) or w.ndim != 2:
            raise RuleMismatch(f"{self.weight} is not a [out, in / groups] matrix")
        groups = _groups(module, self.groups)
        n_out, n_in = w.shape[0], groups * w.shape[1]
        if n_out % groups:
            raise RuleMismatch(f"{n_out} outputs are not a multiple of groups {groups}")
        if any(x.shape[-1] != n_in for x in inputs) or any(d.shape[-1] != n_out for d in deltas):
            raise RuleMismatch("the input's last axis does not match the blocks of the weight")
        a, d = _tokens(inputs, n_in), _tokens(deltas, n_out, lead=2)
        return _grouped_factors(prefix, a, d, w, b, groups, _scale(module, self.weight_scale),
                                _scale(module, self.bias_scale), weight_name=self.weight,
                                bias_name=self.bias)


@dataclass(frozen=True)
class AffineRule:
    """``y = w * u(x) + b`` elementwise, ``u`` free of parameters (a normalization).

    ``u`` is read off the module's own forward with ``w = 1`` and ``b = 0`` (so its precision
    and casts are the module's); ``axis="last"``: ``w`` has the shape of the input's trailing
    axes (LayerNorm, RMSNorm); ``"channel"``: ``w`` is ``[C]`` on axis 1 of ``[N, C, ...]``
    (BatchNorm in eval mode, GroupNorm, InstanceNorm); ``"auto"``: whichever fits the input.
    """

    weight: str = "weight"
    bias: str | None = "bias"
    axis: Literal["last", "channel", "auto"] = "last"
    name: str = "affine"

    def __call__(self, module: nn.Module, prefix: str, inputs: list[Tensor],
                 deltas: list[Tensor]) -> list:
        w = getattr(module, self.weight, None)
        b = getattr(module, self.bias, None) if self.bias else None
        unit: dict[str, Tensor] = {}
        if isinstance(w, Tensor):
            unit[self.weight] = torch.ones_like(w)
        if self.bias and isinstance(b, Tensor):
            unit[self.bias] = torch.zeros_like(b)
        ref = w if isinstance(w, Tensor) else b
        if not isinstance(ref, Tensor):
            raise RuleMismatch(f"the module has no tensor {self.weight!r} or {self.bias!r}")
        shape = ref.shape
        grads, names = [], []
        for x, dl in zip(inputs, deltas, strict=True):
            with torch.no_grad():
                u = functional_call(module, unit, (x,), strict=False)
            if not isinstance(u, Tensor) or tuple(u.shape) != tuple(dl.shape[1:]):
                raise RuleMismatch("the module's output does not match its deltas")
            axis = self.axis
            if axis == "auto":
                axis = "last" if tuple(u.shape[-len(shape):]) == tuple(shape) else "channel"
            if axis == "last":
                if tuple(u.shape[-len(shape):]) != tuple(shape):
                    raise RuleMismatch("the weight is not the input's trailing shape")

                def reduce(t: Tensor) -> Tensor:  # [O, B, ...] -> [O, B, *shape]
                    return t.reshape(t.shape[0], t.shape[1], -1, *shape).sum(2)
            else:
                if u.ndim < 2 or u.shape[1] != shape.numel():
                    raise RuleMismatch("the weight is not the input's channel axis")

                def reduce(t: Tensor) -> Tensor:  # [O, B, C, ...] -> [O, B, C]
                    return t.reshape(t.shape[0], t.shape[1], t.shape[2], -1).sum(3)
            parts = []
            if isinstance(w, Tensor) and w.requires_grad:
                parts.append(reduce(dl * u.unsqueeze(0)).flatten(2))
            if isinstance(b, Tensor) and b.requires_grad:
                parts.append(reduce(dl).flatten(2))
            grads.append(torch.cat(parts, dim=2))
        if isinstance(w, Tensor) and w.requires_grad:
            names.append(f"{prefix}{self.weight}")
        if isinstance(b, Tensor) and b.requires_grad:
            names.append(f"{prefix}{self.bias}")
        # sum() of tensors is typed Tensor | Literal[0]; grads holds one tensor per call
        g = cast(Tensor, sum(grads)).transpose(0, 1)  # [B, O, P]
        numel = [int(shape.numel())] * len(names)

        def to_params(gr: Tensor) -> dict[str, Tensor]:
            return {n: c.reshape(*c.shape[:2], *shape)
                    for n, c in zip(names, gr.split(numel, dim=2), strict=True)}

        return [GradFactor(g, to_params, names)]


class EmbeddingRule:
    """An embedding is a linear layer on one-hot inputs: ``<a_s, a'_s'>`` becomes the indicator
    ``[idx_s == idx'_s']`` (the padding row receives no gradient)."""

    name = "embedding"

    def __call__(self, module: nn.Embedding, prefix: str, inputs: list[Tensor],
                 deltas: list[Tensor]) -> list:
        idx = torch.cat([x.reshape(x.shape[0], -1) for x in inputs], dim=1).long()
        if module.padding_idx is not None:  # the padding row receives no gradient
            idx = idx.masked_fill(idx == module.padding_idx, -1)
        d = _tokens(deltas, module.embedding_dim, lead=2)
        key = f"{prefix}weight"
        return [TokenFactor.create(d, None, idx, module.num_embeddings,
                                   lambda g: {key: g.transpose(2, 3)}, lambda t: t[key])]


@dataclass(frozen=True)
class ConvRule:
    """A convolution (any stride, padding, padding mode, dilation and groups) is a linear layer
    on its input patches (tokens = output positions):
    ``y_o = weight_scale * W patch_o(pad(x)) + bias_scale * b``.

    With ``groups = G > 1`` (the module's attribute ``groups``; none: 1) the weight
    ``[out, in / G, *kernel_size]`` is block-diagonal: output channels ``g out/G:(g+1) out/G``
    read only the patches of input channels ``g in/G:(g+1) in/G``, so the kernel is a sum of
    ``G`` convolution kernels, ``Theta = sum_g sum_{s,s'} <a_{g,s}, a'_{g,s'}> <delta_{g,s},
    delta'_{g,s'}>`` (one factor per group, :func:`_grouped_factors`).

    Works for ``nn.Conv1d``/``nn.Conv2d`` and for any layer exposing the same geometry:
    ``kernel_size`` (a tuple, one entry per spatial axis of ``[N, C, *spatial]``), ``stride``
    and ``dilation`` (ints or tuples; no ``dilation``: 1), ``weight`` ``[out, in, *kernel_size]``
    and ``bias`` ``[out]`` (names in ``weight``/``bias``; ``bias=None``: none). ``pad`` names a
    method of the module that returns its input padded (so a layer pads with its own code,
    e.g. :class:`telescope.models.NTKConv`'s XLA-style ``"same"``); without it the rule applies
    ``nn.Conv``'s ``_reversed_padding_repeated_twice`` and ``padding_mode``.
    ``weight_scale``/``bias_scale`` are numbers or names of the module's attributes (as in
    :class:`LinearRule`). 1-D and 2-D patches come from ``F.unfold``, 3-D ones from
    ``Tensor.unfold`` along each axis.
    """

    weight: str = "weight"
    bias: str | None = "bias"
    weight_scale: float | str = 1.0
    bias_scale: float | str = 1.0
    pad: str | None = None
    name: str = "convolution"

    def __call__(self, module: nn.Module, prefix: str, inputs: list[Tensor],
                 deltas: list[Tensor]) -> list:
        w = getattr(module, self.weight, None)
        b = getattr(module, self.bias, None) if self.bias else None
        if not isinstance(w, Tensor) or w.ndim < 3:
            raise RuleMismatch(f"{self.weight} is not a [out, in, *kernel_size] tensor")
        groups = _groups(module, "groups") if hasattr(module, "groups") else 1
        if w.shape[0] % groups:
            raise RuleMismatch(f"out_channels {w.shape[0]} is not a multiple of groups {groups}")
        n_dim = w.ndim - 2
        ks = _per_axis(getattr(module, "kernel_size", None), n_dim, "kernel_size")
        st = _per_axis(getattr(module, "stride", 1), n_dim, "stride")
        dil = _per_axis(getattr(module, "dilation", 1), n_dim, "dilation")
        if ks != tuple(w.shape[2:]):
            raise RuleMismatch(f"kernel_size {ks} is not the weight's {tuple(w.shape[2:])}")
        patches = []
        for x in inputs:
            if x.ndim != n_dim + 2:
                raise RuleMismatch(f"the input is not [N, C, {n_dim} spatial axes]")
            patches.append(_patches(self._padded(module, x), ks, st, dil))
        a = torch.cat(patches, dim=1)  # [B, L, C*k], channel-major: group g's columns in a row
        c_out = w.shape[0]
        if a.shape[-1] != groups * w[0].numel():
            raise RuleMismatch("the input's channels do not match the weight")
        if any(dl.ndim != n_dim + 3 or dl.shape[2] != c_out for dl in deltas):
            raise RuleMismatch("the output is not [N, out_channels, *spatial]")
        d = torch.cat([dl.reshape(*dl.shape[:2], c_out, -1).transpose(2, 3) for dl in deltas],
                      dim=2)
        if d.shape[2] != a.shape[1]:
            raise RuleMismatch("the output positions do not match the input patches")
        return _grouped_factors(prefix, a, d, w, b, groups, _scale(module, self.weight_scale),
                                _scale(module, self.bias_scale), weight_name=self.weight,
                                bias_name=self.bias)

    def _padded(self, module: nn.Module, x: Tensor) -> Tensor:
        if self.pad is not None:
            return getattr(module, self.pad)(x)
        pads = getattr(module, "_reversed_padding_repeated_twice", None)
        if pads is None:
            raise RuleMismatch("no padding spec: give the rule pad=<the module's padding method>")
        mode = "constant" if module.padding_mode == "zeros" else str(module.padding_mode)
        return F.pad(x, pads, mode=mode) if any(pads) else x


def _per_axis(value: object, n_dim: int, what: str) -> tuple[int, ...]:
    """``value`` (an int or a tuple) as one int per spatial axis."""
    out = (value,) * n_dim if isinstance(value, int) else tuple(value)  # type: ignore[arg-type]
    if len(out) != n_dim or not all(isinstance(v, int) and v > 0 for v in out):
        raise RuleMismatch(f"{what} {value!r} is not one positive int per spatial axis")
    return out


def _patches(x: Tensor, ks: tuple[int, ...], st: tuple[int, ...],
             dil: tuple[int, ...]) -> Tensor:
    """The patches of a padded ``x`` (``[B, C, *spatial]``) as ``[B, L, C * prod(ks)]``, the
    columns in the order of a ``[out, C, *ks]`` weight's flattening."""
    if len(ks) <= 2:
        if len(ks) == 1:
            x, ks, st, dil = x.unsqueeze(2), (1, *ks), (1, *st), (1, *dil)
        return F.unfold(x, ks, dilation=dil, stride=st).transpose(1, 2)
    n_dim = len(ks)
    for i in range(n_dim):  # each unfold appends the window axis: [B, C, *out, *ks]
        x = x.unfold(2 + i, (ks[i] - 1) * dil[i] + 1, st[i])
        if dil[i] > 1:
            x = x[..., ::dil[i]]
    order = [0, *range(2, 2 + n_dim), 1, *range(2 + n_dim, 2 + 2 * n_dim)]
    return x.permute(order).reshape(x.shape[0], -1, x.shape[1] * math.prod(ks))
