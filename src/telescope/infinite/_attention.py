"""The infinite-width limit of global self-attention: a map of covariances.

Hron, Bahri, Sohl-Dickstein & Novak (2020), "Infinite attention: NNGP and NTK for deep attention
networks" (ICML), as implemented by neural-tangents' ``stax.GlobalSelfAttention`` (no positional
embeddings, no masks). The finite layer is :class:`telescope.models.NTKSelfAttention`: per head
``h``, with ``d`` the input width,

    logits_h = qk_std * Q_h K_h^T / (d * n_key ** p),   heads_h = mechanism(logits_h) V_h,
    y = concat_h(heads_h) W_out * ov_std / sqrt(n_val * n_heads * d) + b_std * b,

``K_h = X W_K[h]``, ``V_h = X W_V[h]``, ``qk_std = W_query_std * W_key_std``, ``ov_std =
W_out_std * W_value_std``, all weights ``N(0, 1)``. Two variants:

* ``linear_scaling=True`` (``p = 1``, queries tied to keys, ``Q_h = K_h``): the logits are an
  average over the ``n_key`` key channels, so in the limit they converge to the constant
  ``qk_std * K(x, x)[t, s]`` and every head sees the same deterministic attention matrix

      G(x)[t, s] = mechanism(qk_std * K(x, x)[t, s])      (softmax over the key axis ``s``).

  With ``G1 = G(x)`` and ``G2 = G(x')``, per pair of examples (matrix products over tokens):

      K'(x, x')     = ov_std^2 * G1 K(x, x') G2^T + b_std^2,
      Theta'(x, x') = ov_std^2 * G1 Theta(x, x') G2^T + b_std^2 + 2 (K'(x, x') - b_std^2).

  The ``2 (K' - b_std^2)`` is the contribution of the layer's own value and output weights
  (one ``ov_std^2 G1 K G2^T`` each); the query/key weights contribute nothing in the limit (the
  gradient of an average over ``n_key`` channels with respect to any one of them is
  ``O(1 / n_key)``), and neither does the dependence of ``G`` on earlier layers' parameters: the
  attention matrix is frozen, and the NTK flows only through the values.

* ``linear_scaling=False`` (``p = 1/2``, independent queries): the logits stay Gaussian in the
  limit and only ``mechanism="identity"`` has a closed form. With ``c = (qk_std * ov_std)^2``
  and ``<A, B> = sum_{s, s'} A[s, s'] B[s, s']`` over *all* token pairs (no division by the
  sequence length):

      K'     = c <K, K> K + b_std^2,
      Theta' = c (2 <K, Theta> K + <K, K> (Theta + 4 K)) + b_std^2,

  (``<K, K> K`` from the output and value weights, ``2 <K, K> K`` more from the query and key
  weights, ``<K, K> Theta`` back through the queries, ``<K, Theta> K`` each back through keys
  and values); the own covariances use ``<K(x, x), K(x, x)>``.

Covariances are those of :mod:`telescope.infinite._state` for ``[N, *spatial, D]`` inputs:
``nngp``/``ntk`` ``[n1, n2, s1, s1', s2, s2', ...]`` (pair axes interleaved), ``var1``
``[n1, s1, s1', ...]``, ``var2`` ``[n2, ...]``. All spatial axes together are the tokens (as in
neural-tangents, which flattens them).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from telescope.errors import UsageError

__all__ = ["MECHANISMS", "attention_covariances", "attention_weights"]

MECHANISMS = ("softmax", "identity", "relu", "abs")


def _check_std(value: object, name: str, *, signed: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (value < 0 and not signed):
        raise UsageError(f"{name} must be finite{'' if signed else ' and >= 0'}, got {value}")
    return value


def _check_mechanism(mechanism: object) -> str:
    if mechanism not in MECHANISMS:
        raise UsageError(f"mechanism must be one of {list(MECHANISMS)}, got {mechanism!r}")
    return str(mechanism)


def _mechanism(logits: Tensor, mechanism: str) -> Tensor:
    if mechanism == "softmax":
        return torch.softmax(logits, dim=-1)
    if mechanism == "relu":
        return torch.relu(logits)
    if mechanism == "abs":
        return logits.abs()
    return logits


def _to_tokens(mat: Tensor, batch_axes: int) -> Tensor:
    """``[*batch, s1, s1', s2, s2', ...]`` -> ``[*batch, S, S']`` (all spatial axes flattened)."""
    k = (mat.dim() - batch_axes) // 2
    if k == 1:
        return mat
    lead = tuple(range(batch_axes))
    first = tuple(batch_axes + 2 * a for a in range(k))
    mat = mat.permute(*lead, *first, *(a + 1 for a in first))
    size = math.prod(mat.shape[batch_axes:batch_axes + k])
    return mat.reshape(*mat.shape[:batch_axes], size, -1)


def _from_tokens(mat: Tensor, spatial: tuple[int, ...], batch_axes: int) -> Tensor:
    """The inverse of :func:`_to_tokens` for spatial sizes ``spatial``."""
    k = len(spatial)
    if k == 1:
        return mat
    mat = mat.reshape(*mat.shape[:batch_axes], *spatial, *spatial)
    order = list(range(batch_axes))
    for a in range(k):
        order += [batch_axes + a, batch_axes + k + a]
    return mat.permute(*order)


def attention_weights(var: Tensor, *, qk_std: float, mechanism: str) -> Tensor:
    """The limit attention matrix of linear-scaling attention, ``G[i, t, s] = mechanism(qk_std
    * var[i, t, s])`` (softmax over the key axis ``s``), from each example's own covariance
    ``var`` ``[n, T, T]`` (Hron et al. 2020). It is what the finite layer's attention
    (:meth:`telescope.models.NTKSelfAttention.attention_weights`, of every head) converges to
    as ``key_features`` grows, for an input whose channel covariance ``X X^T / d`` is ``var``.
    """
    qk_std = _check_std(qk_std, "qk_std", signed=True)
    mechanism = _check_mechanism(mechanism)
    if var.dim() != 3 or var.shape[1] != var.shape[2]:
        raise UsageError(f"var must be [n, T, T], got shape {tuple(var.shape)}")
    return _mechanism(qk_std * var, mechanism)


def _check_shapes(nngp: Tensor, ntk: Tensor, var1: Tensor, var2: Tensor) -> tuple[int, ...]:
    """The spatial sizes, after checking that the four covariances fit together."""
    pairs = tuple(nngp.shape[2:])
    if nngp.dim() < 4 or nngp.dim() % 2 or pairs[0::2] != pairs[1::2]:
        raise UsageError(
            "attention needs covariances with token axes: nngp [n1, n2, T, T] (or interleaved "
            f"pairs [n1, n2, s1, s1, s2, s2, ...]), got shape {tuple(nngp.shape)}")
    n1, n2 = nngp.shape[:2]
    for name, t, want in (("ntk", ntk, nngp.shape), ("var1", var1, (n1, *pairs)),
                          ("var2", var2, (n2, *pairs))):
        if tuple(t.shape) != tuple(want):
            raise UsageError(f"{name} must have shape {tuple(want)} to match nngp "
                             f"{tuple(nngp.shape)}, got {tuple(t.shape)}")
    return pairs[0::2]


def attention_covariances(nngp: Tensor, ntk: Tensor, var1: Tensor, var2: Tensor, *,
                          qk_std: float, ov_std: float, b_std: float, mechanism: str,
                          linear_scaling: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(nngp', ntk', var1', var2')`` of global self-attention applied to inputs with
    covariances ``(nngp, ntk, var1, var2)`` (the formulas of the module docstring; Hron et al.
    2020; neural-tangents' ``stax.GlobalSelfAttention``).

    ``qk_std = W_query_std * W_key_std``, ``ov_std = W_out_std * W_value_std``, ``b_std`` the
    bias std (0: no bias); ``mechanism`` one of ``"softmax"``, ``"identity"``, ``"relu"``,
    ``"abs"``. With ``linear_scaling=False`` only ``"identity"`` has a closed form; any other
    mechanism raises :class:`~telescope.errors.UsageError`. When ``var2 is var1`` (one batch
    against itself) the returned ``var2'`` is ``var1'`` too.

    Cost per block: four batched ``[T, T] @ [T, T]`` products per pair of examples (linear
    scaling), or a few reductions (identity, square-root scaling).
    """
    qk_std = _check_std(qk_std, "qk_std", signed=True)
    ov_std = _check_std(ov_std, "ov_std")
    b_std = _check_std(b_std, "b_std")
    mechanism = _check_mechanism(mechanism)
    if not isinstance(linear_scaling, bool):
        raise UsageError(f"linear_scaling must be a bool, got {linear_scaling!r}")
    spatial = _check_shapes(nngp, ntk, var1, var2)
    same = var2 is var1
    b_var, o_var = b_std ** 2, ov_std ** 2

    if not linear_scaling:
        if mechanism != "identity":
            raise UsageError(
                f"self-attention with linear_scaling=False and mechanism={mechanism!r} has no "
                "closed-form infinite-width kernel (the logits stay Gaussian and the "
                f"{mechanism} of them has no known expectation; neural-tangents raises too): "
                "use linear_scaling=True (queries tied to keys, logits scaled by 1/n_key) or "
                "mechanism='identity'")
        c = (qk_std * ov_std) ** 2
        axes12 = tuple(range(2, nngp.dim()))
        dot12 = (nngp * nngp).sum(axes12, keepdim=True)
        nngp_ntk = (nngp * ntk).sum(axes12, keepdim=True)
        new_nngp = c * dot12 * nngp + b_var
        new_ntk = c * (2 * nngp_ntk * nngp + dot12 * (ntk + 4 * nngp)) + b_var

        def own(var: Tensor) -> Tensor:
            dot = (var * var).sum(tuple(range(1, var.dim())), keepdim=True)
            return c * dot * var + b_var

        new_var1 = own(var1)
        return new_nngp, new_ntk, new_var1, new_var1 if same else own(var2)

    g1 = _mechanism(qk_std * _to_tokens(var1, 1), mechanism)
    g2 = g1 if same else _mechanism(qk_std * _to_tokens(var2, 1), mechanism)

    def pair(mat: Tensor) -> Tensor:
        # out[i, j] = G1[i] mat[i, j] G2[j]^T, as two batched matmuls (no broadcast copies)
        m = _to_tokens(mat, 2)
        n1, n2, s, _ = m.shape
        left = torch.bmm(g1, m.transpose(1, 2).reshape(n1, s, n2 * s))   # [n1, t, (j, s')]
        left = left.reshape(n1, s, n2, s).permute(2, 0, 1, 3).reshape(n2, n1 * s, s)
        out = torch.bmm(left, g2.transpose(1, 2))                          # [j, (i, t), t']
        out = out.reshape(n2, n1, s, s).permute(1, 0, 2, 3)  # a strided view, no copy
        return _from_tokens(out, spatial, 2)

    def own_var(var: Tensor, g: Tensor) -> Tensor:
        return o_var * _from_tokens(g @ _to_tokens(var, 1) @ g.transpose(1, 2), spatial, 1) + b_var

    core = pair(nngp)
    new_nngp = o_var * core + b_var
    new_ntk = o_var * (pair(ntk) + 2 * core) + b_var
    new_var1 = own_var(var1, g1)
    return new_nngp, new_ntk, new_var1, new_var1 if same else own_var(var2, g2)
