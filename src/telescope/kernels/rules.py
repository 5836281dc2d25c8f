"""The per-layer rules of the structured NTK, and how to add one for your own layer type.

The NTK is a sum over parameters, so it splits into one kernel per layer. For a layer that maps
its input ``a`` to ``y = W a + b`` at every token ``s`` (a linear layer on ``[N, S, in]``, a
convolution on unfolded patches), the gradient of output ``o`` with respect to ``W`` is
``sum_s delta_{o,s} a_s^T`` where ``delta_{o,s} = d f_o / d y_s``. Hence

    Theta_W(x, x')[o, o'] = sum_{s, s'} <a_s, a'_{s'}> <delta_{o,s}, delta'_{o',s'}>

and the bias adds the same sum with ``<a_s, a'_s'>`` replaced by 1 (a constant 1 is appended to
``a``). An embedding is a linear layer on one-hot inputs, so ``<a_s, a'_s'>`` becomes the
indicator ``[idx_s == idx'_{s'}]``. An elementwise affine layer ``y = w * u(x) + b`` (LayerNorm,
RMSNorm, BatchNorm in eval mode, GroupNorm, ...; ``u`` free of parameters) has per-example
gradients ``sum delta * u`` and ``sum delta`` over the axes ``w`` is broadcast along.

A *rule* turns the inputs a module was called with and the output deltas of a block of examples
into *factors* (:class:`TokenFactor`, :class:`GradFactor`) that the structured engine contracts.
Rules are found by what a module is (``isinstance`` along its class's MRO, so subclasses inherit
their base's rule) and, for layer types of other libraries, by what it computes (Hugging Face's
``Conv1D`` ``y = x @ W + b``; norm layers with an elementwise weight). Every rule is checked
against autograd on the model before it is used, so a rule that does not fit (a subclass whose
forward computes something else, a weight also used outside the module) falls back to
per-example Jacobians, never to a wrong kernel.

Your own layer: ``register_rule(MyLinear, LinearRule(weight="w", bias="b"))`` for ``y = x @
W.T + b``-style layers (``transposed=True`` for ``y = x @ W + b``, ``weight_scale``/
``bias_scale`` for constant factors), ``register_rule(MyNorm, AffineRule(axis="last"))`` for
``y = w * u(x) + b``.

A layer type can also declare its rule itself, without importing telescope (this is how
:class:`telescope.models.NTKLinear` declares its own, so ``kernels`` imports no model): a class
attribute ``ntk_rule``, a mapping with the rule's ``kind`` (``"linear"``: :class:`LinearRule`,
``"affine"``: :class:`AffineRule`) and that rule's fields, e.g. ::

    class MyLinear(nn.Module):
        ntk_rule = {"kind": "linear", "weight": "w", "bias": "b", "weight_scale": "scale"}

(``ntk_rule`` may also be a rule itself, for a layer whose module imports telescope). Lookup
walks the class's MRO; at each class a rule given to :func:`register_rule` comes first, then an
``ntk_rule`` the class defines itself, so ``register_rule`` overrides a declared rule and
subclasses inherit both. A declared rule is checked against autograd like every other.

Reference: Novak, Sohl-Dickstein & Schoenholz (2022), "Fast Finite Width Neural Tangent Kernel"
(structured derivatives).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from telescope.errors import UsageError

__all__ = ["TokenFactor", "GradFactor", "LinearRule", "AffineRule", "EmbeddingRule", "ConvRule",
           "AttentionRule", "register_rule", "rule_for"]

# --------------------------------------------------------------------------------------------
# Factors: what a rule extracts from one block of examples
# --------------------------------------------------------------------------------------------


@dataclass
class TokenFactor:
    """``Theta[o,o'] = sum_{s,s'} k(s, s') <d[:,s,o], d'[:,s',o']>`` for a linear-like layer.

    ``a [B, S, q]`` gives ``k = <a_s, a'_s'>`` (dense); ``idx [B, S]`` gives
    ``k = [idx_s == idx'_s']`` (gather, ``q`` = vocabulary size, ``idx < 0`` = no gradient).
    ``d`` is ``[B, S, O, p]`` (contiguous; the layout every contraction below reads).
    ``to_params`` maps per-example gradients ``G [B, O, p, q]`` to the layer's parameters
    (each ``[B, O, *shape]``); ``from_params`` maps parameter-shaped tensors (a dict by name)
    to the layer's ``[p, q]`` matrix (dense) or ``[q, p]`` table (gather).
    """

    d: Tensor
    a: Tensor | None
    idx: Tensor | None
    q: int
    to_params: Callable[[Tensor], dict[str, Tensor]]
    from_params: Callable[[dict[str, Tensor]], Tensor]

    @classmethod
    def create(cls, d: Tensor, a: Tensor | None, idx: Tensor | None, q: int,
               to_params: Callable, from_params: Callable) -> TokenFactor:
        """From ``d [O, B, S, p]`` (as the backward pass gives it), dropping the tokens whose
        delta is zero for every output, example and unit (e.g. all but the last token above
        the last attention layer of a last-token readout)."""
        if d.shape[2] > 1:
            keep = d.any(dim=3).any(dim=1).any(dim=0)
            if not bool(keep.all()):
                keep[0] = keep[0] | ~keep.any()
                d = d[:, :, keep]
                a = None if a is None else a[:, keep]
                idx = None if idx is None else idx[:, keep]
        return cls(d.permute(1, 2, 0, 3).contiguous(), a, idx, q, to_params, from_params)

    def select(self, rows: slice) -> TokenFactor:
        return TokenFactor(self.d[rows], None if self.a is None else self.a[rows],
                           None if self.idx is None else self.idx[rows], self.q, self.to_params,
                           self.from_params)

    def dot(self, theta: dict[str, Tensor]) -> Tensor:
        """``<d f_o(x_b) / d theta_layer, theta>`` for every example and output: ``[B, O]``."""
        m = self.from_params(theta)
        if self.a is not None:
            y = self.a @ m.T  # [B, S, p]
        else:
            assert self.idx is not None  # a factor holds a or idx
            y = m[self.idx.clamp(min=0)] * (self.idx >= 0).unsqueeze(-1)
        return torch.einsum("bsop,bsp->bo", self.d, y)

    def grads(self) -> Tensor:
        """Per-example gradients ``G [B, O, p, q]`` (``sum_s d_s a_s^T``)."""
        if self.a is not None:
            return torch.einsum("bsop,bsq->bopq", self.d, self.a)
        assert self.idx is not None  # a factor holds a or idx
        b, s, o, p = self.d.shape
        g = self.d.new_zeros(b, o, p, self.q)
        index = self.idx.clamp(min=0).view(b, 1, 1, s).expand(b, o, p, s)
        valid = (self.idx >= 0).view(b, s, 1, 1)
        g.scatter_add_(3, index, (self.d * valid).permute(0, 2, 3, 1))
        return g


@dataclass
class GradFactor:
    """Per-example gradients ``g [B, O, P]`` of some parameters (LayerNorm affine, fallback)."""

    g: Tensor
    to_params: Callable[[Tensor], dict[str, Tensor]]
    names: list[str]

    def select(self, rows: slice) -> GradFactor:
        return GradFactor(self.g[rows], self.to_params, self.names)

    def dot(self, theta: dict[str, Tensor]) -> Tensor:
        return self.g @ torch.cat([theta[n].reshape(-1) for n in self.names])


# --------------------------------------------------------------------------------------------
# Rules: module -> factor, from the captured inputs and output deltas of every call
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


def _tokens(ts: list[Tensor], width: int, lead: int = 1) -> Tensor:
    """Concatenate the calls' tensors as ``[..., tokens, width]`` (``lead`` leading dims kept)."""
    parts = [t.reshape(*t.shape[:lead], -1, width) for t in ts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=lead)



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


class ConvRule:
    """A convolution (``nn.Conv1d``/``nn.Conv2d``, any stride, padding, padding mode and dilation;
    ``groups = 1``) is a linear layer on its input patches (tokens = output positions)."""

    name = "convolution"

    def __call__(self, module: nn.Conv1d | nn.Conv2d, prefix: str, inputs: list[Tensor],
                 deltas: list[Tensor]) -> list:
        two_d = isinstance(module, nn.Conv2d)
        pads = module._reversed_padding_repeated_twice
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        patches = []
        for x in inputs:
            x = F.pad(x, pads, mode=mode) if any(pads) else x
            if two_d:
                ks, dil, st = module.kernel_size, module.dilation, module.stride
            else:
                x = x.unsqueeze(2)
                ks, dil, st = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
            # [B, L, C*k]
            patches.append(F.unfold(x, ks, dilation=dil, stride=st).transpose(1, 2))
        c_out = module.out_channels
        d = torch.cat([dl.reshape(*dl.shape[:2], c_out, -1).transpose(2, 3) for dl in deltas],
                      dim=2)
        return [_dense_factor(prefix, torch.cat(patches, dim=1), d, module.weight, module.bias)]


# --------------------------------------------------------------------------------------------
# Rules: module -> factors, from the captured inputs and output deltas of every call
# --------------------------------------------------------------------------------------------


class RuleMismatch(Exception):
    """A rule does not fit the module it was applied to (e.g. the weight's shape does not match
    the input); the module falls back to per-example Jacobians."""


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




class AttentionRule:
    """``nn.MultiheadAttention``'s four projections as linear rules: ``q = x_q W_q^T + b_q``,
    ``k``, ``v`` likewise (the three blocks of ``in_proj_weight``) and ``o = a W_o^T + b_o``
    (``out_proj``, which the module's forward never calls as a module).

    A *composite* rule: during the structured passes the module's forward is replaced by
    :meth:`forward`, the same attention written out (``softmax(q k^T / sqrt(d) + masks) v``
    per head, masks merged as ``F.multi_head_attention_forward`` merges them), which hands the
    engine its four inputs and adds the engine's perturbations at the four outputs. It covers
    packed projections only (``kdim == vdim == embed_dim``) without ``add_bias_kv`` or
    ``add_zero_attn``; other configurations do not fit and use per-example Jacobians.
    """

    name = "linear (attention projections)"
    composite = True

    def parameters(self, module: nn.Module) -> list[str]:
        """The trainable parameter names the rule covers, relative to ``module``: all of the
        module's (a configuration the rule does not fit moves them all to the fallback)."""
        return [n for n, p in module.named_parameters() if p.requires_grad]

    def forward(self, module: nn.Module, point: Callable, query: Tensor, key: Tensor,
                value: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """The module's forward with ``point(i, input, output) -> output`` at the four
        projections (``i`` = 0, 1, 2 for q, k, v and 3 for the output projection)."""
        m = module
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise RuleMismatch("separate key/value sizes, add_bias_kv or add_zero_attn")
        if m.training and m.dropout > 0:
            raise RuleMismatch("attention dropout in train mode")
        if query.dim() != 3:
            raise RuleMismatch("unbatched inputs")
        if not m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, e = query.shape
        s, h = key.shape[1], m.num_heads
        d = e // h
        w_q, w_k, w_v = m.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (m.in_proj_bias.chunk(3) if m.in_proj_bias is not None
                         else (None, None, None))
        q = point(0, query, F.linear(query, w_q, b_q))
        k = point(1, key, F.linear(key, w_k, b_k))
        v = point(2, value, F.linear(value, w_v, b_v))
        q = q.view(n, length, h, d).transpose(1, 2)
        k = k.view(n, s, h, d).transpose(1, 2)
        v = v.view(n, s, h, d).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if attn_mask is not None:
            mask = _additive(attn_mask, scores.dtype)
            scores = scores + (mask.view(n, h, length, s) if mask.dim() == 3 else mask)
        elif is_causal:
            raise RuleMismatch("is_causal without attn_mask")
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores.dtype).view(n, 1, 1, s)
        prob = scores.softmax(dim=-1)
        att = (prob @ v).transpose(1, 2).reshape(n, length, e)
        o = point(3, att, F.linear(att, m.out_proj.weight, m.out_proj.bias))
        if not m.batch_first:
            o = o.transpose(0, 1)
        weights = (prob.mean(dim=1) if average_attn_weights else prob) if need_weights else None
        return o, weights

    def __call__(self, module: nn.MultiheadAttention, prefix: str, inputs: list,
                 deltas: list) -> list:
        """``inputs``/``deltas``: per call the four projections' inputs ``[B, L, E]`` and output
        deltas ``[O, B, L, E]``."""
        e = module.embed_dim
        factors = []
        for i in range(3):  # q, k, v: the three blocks of in_proj_weight
            rows = slice(i * e, (i + 1) * e)
            a = _tokens([c[i] for c in inputs], e)
            d = _tokens([c[i] for c in deltas], e, lead=2)
            factors.append(_dense_factor(prefix, a, d, module.in_proj_weight,
                                         module.in_proj_bias, weight_name="in_proj_weight",
                                         bias_name="in_proj_bias", rows=rows))
        a = _tokens([c[3] for c in inputs], e)
        d = _tokens([c[3] for c in deltas], e, lead=2)
        factors.append(_dense_factor(prefix, a, d, module.out_proj.weight, module.out_proj.bias,
                                     weight_name="out_proj.weight", bias_name="out_proj.bias"))
        return factors


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (``True``: not attended) as ``-inf``/0, a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


# The module is typed Any: a rule is called with the modules of the type it is registered for
# (EmbeddingRule takes an nn.Embedding), which a dict[type, Rule] cannot tie to each key.
Rule = Callable[[Any, str, list, list], list]
"""``rule(module, prefix, inputs, deltas) -> factors``: ``inputs`` are the module's first
positional argument at each call (``[B, ...]``), ``deltas`` the derivatives of the selected
outputs with respect to its output at each call (``[O, B, ...]``); parameter names in the
factors are ``prefix + name``. A rule may raise :class:`RuleMismatch` when it does not fit."""


class CompositeRule(Protocol):
    """A :data:`Rule` that replaces its module's forward during the structured passes to reach
    inside it (:class:`AttentionRule`; ``composite = True``): it names the parameters it covers
    and gives that forward."""

    composite: bool

    def __call__(self, module: Any, prefix: str, inputs: list, deltas: list) -> list: ...

    def parameters(self, module: Any) -> list[str]: ...

    def forward(self, module: Any, point: Callable, *args: Any, **kwargs: Any) -> Any: ...

_REGISTRY: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Embedding: EmbeddingRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.LayerNorm: AffineRule(axis="last", name="affine (norm)"),
    nn.RMSNorm: AffineRule(axis="last", bias=None, name="affine (norm)"),
    nn.GroupNorm: AffineRule(axis="channel", name="affine (norm)"),
    nn.modules.batchnorm._NormBase: AffineRule(axis="channel", name="affine (norm)"),
    nn.MultiheadAttention: AttentionRule(),
}
_VERSION = [0]


def register_rule(module_type: type, rule: Rule) -> None:
    """Use ``rule`` (a :class:`LinearRule`, :class:`AffineRule`, or any callable with the
    :data:`Rule` signature) for ``module_type`` and its subclasses. It is checked against
    autograd on every model before use, like the built-in rules; plans made before are
    rebuilt."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise UsageError(f"module_type must be a torch.nn.Module subclass, got {module_type!r}")
    if not callable(rule):
        raise UsageError(f"rule must be a LinearRule, AffineRule or a callable, got {rule!r}")
    _REGISTRY[module_type] = rule
    _VERSION[0] += 1


def rules_version() -> int:
    """Increases with every :func:`register_rule` (plans depend on the registry)."""
    return _VERSION[0]


def rule_for(module: nn.Module) -> tuple[Rule | None, str]:
    """The rule for ``module`` and its name, or ``(None, why not)``."""
    if hasattr(module, "parametrizations"):
        return None, "its weight is parametrized (torch.nn.utils.parametrize): no rule"
    rule = next((r for r in map(_rule_of_class, type(module).__mro__) if r is not None), None)
    if rule is None:
        rule = _by_computation(module)
    if rule is None:
        return None, f"no rule for {type(module).__name__}"
    if isinstance(rule, ConvRule) and module.groups != 1:
        return None, f"grouped convolution (groups={module.groups}): no rule yet"
    return rule, getattr(rule, "name", type(rule).__name__)


_DECLARED_KINDS: dict[str, type] = {"linear": LinearRule, "affine": AffineRule}
"""The rule types a layer's ``ntk_rule = {"kind": ..., **fields}`` may name."""


def _rule_of_class(cls: type) -> Rule | None:
    """The rule registered for ``cls`` itself, else the one ``cls`` itself declares
    (``ntk_rule``, see the module docstring), else ``None`` (inherited ones are not looked at:
    :func:`rule_for` walks the MRO)."""
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    spec = cls.__dict__.get("ntk_rule")
    if spec is None:
        return None
    if callable(spec):
        return spec
    if not isinstance(spec, Mapping) or spec.get("kind") not in _DECLARED_KINDS:
        raise UsageError(f"{cls.__qualname__}.ntk_rule must be a rule or a mapping with 'kind' "
                         f"one of {sorted(_DECLARED_KINDS)} and that rule's fields, got {spec!r}")
    fields = {k: v for k, v in spec.items() if k != "kind"}
    try:
        return _DECLARED_KINDS[spec["kind"]](**fields)
    except TypeError as err:
        raise UsageError(f"{cls.__qualname__}.ntk_rule: {err}") from None


def _by_computation(module: nn.Module) -> Rule | None:
    """Rules for other libraries' layers, recognized by what they hold (verified like all)."""
    name = type(module).__name__
    w = module._parameters.get("weight")
    if name == "Conv1D" and isinstance(w, Tensor) and w.ndim == 2 and hasattr(module, "nf"):
        return LinearRule(transposed=True, name="linear (Conv1D)")
    if "Norm" in name and isinstance(w, Tensor) and w.ndim == 1 and set(module._parameters) <= {
            "weight", "bias"}:
        return AffineRule(axis="auto", name="affine (norm)")
    return None
