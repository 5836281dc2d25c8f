r"""Matrix-free low-rank factorization of the empirical NTK: ``K ~= U diag(s) U^T``.

The empirical neural tangent kernel of a model ``f(theta, x) in R^O`` on ``N`` inputs is

.. math::

    K = J J^T, \qquad J = \partial f(x) / \partial \theta \in \mathbb{R}^{NO \times P},

with the rows of ``J`` ordered example-major: row ``n * O + o`` is ``d f_o(x_n) / d theta``. For
``P`` in the millions and ``N * O`` in the thousands neither ``J`` nor ``K`` should be formed. The
*Neural Fisher Kernel* (Zhang et al. 2021) observes that the top eigenpairs of ``K`` carry most of
what matters about it and that they can be found from products with ``K`` alone; each product is
two passes of automatic differentiation through the model:

.. math::

    K \Omega = J \, (J^T \Omega),

where ``J^T omega`` (one column ``omega`` of ``Omega``, shaped ``[N, O]``) is a vector-Jacobian
product (reverse mode, cotangent ``omega``) and ``J v`` (a parameter-shaped ``v``) is a
Jacobian-vector product (forward mode, tangent ``v``). Both are ``torch.func`` transforms of the
batched model, ``vmap``-ped over the columns of ``Omega``.

**Trace kernel.** ``output="trace"`` factorizes ``K_tr[n, m] = sum_o <J_{n,o}, J_{m,o}>``, i.e.

.. math::

    K_{tr} = \sum_o J_o J_o^T, \qquad K_{tr} w = \sum_o J_o (J_o^T w),

with ``J_o in R^{N x P}`` the rows of ``J`` belonging to output ``o``. This is a *partial trace*
of the full kernel, not a congruence ``S K S^T``: pushing one cotangent ``w`` broadcast to all
outputs through ``J^T`` gives ``sum_o J_o^T w`` and would wrongly add cross terms
``J_o J_{o'}^T w`` (``o != o'``). So each column ``w`` is expanded into the ``O`` cotangents
``w e_o^T`` (``w`` on output ``o``, zero elsewhere), ``J (J^T (w e_o^T))`` is formed for each ``o``
and only its output-``o`` entries are kept and summed over ``o``. (Equivalently
``K_tr = J~ J~^T`` with ``J~ in R^{N x OP}`` the per-example Jacobian flattened over outputs and
parameters.) A trace-kernel product therefore costs ``O`` full-kernel products on this route.

**Two routes to a product.** ``method="vector"`` is the above: a vmapped VJP and JVP through the
whole model per column (and per output, for the trace kernel). ``method="structured"`` (the
default when every parameter has a per-layer rule) reads the structured engine's factors of each
block of examples (the deltas ``d`` of every layer for all ``O`` outputs from one backward pass,
and the layer inputs ``a``), so ``J^T Omega`` is, per layer, a weighted sum of per-example
gradients ``sum_{b,s} omega_b d_{b,s} a_{b,s}^T`` and ``J M`` is ``sum_s d_{b,s} . (M a_{b,s})``:
matmuls only, with the backward pass shared by every column. Neither route removes the ``O`` of
the trace kernel: ``K_tr = J~ J~^T`` has ``O P`` features per example, so an exact product holds
``O`` parameter-sized sums per column (a cost linear in ``N``; only forming the ``N x N`` kernel
avoids it).

**Randomized eigendecomposition** (Halko, Martinsson & Tropp 2011, Algorithms 4.3/4.4 and 5.3):
with ``k = min(rank + oversample, M)`` (``M = N * O`` or ``N``) and a Gaussian
``Omega in R^{M x k}``

1. ``Q = orth(K Omega)`` (range finder);
2. ``n_iter`` times: ``Q = orth(K Q)`` (subspace / power iteration, re-orthonormalized each time
   so round-off does not wash out the small directions); the error of the captured subspace
   shrinks like ``(lambda_{k+1} / lambda_j) ^ (n_iter + 1)`` for eigenvalue ``lambda_j``;
3. ``B = Q^T K Q`` (Rayleigh-Ritz), ``B = V diag(s) V^T``, ``U = Q V``; keep the top ``rank``.

This uses ``n_iter + 2`` products with ``K``. The Ritz values never exceed the true eigenvalues
(Cauchy interlacing) and are exact when ``K`` has rank ``<= k`` (the range finder then captures
the whole range of ``K``) or when ``k = M``.

**Memory.** Nothing of size ``M x M`` or ``M x P`` is formed. The columns of ``Omega`` are handled
in chunks of ``c`` (each needs a parameter-sized vector ``J^T omega``), and the examples in blocks
of ``block_size`` (the activations of one block, times ``c`` for the vmapped backward and forward
passes), both chosen from ``max_memory_gb`` unless given.

References
----------
.. [1] R. Zhang, S. Zhai, E. Littwin, J. Susskind. "Neural Fisher Kernel: Low-rank
   Approximation and Knowledge Distillation." arXiv:2106.13087 (2021); ICLR 2022 as "Learning
   representation from Neural Fisher Kernel with low-rank approximation".
.. [2] N. Halko, P.-G. Martinsson, J. A. Tropp. "Finding structure with randomness: Probabilistic
   algorithms for constructing approximate matrix decompositions." SIAM Review 53(2), 2011.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.func import jvp, vjp, vmap

from telescope.errors import UsageError
from telescope.kernels._functional import (
    ParamSpec,
    ad_safe_backends,
    at_least_two,
    batched_fn,
    checked_call,
    frozen_state,
    only_params,
    parse_memory,
    select_params,
    trainable_params,
)
from telescope.kernels._rule_protocol import GradFactor, TokenFactor
from telescope.kernels.structured import _plan, _sizes

__all__ = ["lowrank_ntk"]

_OUTPUTS = ("trace", "full")
_METHODS = ("auto", "structured", "vector")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")
    return value


def _per_example_bytes(f, params: dict[str, Tensor], x: Tensor) -> int:
    """Bytes of activations autograd saves per example (a forward on 1 and 2 examples).

    Tensors saved once per batch (the weights a matmul keeps for its backward) cancel in the
    difference, so the estimate scales with the block size as the real cost does.
    """

    def saved(xb: Tensor) -> int:
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad(), saved_tensors_hooks(pack, lambda t: t):
            out = f(leaves, xb)
        return max(total, out.numel() * out.element_size())

    one = saved(x[:1])
    if x.shape[0] < 2:
        return one
    return max(saved(x[:2]) - one, 1)


class _NTKOperator:
    """``Omega -> K Omega`` for the full (``[N*O, k]``) or trace (``[N, k]``) empirical NTK."""

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        n_outputs: int,
        output: str,
        block_size: int | None,
        max_memory_gb: float | None,
        n_columns: int,
    ) -> None:
        self.model = model
        self.f = batched_fn(model, frozen_state(model))
        self.params = trainable_params(model)
        self.x = x
        self.n = x.shape[0]
        self.n_out = n_outputs
        self.output = output
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device

        budget = parse_memory(max_memory_gb)
        n_params = sum(p.numel() for p in self.params.values())
        itemsize = first.element_size()
        # Full-kernel columns pushed through J^T J at once: each holds a parameter-sized
        # gradient, its running sum and a transient copy (~3 P words); half the budget.
        total_cols = n_columns * (n_outputs if output == "trace" else 1)
        self.col_chunk = int(max(1, min(total_cols, (budget // 2) // (3 * n_params * itemsize))))
        if block_size is None:
            act = _per_example_bytes(self.f, self.params, x)
            # forward activations of a block plus a vmapped backward / tangent pass per column
            per_example = 3 * (self.col_chunk + 1) * act
            block_size = int(max(1, min(self.n, (budget // 2) // per_example)))
        self.block_size = block_size
        self.blocks = [slice(i, min(i + block_size, self.n)) for i in range(0, self.n, block_size)]

    # -- J^T and J on one block of examples, vmapped over columns ---------------------------
    def _pullback(self, xb: Tensor, cots: Tensor) -> dict[str, Tensor]:
        """``J_b^T c`` for each cotangent in ``cots [c, nb, O]`` -> dict of ``[c, ...]``."""

        def fb(p: dict[str, Tensor]) -> Tensor:
            return self.f(p, xb)

        # torch.func.vjp's return type is a union of the 2- and 3-tuple, not overloaded
        _, pull = vjp(fb, self.params)  # type: ignore[misc]
        (grads,) = vmap(pull)(cots)
        return grads

    def _push(self, xb: Tensor, tangents: dict[str, Tensor]) -> Tensor:
        """``J_b v`` for each parameter-shaped tangent (leading dim ``c``) -> ``[c, nb, O]``."""

        def fb(p: dict[str, Tensor]) -> Tensor:
            return self.f(p, xb)

        def one(t: dict[str, Tensor]) -> Tensor:
            return jvp(fb, (self.params,), (t,))[1]

        return vmap(one)(tangents)

    def _apply_full(self, cots: Tensor) -> Tensor:
        """``K_full`` applied to ``c`` cotangents ``[c, N, O]`` -> ``[c, N, O]``."""
        grads: dict[str, Tensor] | None = None
        for sl in self.blocks:
            g = self._pullback(self.x[sl], cots[:, sl])
            grads = g if grads is None else {k: grads[k] + g[k] for k in grads}
        assert grads is not None
        return torch.cat([self._push(self.x[sl], grads) for sl in self.blocks], dim=1)

    def matmul(self, omega: Tensor) -> Tensor:
        """``K @ omega`` with ``omega`` of shape ``[M, k]`` (``M = N*O`` full, ``N`` trace)."""
        n, n_out, k = self.n, self.n_out, omega.shape[1]
        with ad_safe_backends(self.model):
            if self.output == "full":
                cots = omega.T.reshape(k, n, n_out)
                out = torch.cat(
                    [self._apply_full(cots[i : i + self.col_chunk])
                     for i in range(0, k, self.col_chunk)],
                    dim=0,
                )
                return out.reshape(k, n * n_out).T
            # trace: column (c, o) is the cotangent omega[:, c] e_o^T; keep output o of the result
            out = torch.zeros(k, n, dtype=omega.dtype, device=omega.device)
            total = k * n_out
            for start in range(0, total, self.col_chunk):
                idx = torch.arange(start, min(start + self.col_chunk, total), device=omega.device)
                c_idx, o_idx = idx // n_out, idx % n_out
                rows = torch.arange(idx.numel(), device=omega.device)
                cots = torch.zeros(idx.numel(), n, n_out, dtype=omega.dtype, device=omega.device)
                cots[rows, :, o_idx] = omega[:, c_idx].T
                res = self._apply_full(cots)
                out.index_add_(0, c_idx, res[rows, :, o_idx])
            return out.T


class _FactorOperator:
    """``Omega -> K Omega`` from the structured engine's per-layer factors.

    A layer's per-example gradient is ``G_{b,o} = sum_s d[b,s,o] a[b,s]^T`` (a gather layer's,
    ``G_{b,o}[v] = sum_{s: idx[b,s]=v} d[b,s,o]``), so ``J^T`` of a column is the weighted sum

    .. math::

        M = \\sum_{b,o} \\omega_{b,o} G_{b,o}  \\quad (\\text{full}), \\qquad
        M_o = \\sum_b \\omega_b G_{b,o} \\quad (\\text{trace, one per output}),

    and ``J`` of it is ``<G_{b,o}, M> = sum_s d[b,s,o] . (M a[b,s])``. The deltas ``d`` of a
    block come from one backward pass over the ``O`` outputs shared by every column, where the
    autograd route (:class:`_NTKOperator`) runs a backward and a forward-mode pass through the
    whole model per column and output. The trace kernel's ``O`` matrices ``M_o`` per column are
    what its feature space costs (``K_tr = J~ J~^T`` with ``O P`` features per example).
    """

    def __init__(self, model: nn.Module, x: Tensor, n_outputs: int, output: str,
                 block_size: int | None, max_memory_gb: float | None, n_columns: int) -> None:
        self.engine, _ = _plan(model, at_least_two(x[:2]))
        self.model, self.x, self.n, self.n_out, self.output = model, x, x.shape[0], n_outputs, \
            output
        budget = parse_memory(max_memory_gb)
        itemsize = torch.finfo(self.engine.dtype).bits // 8
        per_output, inputs, _ = _sizes(self.engine)
        n_params = sum(p.numel() for p in self.engine.params.values())
        m = n_outputs if output == "trace" else 1
        # the weighted sums M of every layer for a chunk of columns: a quarter of the budget
        self.col_chunk = int(max(1, min(n_columns, (budget // 4) // (m * n_params * itemsize))))
        factor_bytes = (n_outputs * per_output + inputs) * itemsize
        work_bytes = 2 * self.col_chunk * m * per_output * itemsize
        if block_size is None:
            block_size = int(max(1, min(self.n, (budget // 4) // (factor_bytes + work_bytes))))
        self.block_size = block_size
        self.blocks = [slice(i, min(i + block_size, self.n)) for i in range(0, self.n, block_size)]
        # every block's factors kept when they fit in a quarter of the budget, else recomputed
        self.cache: dict[int, list] | None = ({} if self.n * factor_bytes <= budget // 4
                                              else None)

    def _factors(self, i: int) -> list:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        with ad_safe_backends(self.model):
            f = self.engine.factors(self.x[self.blocks[i]], self.n_out)
        if self.cache is not None:
            self.cache[i] = f
        return f

    def _pull(self, f: TokenFactor | GradFactor, w: Tensor) -> Tensor:
        """This block's part of ``M`` for the columns ``w`` (``[b, c]`` trace, ``[b, O, c]``
        full): ``[c, O, P]`` / ``[c, P]`` (GradFactor), ``[c O p, q]`` / ``[c p, q]`` (dense),
        a ``[q, c O p]`` / ``[q, c p]`` table (gather)."""
        if isinstance(f, GradFactor):
            spec = "bc,boP->coP" if self.output == "trace" else "boc,boP->cP"
            return torch.einsum(spec, w, f.g)
        b, s, o, p = f.d.shape
        if self.output == "trace":   # [b, s, c, o, p]: column c on output o
            wd = (w[:, None, :, None, None] * f.d[:, :, None]).reshape(b * s, -1)
        else:                        # sum over the outputs first: [b, s, c, p]
            wd = torch.einsum("boc,bsop->bscp", w, f.d).reshape(b * s, -1)
        if f.a is not None:
            return wd.T @ f.a.reshape(b * s, -1)
        assert f.idx is not None  # a factor holds a or idx
        idx = f.idx.reshape(-1)
        valid = idx >= 0
        table = wd.new_zeros(f.q, wd.shape[1])
        return table.index_add_(0, idx[valid], wd[valid])

    def _push(self, f: TokenFactor | GradFactor, mat: Tensor, c: int) -> Tensor:
        """``<G_{b,o}, M>`` of this block: ``[b, c]`` (trace) or ``[b, O, c]`` (full)."""
        if isinstance(f, GradFactor):
            spec = "boP,coP->bc" if self.output == "trace" else "boP,cP->boc"
            return torch.einsum(spec, f.g, mat)
        b, s, o, p = f.d.shape
        if f.a is not None:
            y = f.a.reshape(b * s, -1) @ mat.T            # M a for every token and column
        else:
            assert f.idx is not None  # a factor holds a or idx
            idx = f.idx.reshape(-1)
            y = mat[idx.clamp(min=0)] * (idx >= 0).unsqueeze(1).to(mat.dtype)
        if self.output == "trace":
            return torch.einsum("bsop,bscop->bc", f.d, y.view(b, s, c, o, p))
        return torch.einsum("bsop,bscp->boc", f.d, y.view(b, s, c, p))

    def matmul(self, omega: Tensor) -> Tensor:
        """``K @ omega`` with ``omega`` of shape ``[M, k]`` (``M = N*O`` full, ``N`` trace)."""
        n, n_out, k = self.n, self.n_out, omega.shape[1]
        full = self.output == "full"
        w = omega.reshape(n, n_out, k) if full else omega
        out = omega.new_zeros(w.shape)
        with torch.no_grad():
            for c0 in range(0, k, self.col_chunk):
                wc = w[..., c0:c0 + self.col_chunk]
                c = wc.shape[-1]
                mats: list[Tensor] | None = None
                for i, sl in enumerate(self.blocks):
                    parts = [self._pull(f, wc[sl]) for f in self._factors(i)]
                    mats = parts if mats is None else [m.add_(p) for m, p in
                                                       zip(mats, parts, strict=True)]
                assert mats is not None  # at least one block
                for i, sl in enumerate(self.blocks):
                    res = [self._push(f, m, c) for f, m in
                           zip(self._factors(i), mats, strict=True)]
                    out[sl, ..., c0:c0 + c] = torch.stack(res).sum(0)
        return out.reshape(n * n_out, k) if full else out


def lowrank_ntk(
    model: nn.Module,
    x: Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    output: str = "trace",
    seed: int = 0,
    block_size: int | None = None,
    max_memory_gb: float | None = None,
    params: ParamSpec = None,
    method: str = "auto",
) -> tuple[Tensor, Tensor]:
    r"""Top-``rank`` eigenpairs of the empirical NTK on ``x``, without ever forming the kernel.

    Returns ``U, s`` with ``K ~= U diag(s) U^T`` where, with ``J = d f(x) / d theta``,

    - ``output="trace"``: ``K[n, m] = sum_o <d f_o(x_n)/d theta, d f_o(x_m)/d theta>``
      (``K = sum_o J_o J_o^T``), ``U`` is ``[N, rank]``;
    - ``output="full"``: ``K = J J^T`` over all ``(example, output)`` pairs, ``U`` is
      ``[N * O, rank]`` with row ``n * O + o`` for output ``o`` of example ``n`` (so
      ``U.reshape(N, O, rank)`` indexes by example and output, and ``U diag(s) U^T`` matches
      ``ntk(model, x, output="full").permute(0, 2, 1, 3).reshape(N * O, N * O)``).

    The eigenpairs are found by a randomized range finder with ``n_iter`` subspace iterations and a
    Rayleigh-Ritz step (Halko, Martinsson & Tropp 2011), the Neural Fisher Kernel construction of
    Zhang et al. (2021); every product is ``K Omega = J (J^T Omega)``. It costs ``n_iter + 2``
    kernel products, each of ``rank + oversample`` columns. ``method="structured"`` forms them
    from the structured engine's per-layer factors (:class:`_FactorOperator`): one backward pass
    over the outputs per block of examples, shared by every column, then per layer the weighted
    sums of per-example gradients ``J^T Omega`` and their products with the factors.
    ``method="vector"`` runs a vmapped vector-Jacobian product and a vmapped Jacobian-vector
    product per column (and per output for the trace kernel: see the module docstring). Both give
    the same products to round-off. The trace kernel has ``O P`` features per example
    (``K_tr = J~ J~^T``), so either way its product holds ``O`` parameter-sized sums per column.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch ``[N, ...]`` to ``[N]`` or ``[N, O]``; differentiated with respect to its
        trainable parameters at their current values, in its current mode. The model is left
        exactly as it was (parameters, ``.grad``, train/eval mode): everything goes through
        ``torch.func`` on detached parameters.
    x : Tensor
        Inputs ``[N, ...]``; moved to the model's device.
    rank : int
        Number of eigenpairs, ``1 <= rank <= M`` with ``M = N * O`` (full) or ``N`` (trace).
    oversample : int, default 10
        Extra random directions; the subspace has ``min(rank + oversample, M)`` columns.
    n_iter : int, default 2
        Subspace (power) iterations; more sharpen the eigenpairs when the spectrum decays slowly.
    output : {"trace", "full"}
        Which kernel to factorize.
    seed : int, default 0
        Seed of the Gaussian test matrix (results are deterministic given the seed).
    block_size : int, optional
        Examples per block in every forward/backward pass; by default chosen from the memory
        budget and the activations autograd saves for one example.
    max_memory_gb : float, optional
        Memory budget used to choose the column chunk and the block size (default 2 GiB).
    params : optional
        The kernel of a subset of the parameters (names, glob patterns or a predicate), as in
        :func:`telescope.ntk`.
    method : {"auto", "structured", "vector"}
        How each product is formed (above); ``"auto"`` takes ``"structured"`` when every
        parameter is on a per-layer rule (``telescope.kernels.explain`` says), else ``"vector"``
        (a parameter without a rule would need per-example Jacobians).

    Returns
    -------
    U : Tensor
        ``[M, rank]`` orthonormal eigenvectors (the sign of each is fixed so that its entry of
        largest magnitude is positive), in the model's dtype.
    s : Tensor
        ``[rank]`` eigenvalues in descending order, clipped at 0 (``K`` is positive semi-definite).

    Raises
    ------
    UsageError
        For a bad ``rank``, ``output``, ``oversample``, ``n_iter`` or ``block_size``.
    UnsupportedModelError
        For models whose per-example kernel is undefined (BatchNorm or dropout in train mode).

    References
    ----------
    R. Zhang, S. Zhai, E. Littwin, J. Susskind, "Neural Fisher Kernel: Low-rank Approximation
    and Knowledge Distillation", 2021. N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding
    structure with randomness", SIAM Review 53(2), 2011.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with only_params(model, select_params(model, params)):
        return _lowrank_ntk(model, x, rank, oversample=oversample, n_iter=n_iter, output=output,
                            seed=seed, block_size=block_size, max_memory_gb=max_memory_gb,
                            method=method)


def _lowrank_ntk(model: nn.Module, x: Tensor, rank: int, *, oversample: int, n_iter: int,
                 output: str, seed: int, block_size: int | None,
                 max_memory_gb: float | None, method: str) -> tuple[Tensor, Tensor]:
    with ad_safe_backends(model):
        x, _ = checked_call(model, x)
    if output not in _OUTPUTS:
        raise UsageError(f"output must be one of {_OUTPUTS}, got {output!r}")
    if method not in _METHODS:
        raise UsageError(f"method must be one of {_METHODS}, got {method!r}")
    _check_int("oversample", oversample, 0)
    _check_int("n_iter", n_iter, 0)
    _check_int("seed", seed, 0)
    if block_size is not None:
        _check_int("block_size", block_size, 1)

    params = trainable_params(model)
    first = next(iter(params.values()))
    dtype, device = first.dtype, first.device
    x = x.detach().to(device)
    n = x.shape[0]
    with torch.no_grad(), ad_safe_backends(model):
        n_out = batched_fn(model, frozen_state(model))(params, x[:1]).shape[1]
    m = n * n_out if output == "full" else n
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= m:
        raise UsageError(
            f"rank must be an int with 1 <= rank <= {m} (the size of the {output} kernel for "
            f"N={n} examples and O={n_out} outputs), got {rank!r}"
        )
    k = min(rank + oversample, m)

    if method == "auto":
        engine, _ = _plan(model, at_least_two(x[:2]), quiet=True)
        method = "vector" if engine.fallback else "structured"
    operator = _FactorOperator if method == "structured" else _NTKOperator
    op = operator(model, x, n_out, output, block_size, max_memory_gb, k)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(m, k, generator=gen, dtype=dtype).to(device)

    with torch.no_grad():
        q, _ = torch.linalg.qr(op.matmul(omega))
        for _ in range(n_iter):
            q, _ = torch.linalg.qr(op.matmul(q))
        kq = op.matmul(q)
        b = q.T.to(torch.float64) @ kq.to(torch.float64)
        b = 0.5 * (b + b.T)
        evals, evecs = torch.linalg.eigh(b)
        order = torch.argsort(evals, descending=True)[:rank]
        s = evals[order].clamp_min(0.0)
        u = q.to(torch.float64) @ evecs[:, order]
        pivot = u.abs().argmax(dim=0)
        signs = torch.sign(u[pivot, torch.arange(rank, device=u.device)])
        signs[signs == 0] = 1.0
        u = u * signs
    return u.to(dtype).contiguous(), s.to(dtype)
