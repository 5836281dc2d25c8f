"""Global self-attention in NTK parametrization, as neural-tangents' ``stax.GlobalSelfAttention``.

Hron, Bahri, Sohl-Dickstein & Novak (2020), "Infinite attention: NNGP and NTK for deep attention
networks". The infinite-width kernel of this layer is
:func:`telescope.infinite._attention.attention_covariances`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from telescope.errors import UsageError, check_positive_int, check_std
from telescope.models.mlp import NTKLinear

__all__ = ["NTKSelfAttention"]

_MECHANISMS = ("softmax", "identity", "relu", "abs")


class NTKSelfAttention(nn.Module):
    """Multi-head global self-attention on ``[N, T, in_features]`` (batch first) in NTK
    parametrization, the function and initialization of neural-tangents'
    ``stax.GlobalSelfAttention`` (no positional embeddings, no mask; Hron et al. 2020).

    With ``d = in_features``, ``qk_std = W_query_std * W_key_std`` and ``ov_std = W_out_std *
    W_value_std``, per head ``h``:

        K_h = X W_K[h],   Q_h = K_h (linear_scaling) or X W_Q[h],   V_h = X W_V[h],
        A_h = mechanism(qk_std * Q_h K_h^T / (d * key_features ** p)),   p = 1 or 1/2,
        y = concat_h(A_h V_h) W_out * ov_std / sqrt(value_features * n_heads * d) + b_std * b,

    with every weight and ``b`` i.i.d. ``N(0, 1)`` and ``mechanism`` ``"softmax"`` (over the key
    axis), ``"identity"``, ``"relu"`` or ``"abs"``. ``linear_scaling=True`` ties queries to keys
    and scales the logits by ``1 / (d * key_features)``: the attention matrix then converges to a
    deterministic one and the kernel has a closed form for every mechanism (``False``: the usual
    ``1 / sqrt(key_features)``, independent queries; closed form for ``"identity"`` only).

    Built from :class:`~telescope.models.NTKLinear` sublayers, so that the structured NTK has a
    rule for every parameter: ``keys`` (and ``queries`` when not tied) ``NTKLinear(d, n_heads *
    key_features, bias=False)``, ``values`` ``NTKLinear(d, n_heads * value_features, bias=False)``
    (these carry the ``1 / sqrt(d)`` factors) and ``out`` ``NTKLinear(n_heads * value_features,
    out_features, weight_std=ov_std, bias_std=b_std)``; the rest of the constants scale the
    logits (``qk_std / key_features ** p``). The bias exists only for ``b_std > 0`` (as
    neural-tangents' ``b_std=None``). The parameters are neural-tangents' ones, reshaped:
    ``keys.weight[h * key_features + k, i] = W_K[h, i, k]`` (``queries`` and ``values`` alike)
    and ``out.weight[o, v * n_heads + h] = W_out[v * n_heads + h, o]`` (neural-tangents
    concatenates the heads value-major).
    """

    def __init__(self, in_features: int, out_features: int, key_features: int,
                 value_features: int, n_heads: int, *, linear_scaling: bool = True,
                 W_key_std: float = 1.0, W_value_std: float = 1.0, W_query_std: float = 1.0,
                 W_out_std: float = 1.0, b_std: float = 0.0,
                 mechanism: str = "softmax") -> None:
        super().__init__()
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        self.key_features = check_positive_int(key_features, "key_features")
        self.value_features = check_positive_int(value_features, "value_features")
        self.n_heads = check_positive_int(n_heads, "n_heads")
        if not isinstance(linear_scaling, bool):
            raise UsageError(f"linear_scaling must be a bool, got {linear_scaling!r}")
        if mechanism not in _MECHANISMS:
            raise UsageError(f"mechanism must be one of {list(_MECHANISMS)}, got {mechanism!r}")
        self.linear_scaling, self.mechanism = linear_scaling, mechanism
        stds = {name: check_std(value, name) for name, value in (
            ("W_key_std", W_key_std), ("W_value_std", W_value_std),
            ("W_query_std", W_query_std), ("W_out_std", W_out_std), ("b_std", b_std))}
        self.qk_std = stds["W_query_std"] * stds["W_key_std"]
        self.ov_std = stds["W_out_std"] * stds["W_value_std"]
        self.b_std = stds["b_std"]
        heads_key, heads_val = self.n_heads * self.key_features, self.n_heads * self.value_features
        self.keys = NTKLinear(self.in_features, heads_key, bias=False)
        self.queries = (None if linear_scaling else
                        NTKLinear(self.in_features, heads_key, bias=False))
        self.values = NTKLinear(self.in_features, heads_val, bias=False)
        self.out = NTKLinear(heads_val, self.out_features, weight_std=self.ov_std,
                             bias_std=self.b_std, bias=self.b_std > 0)

    @property
    def logit_scale(self) -> float:
        """``qk_std / key_features ** p`` (the ``1 / d`` sits in the two projections)."""
        power = 1.0 if self.linear_scaling else 0.5
        return self.qk_std / self.key_features ** power

    def _split(self, y: Tensor, size: int) -> Tensor:
        """``[..., T, n_heads * size]`` -> ``[..., n_heads, T, size]``."""
        return y.unflatten(-1, (self.n_heads, size)).transpose(-2, -3)

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise UsageError(f"NTKSelfAttention expects [N, T, {self.in_features}] inputs "
                             f"(batch first, channels last), got shape {tuple(x.shape)}")

    def attention_weights(self, x: Tensor) -> Tensor:
        """The attention matrices ``A_h = mechanism(logits_h)``, ``[N, n_heads, T, T]`` (queries
        on the second-to-last axis, keys on the last)."""
        self._check(x)
        k = self._split(self.keys(x), self.key_features)
        q = k if self.queries is None else self._split(self.queries(x), self.key_features)
        logits = (q @ k.transpose(-1, -2)) * self.logit_scale
        if self.mechanism == "softmax":
            return torch.softmax(logits, dim=-1)
        if self.mechanism == "relu":
            return torch.relu(logits)
        if self.mechanism == "abs":
            return logits.abs()
        return logits

    def mix(self, x: Tensor, weights: Tensor) -> Tensor:
        """The value and output path for given attention matrices ``weights`` (``[N, n_heads,
        T, T]`` or broadcastable): ``concat_h(weights_h V_h) W_out * ... + b_std b``."""
        self._check(x)
        heads = weights @ self._split(self.values(x), self.value_features)  # [..., H, T, V]
        heads = heads.movedim(-3, -1).flatten(-2)  # [..., T, V * H], value-major
        return self.out(heads)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(x, self.attention_weights(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"key_features={self.key_features}, value_features={self.value_features}, "
                f"n_heads={self.n_heads}, linear_scaling={self.linear_scaling}, "
                f"qk_std={self.qk_std}, ov_std={self.ov_std}, b_std={self.b_std}, "
                f"mechanism={self.mechanism!r}")
