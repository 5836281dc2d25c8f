"""``SelfAttention``: multi-head self-attention in NTK parametrization and its limit.

On a sequence ``[N, T, D]`` (``batch_first``) every head computes keys ``K = X W_K``, queries
``Q`` (tied to the keys with ``linear_scaling=True``), logits ``qk_std Q K^T / (D d_k)`` (``/ (D
sqrt(d_k))`` without linear scaling), attention ``A = mechanism(logits)`` and ``A X W_V``; the
heads are concatenated and mixed by ``W_out`` with scale ``ov_std / sqrt(d_v n_heads D)``, plus
``b_std b`` (neural-tangents' ``stax.GlobalSelfAttention``; ``qk_std = W_query_std W_key_std``,
``ov_std = W_out_std W_value_std``).

Infinite width (Hron, Bahri, Sohl-Dickstein & Novak 2020, "Infinite attention: NNGP and NTK for
deep attention networks"): with linear scaling the logits converge to ``qk_std K(x, x)``, so
each input's attention matrix ``G(x) = mechanism(qk_std K(x, x))`` is deterministic and

.. math::

    K'(x, x') = ov_{std}^2\\, G(x) K(x, x') G(x')^T + b_{std}^2, \\qquad
    \\Theta' = ov_{std}^2\\, G(x) \\Theta(x, x') G(x')^T + b_{std}^2 + 2 (K' - b_{std}^2),

(the ``2 (K' - b^2)``: the value and output weights; the tied query/key weights' share
vanishes in the limit). Without linear scaling only ``mechanism="identity"`` has a closed form.
"""

from __future__ import annotations

from torch import nn

from telescope.errors import UsageError, check_positive_int, check_std
from telescope.infinite._attention import attention_covariances
from telescope.infinite._layer import Layer, Shape, State, one_branch
from telescope.infinite._state import Covariances, Geometry
from telescope.models.ntk_attention import NTKSelfAttention

__all__ = ["SelfAttention"]

_MECHANISMS = ("softmax", "identity", "relu", "abs")


class SelfAttention(Layer):
    """Multi-head self-attention over the tokens of ``[N, T, D]`` (see the module docstring).

    ``key_features`` and ``value_features`` are per head; the kernel does not depend on them or
    on ``n_heads`` (they only size the finite network, :meth:`module`).
    """

    requires_layout = ("channels_last",)

    def __init__(self, out_features: int, key_features: int, value_features: int, n_heads: int,
                 linear_scaling: bool = True, W_key_std: float = 1.0, W_value_std: float = 1.0,
                 W_query_std: float = 1.0, W_out_std: float = 1.0, b_std: float = 0.0,
                 mechanism: str = "softmax") -> None:
        self.out_features = check_positive_int(out_features, "out_features")
        self.key_features = check_positive_int(key_features, "key_features")
        self.value_features = check_positive_int(value_features, "value_features")
        self.n_heads = check_positive_int(n_heads, "n_heads")
        if not isinstance(linear_scaling, bool):
            raise UsageError(f"linear_scaling must be True or False, got {linear_scaling!r}")
        self.linear_scaling = linear_scaling
        self.W_key_std = check_std(W_key_std, "W_key_std")
        self.W_value_std = check_std(W_value_std, "W_value_std")
        self.W_query_std = check_std(W_query_std, "W_query_std")
        self.W_out_std = check_std(W_out_std, "W_out_std")
        self.b_std = check_std(b_std, "b_std")
        if not isinstance(mechanism, str) or mechanism.lower() not in _MECHANISMS:
            raise UsageError(f"mechanism must be one of {_MECHANISMS}, got {mechanism!r}")
        self.mechanism = mechanism.lower()

    def __repr__(self) -> str:
        return (f"SelfAttention({self.out_features}, {self.key_features}, "
                f"{self.value_features}, {self.n_heads}, linear_scaling={self.linear_scaling}, "
                f"mechanism={self.mechanism!r})")

    def geometry(self, shape: Shape) -> Shape:
        one_branch(shape, self)
        assert isinstance(shape, Geometry)
        if shape.layout != "channels_last" or len(shape.spatial) != 1:
            raise UsageError(
                f"{self!r} takes sequences [N, T, D] (batch first, features last), but its input "
                f"is {shape.layout.replace('_', ' ')} with spatial axes {shape.spatial}")
        return Geometry("channels_last", shape.spatial,
                        None if shape.features is None else self.out_features)

    def apply(self, state: State) -> State:
        one_branch(state, self)
        assert isinstance(state, Covariances)
        nngp, ntk, var1, var2 = attention_covariances(
            state.nngp, state.ntk, state.var1, state.var2,
            qk_std=self.W_query_std * self.W_key_std, ov_std=self.W_out_std * self.W_value_std,
            b_std=self.b_std, mechanism=self.mechanism, linear_scaling=self.linear_scaling)
        return state.replace(nngp=nngp, ntk=ntk, var1=var1,
                             var2=var1 if state.symmetric else var2, gaussian=True, fresh=True)

    def build(self, shape: Shape) -> nn.Module:
        assert isinstance(shape, Geometry) and shape.features is not None
        return NTKSelfAttention(
            shape.features, self.out_features, self.key_features, self.value_features,
            self.n_heads, linear_scaling=self.linear_scaling, W_key_std=self.W_key_std,
            W_value_std=self.W_value_std, W_query_std=self.W_query_std,
            W_out_std=self.W_out_std, b_std=self.b_std, mechanism=self.mechanism)
