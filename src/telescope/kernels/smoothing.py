"""Kernel smoothers: smoother weights with an explicit ridge convention, effective parameters and
kernel weight norms.

A predictor that is linear in the training labels, ``f(x) = s(x)^T y + c(x)``, is a *linear
smoother* with smoother weights ``s(x)`` (``[n]``, one weight per training label). Kernel ridge
regression with train kernel ``K = K(X, X)`` (``[n, n]``), test kernel ``K_* = K(x_*, X)``
(``[m, n]``) and ridge ``lambda`` is one:

.. math::

    S_* = K_* (K + \\lambda I)^{-1}  \\qquad (\\text{rows } s(x_*)^T,\\ [m, n]),
    \\qquad S = K (K + \\lambda I)^{-1} \\quad \\text{on the training points}.

Codes differ in what they call the ridge; :func:`smoother_weights` takes the convention by name
(``ridge_convention``, no default) and :func:`absolute_ridge` turns it into the ``lambda`` above:

- ``"absolute"``: ``lambda = ridge``, the minimizer of ``sum_i (f(x_i) - y_i)^2 + ridge
  ||f||_H^2`` (scikit-learn's ``KernelRidge(alpha=ridge)``; the ``ridge`` of
  :func:`telescope.kernel_regression`, whose limit ``t -> inf`` is ``K_* (K + ridge I)^{-1}``);
- ``"per_example"``: ``lambda = n * ridge``, the minimizer of ``(1/n) sum_i (f(x_i) - y_i)^2 +
  ridge ||f||_H^2`` (the ridge is per training example);
- ``"relative_trace"``: ``lambda = ridge * tr(K) / n`` (``ridge`` times the mean diagonal of
  ``K``, computed as the float64 mean of the diagonal), which makes ``S`` invariant to a
  rescaling ``K -> a K`` of the kernel (useful for an NTK whose scale changes in training).

With ``lambda = 0`` the inverse is the pseudo-inverse on the range of ``K`` (the minimum-norm
interpolant; ``S = K K^+`` is then the orthogonal projector onto the range of ``K``).

For a kernel too large to decompose, ``smoother_weights(..., solver="cg")`` solves for the
weights of the points of ``k_test`` by conjugate gradients, reading ``K`` (a tensor, an array, a
``numpy.memmap`` or a ``.npy`` path) in row blocks (:mod:`telescope.kernels.solvers`).

From the smoother weights of a set of points ``I`` come (Curth, Jeffares & van der Schaar,
NeurIPS 2023, "A U-turn on double descent: rethinking parameter counting in statistical
learning"; used for networks by Jeffares, Curth & van der Schaar, NeurIPS 2024, "Deep Learning
Through A Telescoping Lens"):

- the *kernel weight norm* of a point, ``||s(x)||_2`` (how much the prediction at ``x`` leans on
  single training labels);
- the *effective parameters* ``p(I) = n / |I| sum_{j in I} ||s(x_j)||^2``. On the training
  points of a kernel ridge smoother this is ``||S||_F^2 = sum_i (d_i / (d_i + lambda))^2`` over
  the eigenvalues ``d_i`` of ``K``: ``n`` for an interpolating smoother with invertible ``K``,
  ``rank K`` at ``lambda = 0``, and it falls as the ridge grows.

Multi-output weights (:class:`telescope.Smoother` with ``O`` outputs) are ``[m, O, n O]``:
``S(x)`` is ``[O, n O]`` and its norm is ``||S(x)||_F / sqrt(O)``, so that ``O`` identical copies
of a single-output model count as one: ``p(I) = n / (|I| O) sum_{j in I} ||S(x_j)||_F^2``.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch
from torch import Tensor

from telescope.errors import UsageError
from telescope.kernels.regression import (
    KernelRegressor,
    _as_matrix,
    _check_scalar,
    _check_solver,
    _eigh_kernel,
)
from telescope.kernels.solvers import (
    KernelLike,
    check_solver_options,
    check_square,
    dense_kernel,
    diagonal_of,
    kernel_dtype,
    solve_kernel_system,
)

__all__ = ["RIDGE_CONVENTIONS", "absolute_ridge", "smoother_weights", "kernel_weight_norms",
           "effective_parameters", "max_kernel_weight_norm"]

RIDGE_CONVENTIONS = ("absolute", "per_example", "relative_trace")

Weights = Tensor | np.ndarray


def _train_kernel(k_train: object) -> Tensor:
    k = _as_matrix(k_train, "k_train")
    check_square(tuple(k.shape), "k_train")
    return k


def absolute_ridge(k_train: KernelLike, ridge: float, ridge_convention: str) -> float:
    """The ``lambda`` of ``S = K_* (K + lambda I)^{-1}`` for a ridge given in a convention.

    .. math::

        \\lambda = \\begin{cases}
            \\mathrm{ridge} & \\text{"absolute"} \\\\
            n \\cdot \\mathrm{ridge} & \\text{"per\\_example"} \\\\
            \\mathrm{ridge} \\cdot \\operatorname{tr}(K) / n & \\text{"relative\\_trace"}
        \\end{cases}

    (see the module docstring for what each convention minimizes).

    Parameters
    ----------
    k_train : Tensor, numpy array, numpy.memmap, str or PathLike
        The train kernel ``K`` ``[n, n]``. A memmap or a ``.npy`` path (a kernel for
        ``smoother_weights(..., solver="cg")``) is not loaded: ``"relative_trace"`` reads its
        diagonal from the file (:func:`telescope.kernels.kernel_diagonal`).
    ridge : float
        ``>= 0``, in the units of ``ridge_convention``.
    ridge_convention : {"absolute", "per_example", "relative_trace"}

    Returns
    -------
    float
        ``lambda >= 0``.
    """
    if ridge_convention not in RIDGE_CONVENTIONS:
        raise UsageError(f"ridge_convention must be one of {RIDGE_CONVENTIONS} (see "
                         f"telescope.kernels.smoothing), got {ridge_convention!r}")
    ridge = _check_scalar(ridge, "ridge", positive=False)
    k: Tensor | None = None
    if isinstance(k_train, Tensor):
        k = _train_kernel(k_train)
        n = k.shape[0]
    else:   # an array, a memmap or a path: its shape from the header, its diagonal streamed
        n = check_square(kernel_dtype(k_train, "k_train")[1], "k_train")
    if ridge_convention == "absolute":
        return ridge
    if ridge_convention == "per_example":
        return n * ridge
    if k is not None:
        scale = float(k.to(torch.float64).diagonal().mean())
    else:
        scale = float(diagonal_of(k_train, "k_train").mean())
    if scale < 0:
        raise UsageError(f"ridge_convention='relative_trace' needs a kernel with a non-negative "
                         f"mean diagonal (a PSD kernel), got tr(K)/n = {scale:.3g}")
    return ridge * scale


def smoother_weights(k_train: KernelLike, k_test: KernelLike | None = None, *, ridge: float,
                     ridge_convention: str, return_train: bool = False,
                     rcond: float | None = None, solver: str = "eigh",
                     solver_options: dict | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Smoother weights of kernel ridge regression, ``S_* = K_* (K + lambda I)^{-1}``.

    ``lambda`` comes from ``ridge`` in the named ``ridge_convention`` (:func:`absolute_ridge`):
    ``"absolute"`` ``lambda = ridge``; ``"per_example"`` ``lambda = n ridge``;
    ``"relative_trace"`` ``lambda = ridge tr(K)/n``. Row ``j`` of the result is ``s(x_j)^T``,
    the weights of test point ``j`` on the ``n`` training labels: kernel ridge regression
    predicts ``f(x_*) = f_0(x_*) + S_* (y - f_0(X))``. With ``lambda = 0`` the inverse is the
    pseudo-inverse on the range of ``K`` (the minimum-norm interpolant).

    Numerics are those of :func:`telescope.kernel_regression` (it is the converged regression
    with the identity as targets): ``K`` is symmetrized, decomposed once in float64
    (``K = V diag(d) V^T``) and eigenvalues ``d_i <= rcond * max |d|`` count as zero; then
    ``S_* = K_* V diag(1 / (d + lambda)) V^T`` and, on the training points, ``S = V diag(d / (d
    + lambda)) V^T`` (zero weight where ``d + lambda = 0``).

    ``solver="cg"`` instead solves ``(K + lambda I) X = K_*^T`` by preconditioned conjugate
    gradients (:func:`telescope.kernels.solve_kernel_system`, the ``m`` columns together) and
    returns ``S_* = X^T``, reading ``K`` in row blocks: for a kernel too large to decompose, e.g.
    a ``.npy`` path or the ``numpy.memmap`` of ``telescope.ntk(..., out=PATH)``, streamed from
    its file. It needs ``k_test`` (the training points' own ``S`` would be ``n`` right-hand
    sides and a dense ``[n, n]`` result: use ``solver="eigh"`` for it) and a positive definite
    ``K + lambda I``. Cost: one pass over ``K`` per iteration (plus one for the Nyström sketch and
    one for the final residual check), for all ``m`` columns at once; memory: one block of ``K``,
    ``K_*`` and about six ``[n, m]`` float64 arrays.

    Parameters
    ----------
    k_train : Tensor, numpy array, numpy.memmap, str or PathLike
        ``K`` ``[n, n]`` between the training points (PSD; one output, e.g. a trace NTK).
        ``solver="eigh"`` takes a tensor only; ``solver="cg"`` also an array, and streams a
        memmap or a ``.npy`` path (C-ordered float16/32/64) from its file.
    k_test : Tensor, numpy array, numpy.memmap, str or PathLike, optional
        ``K_*`` ``[m, n]`` between the points to weigh and the training points. ``None``: the
        weights of the training points themselves, ``S = K (K + lambda I)^{-1}`` ``[n, n]``
        (``solver="eigh"`` only).
    ridge : float
        ``>= 0``, in the units of ``ridge_convention``.
    ridge_convention : {"absolute", "per_example", "relative_trace"}
        Required: how ``ridge`` becomes ``lambda`` (module docstring); ``"relative_trace"``
        reads the diagonal of a kernel file from the file.
    return_train : bool
        With ``k_test``, also return the training points' weights (one decomposition for both;
        ``solver="eigh"`` only).
    rcond : float, optional
        Relative eigenvalue cutoff of ``K`` (default ``n * eps`` of its dtype); ``solver="eigh"``
        only.
    solver : {"eigh", "cg"}
        An eigendecomposition in memory, or conjugate gradients streaming ``K`` (above).
    solver_options : dict, optional
        Only with ``solver="cg"``: keywords of :func:`telescope.kernels.solve_kernel_system`
        (``tol``, default ``1e-8`` on the relative residual of every column of ``K_*^T``;
        ``max_iter``, ``preconditioner``, ``rank``, ``block_rows``, ``max_memory_gb``, ``seed``,
        ``progress``); anything else is refused.

    Returns
    -------
    Tensor or (Tensor, Tensor)
        ``S_*`` ``[m, n]`` (``S`` ``[n, n]`` when ``k_test`` is None), or ``(S_*, S)`` with
        ``return_train=True``; in the floating dtype of ``k_train`` (float64 for an integer
        kernel), computed in float64.

    Raises
    ------
    UsageError
        An unknown convention, a negative or non-finite ridge, a kernel that is not a finite real
        matrix, ``k_test`` without ``n`` columns, ``return_train`` without ``k_test``, an unknown
        solver, options of the other solver.
    telescope.errors.NotConvergedError
        ``solver="cg"`` did not reach ``tol`` within ``max_iter`` iterations (the message names
        the fixes).
    """
    if _check_solver(solver) == "cg":
        return _cg_weights(k_train, k_test, ridge=ridge, ridge_convention=ridge_convention,
                           return_train=return_train, rcond=rcond,
                           solver_options=solver_options)
    if solver_options is not None:
        raise UsageError("solver_options are options of solver='cg' (the iterative solver); "
                         "solver='eigh' takes none: drop them or pass solver='cg'")
    k = _train_kernel(_eigh_kernel(k_train, "k_train"))
    lam = absolute_ridge(k, ridge, ridge_convention)
    n = k.shape[0]
    if k_test is None:
        if return_train:
            raise UsageError("return_train=True needs k_test (with k_test=None the result is "
                             "already the training points' weights)")
    else:
        ks = _as_matrix(_eigh_kernel(k_test, "k_test"), "k_test")
        if ks.shape[1] != n:
            raise UsageError(f"k_test has {ks.shape[1]} columns but k_train has {n} rows: both "
                             f"must index the same n training points (shapes "
                             f"{tuple(ks.shape)} and {tuple(k.shape)})")
    dtype = k.dtype if k.dtype.is_floating_point else torch.float64
    eye = torch.eye(n, dtype=dtype, device=k.device)
    reg = KernelRegressor(k, eye, ridge=lam, rcond=rcond)
    if k_test is None:
        return reg.predict_train()
    test = reg.predict(_eigh_kernel(k_test, "k_test"))
    return (test, reg.predict_train()) if return_train else test


def _cg_weights(k_train: KernelLike, k_test: KernelLike | None, *, ridge: float,
                ridge_convention: str, return_train: bool, rcond: float | None,
                solver_options: dict | None) -> Tensor:
    """:func:`smoother_weights` with ``solver="cg"``: ``S_* = X^T``, ``(K + lambda I) X = K_*^T``
    solved by :func:`solve_kernel_system`."""
    if k_test is None:
        raise UsageError("smoother_weights(solver='cg') needs k_test: the training points' own "
                         "smoother S = K (K + lambda I)^{-1} has n right-hand sides (n solves, a "
                         "dense [n, n] result); use solver='eigh' for it, or pass the points to "
                         "weigh as k_test")
    if return_train:
        raise UsageError("return_train=True is not available with solver='cg' (the training "
                         "points' smoother S has n right-hand sides); use solver='eigh', or pass "
                         "the training kernel itself as k_test")
    if rcond is not None:
        raise UsageError("rcond is the eigenvalue cutoff of solver='eigh'; solver='cg' has no "
                         "cutoff (its accuracy is solver_options['tol']): drop rcond")
    options = check_solver_options(solver_options, "smoother_weights")
    lam = absolute_ridge(k_train, ridge, ridge_convention)
    k_dtype, k_shape = kernel_dtype(k_train, "k_train")
    n = k_shape[0]
    _, ks_shape = kernel_dtype(k_test, "k_test")
    if ks_shape[1] != n:
        raise UsageError(f"k_test has {ks_shape[1]} columns but k_train has {n} rows: both "
                         f"must index the same n training points (shapes {ks_shape} and "
                         f"{k_shape})")
    blocks = {key: options[key] for key in ("block_rows", "max_memory_gb") if key in options}
    rhs = dense_kernel(k_test, "k_test", **blocks).T                  # K_*^T, [n, m]
    x = solve_kernel_system(k_train, rhs, ridge=lam, **options).solution
    dtype = k_dtype if k_dtype.is_floating_point else torch.float64
    return x.T.to(dtype).contiguous()


def _outputs(shape: tuple[int, ...], name: str) -> int:
    """The number of outputs ``O`` of ``[m, n]`` (1) or ``[m, O, n O]`` weights."""
    if len(shape) == 2:
        return 1
    if len(shape) == 3 and shape[1] >= 1 and shape[2] % shape[1] == 0:
        return shape[1]
    raise UsageError(f"{name} must be smoother weights [m, n] or [m, O, n O] (O outputs, "
                     f"as telescope.Smoother.weights gives), got shape {shape}")


def _weights(weights: object, name: str) -> tuple[Weights, int]:
    if isinstance(weights, Tensor):
        if weights.is_complex() or not (weights.is_floating_point()):
            raise UsageError(f"{name} must be real floating-point weights, got {weights.dtype}")
        return weights.detach(), _outputs(tuple(weights.shape), name)
    try:
        s = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise UsageError(f"{name} must be a torch.Tensor or an array of real numbers, got "
                         f"{type(weights).__name__} ({err})") from None
    return s, _outputs(s.shape, name)


def _rows(weights: Weights, name: str) -> None:
    if weights.shape[0] == 0:
        raise UsageError(f"{name} has no rows: need the weights of at least one point")


@overload
def kernel_weight_norms(weights: Tensor) -> Tensor: ...
@overload
def kernel_weight_norms(weights: np.ndarray) -> np.ndarray: ...
def kernel_weight_norms(weights: Weights) -> Weights:
    """Kernel weight norm ``||s(x)||_2`` of every point (row) of smoother weights.

    For ``[m, O, n O]`` multi-output weights it is ``||S(x)||_F / sqrt(O)`` (module docstring).
    A ``torch.Tensor`` gives a tensor ``[m]`` (its dtype and device), anything else (a numpy
    array, nested lists) a float64 numpy array ``[m]``.
    """
    s, o = _weights(weights, "weights")
    if isinstance(s, Tensor):
        return s.flatten(1).norm(dim=1) / o ** 0.5
    return np.linalg.norm(s.reshape(s.shape[0], -1), axis=1) / o ** 0.5


def effective_parameters(weights: Weights) -> float:
    """Effective parameters ``p(I) = n / |I| sum_{j in I} ||s(x_j)||^2`` of the rows given.

    ``weights`` are the smoother weights ``s(x_j)`` of the points ``j in I``, ``[|I|, n]``, or
    ``[|I|, O, n O]`` for ``O`` outputs, where ``p(I) = n / (|I| O) sum_j ||S(x_j)||_F^2``
    (Curth, Jeffares & van der Schaar 2023; Jeffares, Curth & van der Schaar 2024). Computed as
    ``n * mean(kernel_weight_norms(weights) ** 2)``, in the library of the input (torch or
    numpy).
    """
    s, o = _weights(weights, "weights")
    _rows(s, "weights")
    w = kernel_weight_norms(s)
    return float(s.shape[-1] // o * (w**2).mean())


def max_kernel_weight_norm(weights: Weights, train_weights: Weights | None = None, *,
                           normalize: bool = True) -> float:
    """Largest kernel weight norm over the rows of ``weights``, divided by the largest over the
    training points' weights ``train_weights`` when ``normalize``: how much more any one point
    leans on single training labels than the training points themselves do."""
    s, _ = _weights(weights, "weights")
    _rows(s, "weights")
    top = float(kernel_weight_norms(s).max())
    if not normalize:
        return top
    if train_weights is None:
        raise UsageError("normalize=True needs train_weights, the smoother weights of the "
                         "training points (or pass normalize=False)")
    t, _ = _weights(train_weights, "train_weights")
    _rows(t, "train_weights")
    return top / float(kernel_weight_norms(t).max())
