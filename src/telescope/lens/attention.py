"""Attention entropy per layer and head (Zhai et al., 2023, "Stabilizing Transformer Training by
Preventing Attention Entropy Collapse").

For attention probabilities ``A[n, h, i, j]`` (example ``n``, head ``h``, query ``i``, key ``j``,
``sum_j A_ij = 1``) the entropy of query ``i`` is

    H_i = -sum_j A_ij log A_ij        (nats, ``0 log 0 = 0``),

at most ``log m_i`` with ``m_i`` the number of keys query ``i`` may attend to (``m_i = S`` in an
encoder, ``m_i = i + 1`` with a causal mask, ``i`` counted from 0), reached by uniform attention.
Zhai et al. track the mean of ``H_i`` over examples and queries per head; a collapse towards 0
(all attention on one key) accompanies unstable training.

The lens reads the attention probabilities through named hook points
(:mod:`telescope.models.hooks`): every :class:`~telescope.models.hooks.HookPoint` named
``hook_pattern`` (qualified name ``<module>.hook_pattern``, e.g. ``blocks.0.attn.hook_pattern``
of :class:`~telescope.models.TinyTransformer`) is one attention module, and a sibling
``<module>.hook_scores`` (the pre-softmax scores, masked keys ``-inf``) tells which keys each
query may attend to. Hooks are registered only for the one forward pass; the model keeps no
state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from telescope.errors import UsageError
from telescope.kernels.functional import eval_mode
from telescope.models.hooks import HookPoint, capture

__all__ = ["attention_entropy", "AttentionEntropy"]

_PATTERN, _SCORES = "hook_pattern", "hook_scores"


def _attention_layers(model: nn.Module) -> list[tuple[str, str, str | None]]:
    """``(layer, pattern hook, scores hook or None)`` for every ``hook_pattern`` hook point."""
    points = {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}
    layers = []
    for name in points:
        if name == _PATTERN or name.endswith("." + _PATTERN):
            layer = name[: -len(_PATTERN)].rstrip(".")
            scores = f"{layer}.{_SCORES}" if layer else _SCORES
            layers.append((layer, name, scores if scores in points else None))
    return layers


def _max_entropy(scores: Tensor | None, s_q: int, s_k: int, heads: int) -> list[float]:
    """``mean_i log m_i`` per head, ``m_i`` the keys with a finite score (all ``S_k`` keys
    without scores); averaged over examples too where the mask differs between them."""
    if scores is None:
        return [float(torch.full((s_q,), float(s_k), dtype=torch.float64).log().mean())] * heads
    if scores.dim() != 4 or scores.shape[1:] != (heads, s_q, s_k):
        raise UsageError(f"attention_entropy: the scores hook point must carry [N, {heads}, "
                         f"{s_q}, {s_k}] like the pattern, got {list(scores.shape)}")
    counts = torch.isfinite(scores).sum(-1).to(torch.float64)   # m_i per (n, h, i)
    flat = counts.reshape(-1, s_q)
    if bool((flat == flat[0]).all()):                              # one mask for all (n, h)
        return [float(flat[0].log().mean())] * heads
    return [float(v) for v in counts.log().mean(dim=(0, 2))]


def attention_entropy(model: nn.Module, x: Tensor) -> list[dict]:
    """Mean attention entropy of every head of every attention module of ``model`` on ``x``.

    An attention module is found by its hook points (:mod:`telescope.models.hooks`): a
    :class:`~telescope.models.hooks.HookPoint` named ``hook_pattern`` through which the module
    passes its attention probabilities ``[N, heads, S_q, S_k]``, and optionally one named
    ``hook_scores`` next to it for the pre-softmax scores ``[N, heads, S_q, S_k]`` with masked
    keys at ``-inf`` (``m_i`` counts the finite scores of query ``i``; without ``hook_scores``
    every query may attend to all ``S_k`` keys). :class:`telescope.models.TinyTransformer` has
    both in every block (``blocks.<i>.attn.hook_pattern``); for your own attention module put
    ``self.hook_pattern = HookPoint()`` in ``__init__`` and ``attn =
    self.hook_pattern(scores.softmax(-1))`` in ``forward``.

    ``model(x)`` runs once in eval mode under ``torch.no_grad()`` with temporary forward hooks
    on those hook points; afterwards the hooks are removed and every module's train/eval mode
    is restored, also on an error. A hook point not called during the forward pass gives no
    rows; one called several times is measured at its last call.

    Returns
    -------
    list of dict
        One row per (module, head), in module order:
        ``{"layer": qualified name of the module holding hook_pattern, "head": h,
        "entropy": mean_{n,i} H_i with H_i = -sum_j A_ij log A_ij (nats),
        "max_entropy": mean_i log m_i, "normalized": entropy / max_entropy}``
        (``normalized`` is NaN when ``max_entropy`` is 0, i.e. a single key).
    """
    layers = _attention_layers(model)
    if not layers:
        raise UsageError(
            f"attention_entropy: {type(model).__name__} has no attention hook point. It reads the "
            f"attention probabilities [N, heads, S_q, S_k] from HookPoint modules named "
            f"`hook_pattern` (as in telescope.models.TinyTransformer, blocks.0.attn.hook_pattern). "
            f"For your own attention module: self.hook_pattern = "
            f"telescope.models.hooks.HookPoint() in __init__ and attn = "
            f"self.hook_pattern(scores.softmax(-1)) in forward (and self.hook_scores for the "
            f"masked scores, -inf where a key is masked).")
    names = [n for _, pattern, scores in layers for n in (pattern, scores) if n is not None]
    rows: list[dict] = []
    with eval_mode(model):
        with torch.no_grad(), capture(model, names) as cache:
            model(x)
        for layer, pattern, scores in layers:
            attn = cache.get(pattern)
            if attn is None:
                continue
            if not isinstance(attn, Tensor) or attn.dim() != 4:
                raise UsageError(f"attention_entropy: the hook point {pattern} must carry the "
                                 f"attention probabilities [N, heads, S_q, S_k], got "
                                 f"{getattr(attn, 'shape', type(attn).__name__)}")
            a = attn.to(torch.float64)
            _, heads, s_q, s_k = a.shape
            # -sum_j A log A per (n, h, i); xlogy gives 0 log 0 = 0
            ent = -torch.special.xlogy(a, a).sum(-1)              # [N, heads, S_q]
            per_head = ent.mean(dim=(0, 2))                        # [heads]
            max_ent = _max_entropy(cache.get(scores) if scores else None, s_q, s_k, heads)
            for h in range(heads):
                e, m = float(per_head[h]), max_ent[h]
                rows.append({"layer": layer, "head": h, "entropy": e, "max_entropy": m,
                             "normalized": e / m if m > 0 else math.nan})
    return rows


class AttentionEntropy:
    """:func:`attention_entropy` on fixed probe inputs, as a :func:`telescope.train.fit`
    callback: at every measured step, its rows (``layer``, ``head``, ``entropy``,
    ``normalized``) go to the history table ``name`` (default ``"entropy"``)."""

    def __init__(self, x: Tensor, *, name: str = "entropy") -> None:
        self.x, self.name = x, name

    def measure(self, state) -> list[dict]:
        return attention_entropy(state.model, self.x)
