"""The composite rule of ``nn.MultiheadAttention`` (:class:`AttentionRule`): during the
structured passes the module's forward is replaced by the same attention written out, which hands
the engine the inputs of the four projections (q, k, v and the output projection) and adds the
engine's perturbations at their outputs; each projection is then a linear layer's dense factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from telescope.kernels._layer_rules import _dense_factor, _tokens
from telescope.kernels._rule_protocol import RuleMismatch


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
