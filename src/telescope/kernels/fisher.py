r"""The Neural Fisher Kernel (NFK) of a network's log-likelihood: dense, and low rank without
ever forming a parameter-sized matrix.

Zhang, Zhai, Littwin & Susskind (ICLR 2022) apply the Fisher kernel of Jaakkola & Haussler
(1998) to neural networks. With ``ell_theta(x)`` a per-example log-likelihood (or a surrogate of
it, such as a VAE's ELBO) and its *score* ``g(x) = d ell_theta(x) / d theta in R^P``,

.. math::

    K(x, x') = \hat g(x)^T (F + \lambda I)^{-1} \hat g(x'), \qquad
    F = \sum_m \bar w_m \, \hat g(\tilde x_m) \hat g(\tilde x_m)^T, \qquad
    \hat g(x) = g(x) - c,

where

- the **Fisher samples** ``x~_1..x~_M`` (``fisher_x``) with weights ``w_m >= 0``
  (``fisher_weights``, normalized to ``w_bar = w / sum(w)``; uniform by default) define what
  ``F`` estimates: drawn from the data it is the *empirical* Fisher, drawn from the model
  ``p_theta`` (or enumerating a discrete outcome with its model probability as the weight) it is
  the *model* Fisher ``E_{x ~ p_theta}[g g^T]``, the Fisher information proper;
- ``c`` is ``0`` (``center=False``) or the weighted mean score of the Fisher samples
  (``center=True``). For a normalized log-likelihood ``E_{x~p_theta}[g(x)] = 0`` (differentiate
  ``int p_theta = 1``), so under the model Fisher ``c`` only removes Monte Carlo noise. For an
  *unnormalized* one, ``ell = -E_theta(x)`` of an energy-based model ``p = exp(-E) / Z``, the true
  score is ``-dE/dtheta - d log Z / d theta = -dE/dtheta + E_{p_theta}[dE/dtheta]``: centering on
  samples of ``p_theta`` is exactly the ``log Z`` term, and on data samples it is its usual
  data-side approximation. The paper reads a classifier ``p(y|x) = softmax(f(x))`` as such a
  model (Grathwohl et al. 2020): ``p(x) ~ sum_y exp f_y(x)``, ``ell = logsumexp_y f_y(x)``;
- ``lambda >= 0`` is the **damping** (Tikhonov regularization of ``F``), given absolutely
  (``damping_convention="absolute"``) or as a fraction of the largest eigenvalue of ``F``
  (``"relative"``, scale-free: ``1 / (Lambda_j + lambda) <= 1 / (damping * Lambda_1)``).

**Low rank** (the paper's Section 3.2). With ``R = diag(sqrt(w_bar)) (G - 1 c^T)`` the weighted,
centered scores of the Fisher samples (``M x P``), ``F = R^T R``; its top eigenpairs
``F V_k = V_k Lambda_k`` come from the ``M x M`` Gram matrix ``R R^T = U Lambda U^T`` (the same
non-zero eigenvalues) with ``V_k = R^T U_k Lambda_k^{-1/2}``. The rank-``k`` NFK keeps the damped
inverse on those directions only,

.. math::

    K_k(x, x') = \phi(x)^T \phi(x'), \qquad
    \phi(x) = (\Lambda_k + \lambda)^{-1/2} V_k^T \hat g(x) \in \mathbb{R}^k,

the NFK's low-rank feature embedding (with ``lambda = 0``: the paper's pseudo-inverse on the top
eigenspace). Nothing of size ``P x P`` or ``M x P`` is formed: ``R R^T Omega`` is a
vector-Jacobian product (``G^T`` applied to columns of ``Omega``) followed by a Jacobian-vector
product (``G`` applied to parameter-shaped vectors), both ``vmap``-ped over columns, inside a
randomized range finder with subspace iteration and a Rayleigh-Ritz step (Halko, Martinsson &
Tropp 2011), as :func:`telescope.lowrank_ntk` does for the NTK; then ``V_k^T g(x)`` for any ``x``
is one more vector-Jacobian product (``W = R^T U_k``) and a Jacobian-vector product per block of
``x``.

Two facts worth knowing (both tested):

- on the Fisher samples themselves (uniform weights, ``lambda = 0``) ``phi(x~_m) = sqrt(M) U_k[m]``:
  the features are *white*, ``Phi^T Phi / M = I_k`` (with ``center=True`` also mean zero), so the
  low-rank NFK of the empirical Fisher is the top-``k`` eigenvectors of the score Gram matrix,
  each rescaled to unit variance; damping shrinks direction ``j`` by
  ``(Lambda_j / (Lambda_j + lambda))^{1/2}`` and changes no eigenvector. (For the dense kernel
  ``lambda K_lambda -> g_hat^T g_hat'``, the eNTK of the log-likelihood, as ``lambda -> inf``.)
- ``K_k -> K`` as ``k -> rank F``, exactly, wherever ``g_hat(x)`` lies in the span of the Fisher
  samples' scores (always when ``F`` is invertible, ``P <= M``; on the Fisher samples always).
  With ``P > M`` and ``lambda > 0`` the dense kernel also holds ``lambda^{-1} g_hat^T (I - V V^T)
  g_hat'`` from the directions no Fisher sample reaches, which no low-rank form of ``F`` has.

**Dense** (:func:`fisher_kernel`, small models): per-example scores by ``vmap(jacrev)``, then in
float64 either the primal form (``P <= M``: the eigendecomposition of the ``P x P`` ``F``) or,
for ``P > M`` and ``lambda > 0``, the Woodbury identity
``(R^T R + lambda I)^{-1} = lambda^{-1} (I - R^T (lambda I + R R^T)^{-1} R)``, which needs only
``M x M`` and ``N x M`` Gram matrices.

References
----------
.. [1] R. Zhang, S. Zhai, E. Littwin, J. Susskind. "Learning Representation from Neural Fisher
   Kernel with Low-rank Approximation." ICLR 2022 (arXiv:2202.01944; an earlier version is
   arXiv:2106.13087, "Neural Fisher Kernel: Low-rank Approximation and Knowledge Distillation").
.. [2] T. Jaakkola, D. Haussler. "Exploiting generative models in discriminative classifiers."
   NeurIPS 1998.
.. [3] W. Grathwohl et al. "Your classifier is secretly an energy based model and you should treat
   it like one." ICLR 2020.
.. [4] N. Halko, P.-G. Martinsson, J. A. Tropp. "Finding structure with randomness." SIAM Review
   53(2), 2011.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from telescope.errors import UsageError
from telescope.kernels._blocks import per_example_jacobian
from telescope.kernels._functional import (
    ParamSpec,
    ad_safe_backends,
    batched_fn,
    check_input,
    checked_call,
    frozen_state,
    only_params,
    parse_memory,
    select_params,
    single_fn,
    trainable_params,
)
from telescope.kernels.lowrank import _check_int, _per_example_bytes

__all__ = ["fisher_kernel", "lowrank_fisher_kernel", "fisher_information", "LogLikelihood",
           "logsumexp_log_likelihood", "DAMPING_CONVENTIONS"]

LogLikelihood = Callable[[nn.Module, Tensor], Tensor]
"""``log_likelihood(model, x) -> [N]``: the per-example log-likelihood of a batch ``x``."""

DAMPING_CONVENTIONS = ("absolute", "relative")


def logsumexp_log_likelihood(model: nn.Module, x: Tensor) -> Tensor:
    r"""``logsumexp_y f_y(x)`` ``[N]`` for a classifier with logits ``f(x) [N, C]``: its
    energy-based reading ``p_theta(x) = sum_y exp f_y(x) / Z(theta)`` (Grathwohl et al. 2020), up
    to ``log Z``. Use it with ``center=True``, which supplies the ``-d log Z / d theta`` term (see
    the module docstring). Its score is ``J(x)^T softmax(f(x))``, the logits' Jacobian weighted by
    the predicted class probabilities, and needs no label."""
    logits = model(x)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise UsageError(f"logsumexp_log_likelihood needs logits of shape [N, C], got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits)}")
    return torch.logsumexp(logits, dim=1)


# --------------------------------------------------------------------------- arguments


class _LogLikelihoodOf(nn.Module):
    """``x -> log_likelihood(model, x)`` (or ``model(x)``) as a module, so that the kernel
    plumbing (checks, ``functional_call``, blocks) treats the log-likelihood as the output."""

    def __init__(self, model: nn.Module, fn: LogLikelihood | None) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x) if self.fn is None else self.fn(self.model, x)
        if not isinstance(out, Tensor):
            raise UsageError(f"the log-likelihood must be a Tensor [N], got {type(out).__name__}")
        if out.ndim == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.ndim != 1 or out.shape[0] != x.shape[0]:
            what = "model(x)" if self.fn is None else "log_likelihood(model, x)"
            raise UsageError(
                f"{what} must give one log-likelihood per example, shape [N] (or [N, 1]) for "
                f"a batch of N={x.shape[0]}, got {tuple(out.shape)}: pass log_likelihood= "
                "a function (model, x) -> [N] (e.g. lambda m, x: torch.logsumexp(m(x), 1) for "
                "a classifier's logits)")
        return out


def _check_damping(damping: object, convention: object) -> float:
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise UsageError(f"damping must be a number >= 0 (the lambda of (F + lambda I)^-1), got "
                         f"{damping!r}")
    value = float(damping)
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"damping must be a finite number >= 0, got {damping!r}")
    if convention not in DAMPING_CONVENTIONS:
        raise UsageError(f"damping_convention must be one of {DAMPING_CONVENTIONS} ('absolute': "
                         f"lambda = damping; 'relative': lambda = damping * the largest "
                         f"eigenvalue of F), got {convention!r}")
    return value


def _check_rcond(rcond: object, m: int, dtype: torch.dtype) -> float:
    if rcond is None:
        return m * torch.finfo(dtype).eps
    if isinstance(rcond, bool) or not isinstance(rcond, numbers.Real) or not (
            math.isfinite(float(rcond)) and 0 <= float(rcond) < 1):
        raise UsageError(f"rcond must be a number in [0, 1) (eigenvalues of F at most rcond times "
                         f"the largest count as zero), got {rcond!r}")
    return float(rcond)


def _weights(fisher_weights: Tensor | None, m: int, center: bool) -> Tensor:
    """Normalized float64 weights ``w_bar`` of the ``m`` Fisher samples (CPU)."""
    if not isinstance(center, bool):
        raise UsageError(f"center must be True or False, got {center!r}")
    if fisher_weights is None:
        w = torch.full((m,), 1.0 / m, dtype=torch.float64)
    else:
        if not isinstance(fisher_weights, Tensor) or fisher_weights.shape != (m,):
            shape = tuple(fisher_weights.shape) if isinstance(fisher_weights, Tensor) else None
            raise UsageError(f"fisher_weights must be a Tensor of shape [M] = ({m},), one "
                             f"weight per Fisher sample, got {shape or type(fisher_weights)}")
        w = fisher_weights.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise UsageError("fisher_weights must be finite and >= 0 with a positive sum")
        w = w / w.sum()
    positive = int((w > 0).sum())
    if center and positive < 2:
        raise UsageError(f"center=True needs at least 2 Fisher samples with positive weight, got "
                         f"{positive}: the centered Fisher of one sample is 0")
    return w


def _prepare(model: nn.Module, log_likelihood: LogLikelihood | None, xs: dict[str, Tensor]
             ) -> tuple[nn.Module, dict[str, Tensor]]:
    """The log-likelihood module, with every input checked and moved to the model's device."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if log_likelihood is not None and not callable(log_likelihood):
        raise UsageError(f"log_likelihood must be a function (model, x) -> [N], got "
                         f"{type(log_likelihood).__name__}")
    ll = _LogLikelihoodOf(model, log_likelihood)
    out: dict[str, Tensor] = {}
    first = None
    for name, x in xs.items():
        check_input(name, x)
        if first is not None and x.shape[1:] != first.shape[1:]:
            raise UsageError(f"{name} must have the per-example shape of the other inputs, "
                             f"{tuple(first.shape[1:])}, got {tuple(x.shape[1:])}")
        first = x if first is None else first
        with ad_safe_backends(model):
            out[name], _ = checked_call(ll, x)
    return ll, out


def _absolute_damping(damping: float, convention: str, top: float) -> float:
    return damping * top if convention == "relative" else damping


# --------------------------------------------------------------------------- dense


def _scores(ll: nn.Module, x: Tensor, block: int = 256) -> Tensor:
    """Per-example scores ``[N, P]`` in float64 (``vmap(jacrev)`` over blocks)."""
    f = single_fn(ll, frozen_state(ll))
    params = trainable_params(ll)
    rows = []
    with ad_safe_backends(ll):
        for i in range(0, x.shape[0], block):
            rows.append(per_example_jacobian(f, params, x[i:i + block], owner=ll)[:, 0, :]
                        .to(torch.float64))
    return torch.cat(rows)


def _check_dense_memory(p: int, rows: int, primal: bool, max_memory_gb: float | None) -> None:
    need = 8 * (rows * p + (3 * p * p if primal else 0))
    budget = parse_memory(max_memory_gb)
    if need > budget:
        raise UsageError(
            f"the dense Fisher kernel needs about {need / 2**30:.2g} GiB (per-example scores of "
            f"{rows} inputs x {p} parameters{', and the P x P Fisher' if primal else ''}) but "
            f"max_memory_gb allows {budget / 2**30:.2g} GiB: use lowrank_fisher_kernel, which "
            "forms nothing parameter-sized per example, or raise max_memory_gb")


def fisher_information(
    model: nn.Module,
    x: Tensor,
    *,
    log_likelihood: LogLikelihood | None = None,
    weights: Tensor | None = None,
    center: bool = False,
    params: ParamSpec = None,
    max_memory_gb: float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The dense Fisher matrix of a log-likelihood over samples ``x``, and the mean score.

    ``F = sum_m w_bar_m (g_m - c)(g_m - c)^T`` with ``g_m = d ell(x_m) / d theta``, ``w_bar`` the
    normalized ``weights`` (uniform by default) and ``c`` the mean score ``sum_m w_bar_m g_m``
    when ``center`` (else ``0``). With ``x`` drawn from the model (or a discrete outcome
    enumerated with weights equal to its model probabilities) this is the Fisher information
    ``E_{p_theta}[g g^T]`` and the returned mean score estimates ``E_{p_theta}[g] = 0``, which holds
    exactly for a normalized log-likelihood: a check of the normalization. With ``x`` the data it
    is the empirical Fisher (see the module docstring).

    Parameters
    ----------
    model, log_likelihood, params :
        As in :func:`fisher_kernel`.
    x : Tensor
        The samples ``[M, ...]``.
    weights : Tensor, optional
        ``[M]`` non-negative weights (normalized here).
    center : bool, default False
        Subtract the mean score before forming ``F``.
    max_memory_gb : float, optional
        Budget for the ``M x P`` scores and the ``P x P`` matrix (default 2 GiB).

    Returns
    -------
    F : Tensor
        ``[P, P]`` float64, parameters flattened in ``named_parameters`` order (trainable ones,
        or those ``params`` selects), each parameter row-major.
    mean_score : Tensor
        ``[P]`` float64, ``sum_m w_bar_m g_m`` (before any centering).
    """
    with only_params(model, select_params(model, params)):
        ll, xs = _prepare(model, log_likelihood, {"x": x})
        m = xs["x"].shape[0]
        w = _weights(weights, m, center)
        p = sum(t.numel() for t in trainable_params(ll).values())
        _check_dense_memory(p, m, True, max_memory_gb)
        g = _scores(ll, xs["x"]).cpu()
    mean = w @ g
    r = w.sqrt()[:, None] * (g - mean if center else g)
    return r.T @ r, mean


def fisher_kernel(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    damping: float,
    damping_convention: str = "absolute",
    log_likelihood: LogLikelihood | None = None,
    fisher_x: Tensor | None = None,
    fisher_weights: Tensor | None = None,
    center: bool = False,
    rcond: float | None = None,
    params: ParamSpec = None,
    max_memory_gb: float | None = None,
) -> Tensor:
    r"""The Neural Fisher Kernel ``K(x, x') = g_hat(x)^T (F + lambda I)^{-1} g_hat(x')``, dense and
    exact (Zhang et al. 2022; see the module docstring for every symbol).

    For models small enough to hold the per-example scores (``[N, P]``): the result is computed
    in float64, through the ``P x P`` Fisher when ``P <= M`` Fisher samples and through the
    Woodbury identity (``M x M`` and ``N x M`` Gram matrices only) otherwise.

    Parameters
    ----------
    model : torch.nn.Module
        The network, differentiated with respect to its trainable parameters at their current
        values in its current mode; left exactly as it was.
    x1, x2 : Tensor
        Inputs ``[N1, ...]`` and ``[N2, ...]`` (``x2=None``: ``x1``).
    damping : float
        ``>= 0``, the Tikhonov damping of ``F`` in ``damping_convention``. ``0`` needs an
        invertible ``F`` (``P <= M`` and full rank); else the error says so.
    damping_convention : {"absolute", "relative"}
        ``lambda = damping``, or ``lambda = damping * Lambda_1`` (the largest eigenvalue of ``F``).
    log_likelihood : callable, optional
        ``(model, x) -> [N]``, the per-example log-likelihood (e.g. ``lambda m, x:
        torch.logsumexp(m(x), 1)``, the energy-based reading of a classifier). ``None``:
        ``model(x)`` itself returns it (``[N]`` or ``[N, 1]``).
    fisher_x : Tensor, optional
        The Fisher samples ``[M, ...]`` (default ``x1``): data for the empirical Fisher, samples
        of the model for the Fisher information.
    fisher_weights : Tensor, optional
        ``[M]`` weights of the Fisher samples, ``>= 0`` (normalized; default uniform).
    center : bool, default False
        Subtract the Fisher samples' weighted mean score from every score (the ``log Z`` term of
        an unnormalized log-likelihood).
    rcond : float, optional
        With ``damping=0``: eigenvalues of ``F`` at most ``rcond * Lambda_1`` make ``F`` count
        as singular (default ``M * eps`` of the model's dtype).
    params : optional
        The kernel of a subset of the parameters (names, glob patterns or a predicate), as in
        :func:`telescope.ntk`.
    max_memory_gb : float, optional
        Budget for the scores and Gram matrices (default 2 GiB); past it, a :class:`UsageError`
        points to :func:`lowrank_fisher_kernel`.

    Returns
    -------
    Tensor
        ``[N1, N2]`` in float64.
    """
    damping = _check_damping(damping, damping_convention)
    with only_params(model, select_params(model, params)):
        inputs = {"x1": x1, "fisher_x": x1 if fisher_x is None else fisher_x}
        if x2 is not None:
            inputs["x2"] = x2
        ll, xs = _prepare(model, log_likelihood, inputs)
        m = xs["fisher_x"].shape[0]
        w = _weights(fisher_weights, m, center)
        dtype = next(iter(trainable_params(ll).values())).dtype
        tol = _check_rcond(rcond, m, dtype)
        p = sum(t.numel() for t in trainable_params(ll).values())
        rows = m + xs["x1"].shape[0] + (xs["x2"].shape[0] if x2 is not None else 0)
        primal = p <= m
        _check_dense_memory(p, rows, primal, max_memory_gb)
        gf = _scores(ll, xs["fisher_x"]).cpu()
        g1 = _scores(ll, xs["x1"]).cpu()
        g2 = g1 if x2 is None else _scores(ll, xs["x2"]).cpu()
    c = w @ gf if center else torch.zeros(p, dtype=torch.float64)
    r = w.sqrt()[:, None] * (gf - c)
    h1, h2 = g1 - c, g2 - c
    if primal:
        evals, evecs = torch.linalg.eigh(r.T @ r)
        evals = evals.clamp_min(0.0)
        top = float(evals[-1])
        lam = _absolute_damping(damping, damping_convention, top)
        if lam == 0 and not float(evals[0]) > tol * top:
            raise UsageError(
                f"damping=0 needs an invertible Fisher, but F's smallest eigenvalue is "
                f"{float(evals[0]):.3g} against a largest of {top:.3g} (rcond={tol:.3g}): "
                "set damping > 0, or use lowrank_fisher_kernel, which inverts F on its top "
                "eigen-directions only")
        a1, a2 = h1 @ evecs, h2 @ evecs
        return (a1 / (evals + lam)) @ a2.T
    gram = r @ r.T
    top = float(torch.linalg.eigvalsh(gram)[-1])
    lam = _absolute_damping(damping, damping_convention, top)
    if lam == 0:
        raise UsageError(
            f"damping=0 needs an invertible Fisher, but F = sum of {m} rank-one terms cannot be "
            f"invertible with P={p} > M={m} parameters: set damping > 0, or use "
            "lowrank_fisher_kernel, which inverts F on its top eigen-directions only")
    b1, b2 = h1 @ r.T, h2 @ r.T
    inner = torch.linalg.solve(gram + lam * torch.eye(m, dtype=torch.float64), b2.T)
    return (h1 @ h2.T - b1 @ inner) / lam


# --------------------------------------------------------------------------- low rank


class _ScoreOperator:
    """``G^T c`` (vector-Jacobian products) and ``G v`` (Jacobian-vector products) for the
    per-example scores ``G`` of a log-likelihood module on any batch, in blocks of examples and
    chunks of columns."""

    def __init__(self, ll: nn.Module, probe: Tensor, columns: int, block_size: int | None,
                 max_memory_gb: float | None) -> None:
        self.ll = ll
        f = batched_fn(ll, frozen_state(ll))
        self.f = lambda p, x: f(p, x)[:, 0]
        self.params = trainable_params(ll)
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        budget = parse_memory(max_memory_gb)
        n_params = sum(t.numel() for t in self.params.values())
        # each column holds a parameter-sized vector, its running sum and a copy: ~3 P words
        per_column = 3 * n_params * first.element_size()
        self.chunk = int(max(1, min(columns, (budget // 2) // per_column)))
        if block_size is None:
            per_example = 3 * (self.chunk + 1) * _per_example_bytes(f, self.params, probe)
            block_size = int(max(1, (budget // 2) // per_example))
        self.block = block_size

    def _blocks(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.block, n)) for i in range(0, n, self.block)]

    def pullback(self, x: Tensor, cots: Tensor) -> dict[str, Tensor]:
        """``G(x)^T c`` for each row of ``cots [c, N]`` -> parameter dict of ``[c, ...]``."""
        total: dict[str, Tensor] | None = None
        for sl in self._blocks(x.shape[0]):
            xb = x[sl]
            _, pull = vjp(lambda p, xb=xb: self.f(p, xb), self.params)  # type: ignore[misc]
            (g,) = vmap(pull)(cots[:, sl].contiguous())
            total = g if total is None else {k: total[k] + g[k] for k in total}
        assert total is not None
        return total

    def push(self, x: Tensor, tangents: dict[str, Tensor]) -> Tensor:
        """``G(x) v`` for each parameter-shaped tangent (leading dim ``c``) -> ``[c, N]``."""
        out = []
        for sl in self._blocks(x.shape[0]):
            xb = x[sl]

            def one(t: dict[str, Tensor], xb: Tensor = xb) -> Tensor:
                return jvp(lambda p: self.f(p, xb), (self.params,), (t,))[1]

            out.append(vmap(one)(tangents))
        return torch.cat(out, dim=1)


def lowrank_fisher_kernel(
    model: nn.Module,
    x: Tensor,
    rank: int,
    *,
    damping: float,
    damping_convention: str = "absolute",
    log_likelihood: LogLikelihood | None = None,
    fisher_x: Tensor | None = None,
    fisher_weights: Tensor | None = None,
    center: bool = False,
    oversample: int = 10,
    n_iter: int = 2,
    seed: int = 0,
    rcond: float | None = None,
    block_size: int | None = None,
    max_memory_gb: float | None = None,
    params: ParamSpec = None,
    return_spectrum: bool = False,
) -> Tensor | tuple[Tensor, Tensor, float]:
    r"""The rank-``rank`` Neural Fisher Kernel as features: ``Phi [N, rank]`` with
    ``Phi Phi^T ~= K(x, x)``, matrix-free (Zhang et al. 2022, Section 3.2).

    ``Phi[n] = (Lambda_k + lambda)^{-1/2} V_k^T g_hat(x_n)`` with ``F V_k = V_k Lambda_k`` the top
    ``rank`` eigenpairs of the Fisher ``F`` of the Fisher samples (see the module docstring): the
    damped inverse ``(F + lambda I)^{-1}`` kept on the top eigen-directions of ``F``. The
    eigenpairs are found from the ``M x M`` Gram matrix of the weighted, centered Fisher-sample
    scores by a randomized range finder (``n_iter`` subspace iterations, Rayleigh-Ritz), every
    product a ``vmap``-ped vector-Jacobian product followed by a Jacobian-vector product; the
    features of ``x`` are one more such pair. Nothing ``P x P`` or ``M x P`` is formed. Cost:
    ``n_iter + 2`` Gram products of ``min(rank + oversample, M)`` columns over the Fisher samples,
    plus ``rank`` Jacobian-vector products over ``x``.

    Columns come in descending order of ``Lambda``, so ``Phi[:, :k]`` is the rank-``k``
    approximation for the same eigenpairs. As ``rank -> rank(F)`` the features reproduce
    :func:`fisher_kernel` wherever the scores lie in the span of the Fisher samples' (always for
    an invertible ``F``; see the module docstring for the rest).

    Parameters
    ----------
    model, log_likelihood, fisher_weights, center, params :
        As in :func:`fisher_kernel`. The log-likelihood must be one number per example.
    x : Tensor
        Inputs ``[N, ...]`` whose features are returned.
    rank : int
        ``1 <= rank <= min(P, M')``, ``M'`` the Fisher samples with positive weight (minus one
        with ``center=True``); and no larger than the numerical rank of ``F`` (``rcond``), past
        which the eigen-directions are numerical noise.
    damping : float
        ``>= 0``, in ``damping_convention``; ``0`` is the paper's pseudo-inverse on the top
        eigenspace.
    damping_convention : {"absolute", "relative"}
        ``lambda = damping`` or ``lambda = damping * Lambda_1``.
    fisher_x : Tensor, optional
        The Fisher samples ``[M, ...]`` (default ``x``).
    oversample, n_iter, seed :
        The randomized eigensolver: ``oversample`` extra directions, ``n_iter`` subspace
        iterations, the seed of its Gaussian test matrix (results are deterministic given it).
    rcond : float, optional
        Eigenvalues at most ``rcond * Lambda_1`` count as zero (default ``M * eps`` of the
        model's dtype).
    block_size, max_memory_gb :
        Examples per block and the memory budget (default 2 GiB) that sets it and the column
        chunk.
    return_spectrum : bool, default False
        Also return the top ``rank`` eigenvalues of ``F`` and the absolute ``lambda`` used.

    Returns
    -------
    Tensor, or (Tensor, Tensor, float)
        ``Phi [N, rank]`` in the model's dtype (the sign of each column is fixed so that the
        largest-magnitude entry of the Gram eigenvector ``U_k`` is positive); with
        ``return_spectrum``: ``(Phi, Lambda [rank], lambda)``.

    Raises
    ------
    UsageError
        For a bad ``rank`` (too large for the Fisher samples or for the numerical rank of
        ``F``), ``damping``, ``damping_convention``, weights, inputs, or a log-likelihood that is
        not one number per example.
    """
    damping = _check_damping(damping, damping_convention)
    for name, value, low in (("oversample", oversample, 0), ("n_iter", n_iter, 0),
                             ("seed", seed, 0)):
        _check_int(name, value, low)
    if block_size is not None:
        _check_int("block_size", block_size, 1)
    if not isinstance(return_spectrum, bool):
        raise UsageError(f"return_spectrum must be True or False, got {return_spectrum!r}")
    with only_params(model, select_params(model, params)):
        ll, xs = _prepare(model, log_likelihood,
                          {"x": x, "fisher_x": x if fisher_x is None else fisher_x})
        with torch.no_grad(), ad_safe_backends(model):
            return _lowrank(ll, xs["x"], xs["fisher_x"], rank, damping, damping_convention,
                            fisher_weights, center, oversample, n_iter, seed, rcond, block_size,
                            max_memory_gb, return_spectrum)


def _lowrank(ll: nn.Module, x: Tensor, xf: Tensor, rank: int, damping: float, convention: str,
             fisher_weights: Tensor | None, center: bool, oversample: int, n_iter: int,
             seed: int, rcond: float | None, block_size: int | None,
             max_memory_gb: float | None, return_spectrum: bool
             ) -> Tensor | tuple[Tensor, Tensor, float]:
    m = xf.shape[0]
    w64 = _weights(fisher_weights, m, center)
    n_params = sum(t.numel() for t in trainable_params(ll).values())
    limit = min(n_params, int((w64 > 0).sum()) - (1 if center else 0))
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise UsageError(
            f"rank must be an int with 1 <= rank <= {limit} (F has rank at most min(P, M'): "
            f"P={n_params} parameters, M'={int((w64 > 0).sum())} Fisher samples with positive "
            f"weight{', minus one for centering' if center else ''}), got {rank!r}")
    k = min(rank + oversample, m)
    op = _ScoreOperator(ll, xf, k, block_size, max_memory_gb)
    dtype, device = op.dtype, op.device
    tol = _check_rcond(rcond, m, dtype)
    w = w64.to(device, dtype)
    sw = w.sqrt()

    def at(cols: Tensor) -> Tensor:      # A^T = (I - w 1^T) D^{1/2}: [M, c] -> [M, c]
        y = sw[:, None] * cols
        return y - w[:, None] * y.sum(0, keepdim=True) if center else y

    def a(cols: Tensor) -> Tensor:       # A = D^{1/2} (I - 1 w^T)
        return sw[:, None] * (cols - (w @ cols)[None, :] if center else cols)

    def gram(cols: Tensor) -> Tensor:    # R R^T cols = A G G^T A^T cols, chunked over columns
        out = []
        for i in range(0, cols.shape[1], op.chunk):
            tang = op.pullback(xf, at(cols[:, i:i + op.chunk]).T)
            out.append(op.push(xf, tang).T)
        return a(torch.cat(out, dim=1))

    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(m, k, generator=gen, dtype=dtype).to(device)
    q, _ = torch.linalg.qr(gram(omega))
    for _ in range(n_iter):
        q, _ = torch.linalg.qr(gram(q))
    b = q.T.to(torch.float64) @ gram(q).to(torch.float64)
    evals, evecs = torch.linalg.eigh(0.5 * (b + b.T))
    order = torch.argsort(evals, descending=True)[:rank]
    lam_k = evals[order].clamp_min(0.0)
    top = float(lam_k[0])
    if not top > 0:
        raise UsageError("the Fisher is zero: the log-likelihood does not depend on the "
                         "parameters at these Fisher samples")
    small = lam_k <= tol * top
    if bool(small.any()):
        r_num = int((~small).sum())
        raise UsageError(
            f"rank={rank} exceeds the numerical rank of the Fisher: only {r_num} of its top "
            f"{rank} eigenvalues exceed rcond={tol:.3g} times the largest ({top:.3g}); the "
            f"directions past them are numerical noise. Use rank <= {r_num} (or a float64 "
            "model, or more Fisher samples)")
    u = q.to(torch.float64) @ evecs[:, order]
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(rank, device=u.device)])
    signs[signs == 0] = 1.0
    u = (u * signs).to(dtype)
    lam = _absolute_damping(damping, convention, top)
    scale = (lam_k.sqrt() * (lam_k + lam).sqrt()).to(device, dtype)  # sigma_j (Lambda_j+lambda)^1/2
    cols = []
    for i in range(0, rank, op.chunk):
        wdir = op.pullback(xf, at(u[:, i:i + op.chunk]).T)   # W = R^T U: [c, params]
        proj = op.push(x, wdir).T                             # <W_j, g(x_n)>: [N, c]
        if center:
            proj = proj - (w @ op.push(xf, wdir).T)[None, :]  # <W_j, c>
        cols.append(proj / scale[i:i + op.chunk])
    phi = torch.cat(cols, dim=1).contiguous()
    if return_spectrum:
        return phi, lam_k.to(dtype), lam
    return phi
