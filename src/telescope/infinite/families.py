"""Ready-made architecture families of :mod:`telescope.infinite`: one description per width.

Each family returns a :class:`~telescope.infinite.Layer`, so that ``arch.module(in_shape)`` is
the finite network (NTK parametrization, torch's global RNG) and ``arch.kernel(x1, x2)`` its
infinite-width NNGP and NTK. The kernel does not depend on ``width``; the finite network's
empirical NTK converges to it as ``width -> infinity`` (Jacot et al. 2018; Yang 2019, "Tensor
Programs I/II" for attention and normalization).

* :func:`transformer`: a pre-LN encoder (Xiong et al. 2020) with linear-scaling attention,
  whose limit is in closed form for every width (Hron, Bahri, Sohl-Dickstein & Novak 2020,
  "Infinite attention: NNGP and NTK for deep attention networks");
* :func:`mlp`: a fully-connected network on flat inputs;
* :func:`with_positions`: a fixed one-hot positional encoding, appended to every token, that
  the finite network and its limit both see.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from telescope.errors import UsageError
from telescope.infinite._layer import Layer
from telescope.infinite.activations import Erf, Gelu, Relu
from telescope.infinite.attention import SelfAttention
from telescope.infinite.combinators import FanInSum, FanOut, parallel, serial
from telescope.infinite.layers import (
    Dense,
    GlobalAvgPool,
    Identity,
    LayerNorm,
    check_positive_int,
    check_std,
)

__all__ = ["transformer", "mlp", "with_positions", "residual"]

_ACTIVATIONS = {"relu": Relu, "erf": Erf, "gelu": Gelu}


def residual(*branch: Layer) -> Layer:
    """``x + f(x)`` with ``f = serial(*branch)``: ``serial(FanOut(2), parallel(serial(*branch),
    Identity()), FanInSum())``. In the limit the two covariances add (the branch must end in a
    random layer of its own, see :mod:`telescope.infinite.combinators`)."""
    if not branch:
        raise UsageError("residual needs at least one layer in its branch")
    return serial(FanOut(2), parallel(serial(*branch), Identity()), FanInSum())


def transformer(width: int, *, n_layers: int = 1, n_heads: int = 1, mlp_ratio: int = 4,
                out_features: int = 1, W_std: float = 1.0, b_std: float = 0.0,
                attention_W_std: float = 1.0, mechanism: str = "softmax") -> Layer:
    """A pre-LN encoder transformer on sequences ``[N, T, D]`` whose infinite-width limit exists
    in closed form.

    .. code-block:: text

        Dense(width)                                          token embedding
        n_layers x [ x + SelfAttention(LayerNorm(x))          linear-scaling attention
                     x + Dense(width)(Relu(Dense(mlp_ratio * width)(LayerNorm(x)))) ]
        LayerNorm, GlobalAvgPool (mean over tokens), Dense(out_features)

    Every Dense is ``y = (W_std / sqrt(n_in)) W x + b_std b`` with ``W, b ~ N(0, 1)`` (NTK
    parametrization; no bias for ``b_std = 0``); the attention has ``n_heads`` heads of
    ``width // n_heads`` key and value features, queries tied to keys and logits scaled by
    ``1 / (width * d_k)`` (``linear_scaling=True``), so that in the limit each input's
    attention matrix is the deterministic ``G(x) = softmax(K(x, x))`` of its token covariance
    ``K`` after the LayerNorm (Hron et al. 2020, with all four attention stds
    ``attention_W_std``) and

    ``K' = G(x) K(x, x') G(x')^T``, ``Theta' = G(x) Theta(x, x') G(x')^T + 2 K'``

    (``b_std = 0``). The LayerNorms have no learned scale or bias; in the limit they divide
    each token's covariance by the square roots of its variances. The residual branches end in
    a random layer of their own, so their covariances add to the skip path's.

    Without positional information the attention, the MLPs and the mean readout are all
    permutation invariant over tokens (and so is the limit kernel): give the inputs positions
    with :func:`with_positions` first, which both the finite network and the kernel then see.

    ``width`` must be divisible by ``n_heads``. Returns the description; ``.module((T, D))``
    builds the finite network, ``.kernel(x1, x2)`` its NNGP and NTK.
    """
    width = check_positive_int(width, "width")
    n_layers = check_positive_int(n_layers, "n_layers")
    n_heads = check_positive_int(n_heads, "n_heads")
    mlp_ratio = check_positive_int(mlp_ratio, "mlp_ratio")
    out_features = check_positive_int(out_features, "out_features")
    check_std(W_std, "W_std")
    check_std(b_std, "b_std")
    check_std(attention_W_std, "attention_W_std")
    if width % n_heads:
        raise UsageError(f"width ({width}) must be divisible by n_heads ({n_heads})")
    head = width // n_heads
    blocks: list[Layer] = []
    for _ in range(n_layers):
        blocks.append(residual(
            LayerNorm(),
            SelfAttention(width, head, head, n_heads, linear_scaling=True,
                          W_key_std=attention_W_std, W_value_std=attention_W_std,
                          W_query_std=attention_W_std, W_out_std=attention_W_std, b_std=b_std,
                          mechanism=mechanism)))
        blocks.append(residual(LayerNorm(), Dense(mlp_ratio * width, W_std, b_std), Relu(),
                               Dense(width, W_std, b_std)))
    return serial(Dense(width, W_std, b_std), *blocks, LayerNorm(), GlobalAvgPool(),
                  Dense(out_features, W_std, b_std))


def mlp(hidden: Sequence[int], out_features: int = 1, activation: str = "relu",
        W_std: float = 1.0, b_std: float = 0.0) -> Layer:
    """A fully-connected network on flat inputs ``[N, F]``: ``Dense(h_1), phi, ..., Dense(h_L),
    phi, Dense(out_features)`` in NTK parametrization (``y = (W_std / sqrt(n_in)) W x + b_std
    b``). Its limit is the recursion of Jacot et al. (2018) and Lee et al. (2019):
    ``K^{l+1} = W_std^2 E[phi(u) phi(v)] + b_std^2``, ``Theta^{l+1} = K^{l+1} + W_std^2
    E[phi'(u) phi'(v)] Theta^l`` with ``(u, v) ~ N(0, K^l)``, starting from ``K^1 = Theta^1 =
    W_std^2 x.x' / F + b_std^2`` (the same numbers as :func:`~telescope.infinite.infinite_ntk`
    with ``depth = len(hidden)``). ``activation``: ``"relu"``, ``"erf"`` or ``"gelu"``.
    Flatten sequences first (``x.flatten(1)``)."""
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise UsageError(f"hidden must be a sequence of widths, e.g. [512], got {hidden!r}")
    widths = [check_positive_int(h, "hidden widths") for h in hidden]
    if not isinstance(activation, str) or activation.lower() not in _ACTIVATIONS:
        raise UsageError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    phi = _ACTIVATIONS[activation.lower()]
    layers: list[Layer] = []
    for h in widths:
        layers += [Dense(h, W_std, b_std), phi()]
    return serial(*layers, Dense(check_positive_int(out_features, "out_features"), W_std,
                                 b_std))


def with_positions(x: Tensor, scale: float = 1.0) -> Tensor:
    """Append a one-hot token-position block to every token: ``[N, T, D] -> [N, T, D + T]``,
    token ``t`` getting ``scale * e_t`` (the first ``D`` features are ``x`` unchanged).

    A fixed (not learned) positional encoding: the finite network built for ``(T, D + T)`` and
    the infinite-width kernel both see it, so the kernel is no longer invariant to permuting
    the tokens. After the first Dense layer it adds ``scale^2 W_std^2 [t = t'] / (D + T)`` to
    the token covariance of two tokens at positions ``t`` and ``t'``: the attention of the
    limit can tell positions apart. ``scale`` weighs position against content."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise UsageError(f"with_positions needs sequences [N, T, D], got {shape}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise UsageError(f"scale must be a real number, got {type(scale).__name__}")
    n, t, _ = x.shape
    dtype = x.dtype if x.dtype.is_floating_point else torch.get_default_dtype()
    eye = torch.eye(t, dtype=dtype, device=x.device) * float(scale)
    return torch.cat([x.to(dtype), eye.expand(n, t, t)], dim=-1)
