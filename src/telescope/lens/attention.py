"""Attention entropy per layer and head (Zhai et al., 2023, "Stabilizing Transformer Training by
Preventing Attention Entropy Collapse").

For attention probabilities ``A[n, h, i, j]`` (example ``n``, head ``h``, query ``i``, key ``j``,
``sum_j A_ij = 1``) the entropy of query ``i`` is

    H_i = -sum_j A_ij log A_ij        (nats, ``0 log 0 = 0``),

at most ``log m_i`` with ``m_i`` the number of keys query ``i`` may attend to (``m_i = S`` in an
encoder, ``m_i = i + 1`` with a causal mask, ``i`` counted from 0), reached by uniform attention.
Zhai et al. track the mean of ``H_i`` over examples and queries per head; a collapse towards 0
(all attention on one key) accompanies unstable training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from telescope.errors import UsageError

__all__ = ["attention_entropy"]


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "record") and hasattr(m, "last_attention")]


def _allowed_counts(module: nn.Module, s_q: int, s_k: int, device: torch.device) -> Tensor:
    """``m_i``: keys each query may attend to (``[S_q]``): ``i + 1`` if causal, else ``S_k``."""
    if bool(getattr(module, "causal", False)):
        return torch.arange(1, s_q + 1, device=device, dtype=torch.float64).clamp(max=s_k)
    return torch.full((s_q,), float(s_k), device=device, dtype=torch.float64)


def attention_entropy(model: nn.Module, x: Tensor) -> list[dict]:
    """Mean attention entropy of every head of every attention module of ``model`` on ``x``.

    An attention module is any submodule with the attributes ``record`` (bool) and
    ``last_attention``, which must hold the attention probabilities ``[N, heads, S_q, S_k]`` of
    its last forward pass while ``record`` is ``True`` (the protocol of
    :class:`telescope.models.transformer.SelfAttention`). A causal module is recognized by
    ``causal = True`` (query ``i`` sees keys ``0..i``); any other is treated as an encoder.

    ``model(x)`` runs once in eval mode under ``torch.no_grad()``; afterwards every module's
    ``record`` flag and train/eval mode are restored and ``last_attention`` is reset to
    ``None``. A module that was not called during the forward pass gives no rows. If a module
    is called several times, its last call is measured.

    Returns
    -------
    list of dict
        One row per (module, head), in module order:
        ``{"layer": qualified module name, "head": h,
        "entropy": mean_{n,i} H_i with H_i = -sum_j A_ij log A_ij (nats),
        "max_entropy": mean_i log m_i, "normalized": entropy / max_entropy}``
        (``normalized`` is NaN when ``max_entropy`` is 0, i.e. a single key).
    """
    modules = _attention_modules(model)
    if not modules:
        raise UsageError(
            "attention_entropy: the model has no attention module. It looks for submodules with "
            "a bool attribute `record` and an attribute `last_attention` that the module sets to "
            "its attention probabilities [N, heads, S_q, S_k] during forward while record=True "
            "(as telescope.models.transformer.SelfAttention does).")
    modes = [(m, m.training) for m in model.modules()]
    flags = [(m, m.record) for _, m in modules]
    rows: list[dict] = []
    try:
        for _, m in modules:
            m.last_attention = None
            m.record = True
        model.eval()
        with torch.no_grad():
            model(x)
        for name, m in modules:
            attn = m.last_attention
            if attn is None:
                continue
            if not isinstance(attn, Tensor) or attn.dim() != 4:
                raise UsageError(f"attention_entropy: {name or type(m).__name__}.last_attention "
                                 f"must be a tensor [N, heads, S_q, S_k], got "
                                 f"{getattr(attn, 'shape', type(attn).__name__)}")
            a = attn.detach().to(torch.float64)
            _, heads, s_q, s_k = a.shape
            # -sum_j A log A per (n, h, i); xlogy gives 0 log 0 = 0
            ent = -torch.special.xlogy(a, a).sum(-1)              # [N, heads, S_q]
            per_head = ent.mean(dim=(0, 2))                        # [heads]
            max_ent = float(_allowed_counts(m, s_q, s_k, a.device).log().mean())
            for h in range(heads):
                e = float(per_head[h])
                rows.append({"layer": name, "head": h, "entropy": e, "max_entropy": max_ent,
                             "normalized": e / max_ent if max_ent > 0 else math.nan})
    finally:
        for m, flag in flags:
            m.record = flag
            m.last_attention = None
        for m, training in modes:
            m.training = training
    return rows
