"""What a structured-NTK rule is and what it returns: the :data:`Rule` signature,
:class:`CompositeRule` (a rule that replaces its module's forward to reach inside it),
:class:`RuleMismatch` (raised by a rule that does not fit its module), and the *factors* a rule
extracts from one block of examples for the engine to contract: :class:`TokenFactor` (a
linear-like layer: its inputs, or indices, and output deltas per token) and :class:`GradFactor`
(per-example gradients).

The built-in rules are in ``_layer_rules.py`` and ``_attention_rule.py``;
:mod:`telescope.kernels.rules` re-exports all of these and holds the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

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
# Rules: module -> factors, and a rule that does not fit
# --------------------------------------------------------------------------------------------


class RuleMismatch(Exception):
    """A rule does not fit the module it was applied to (e.g. the weight's shape does not match
    the input); the module falls back to per-example Jacobians."""


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
