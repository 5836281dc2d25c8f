"""Kernel-regression predictions of gradient flow with a fixed kernel (the NTK-theory prediction),
and of gradient descent with discrete steps.

Convention
----------
Training points ``x_1..x_n`` with targets ``y_i`` (``[n]`` or ``[n, O]``), a fixed kernel ``K``
(``[n, n]``, e.g. an empirical or infinite-width NTK), the initial function ``f_0`` and a
linearized model ``f(x) = f_0(x) + <grad f_0(x), theta - theta_0>`` trained by gradient flow
``d theta / dt = -lr * grad L`` on

.. math::

    L(\\theta) = \\frac{1}{2n} \\sum_{i=1}^n \\lVert f(x_i) - y_i \\rVert^2
        + \\frac{\\lambda}{2n} \\lVert \\theta - \\theta_0 \\rVert^2 ,

i.e. ``0.5 * mean_i ||f(x_i) - y_i||^2`` (mean over training points, sum over outputs) plus a
ridge term ``lambda = ridge`` that is divided by ``n`` like the data term, so that the
minimizer is the textbook kernel ridge regressor. Writing ``K`` for the train kernel and
``r = y - f_0(X)`` for the initial residual, the function moves by

.. math::

    \\frac{d f_t(X)}{dt} = -\\frac{\\mathrm{lr}}{n}\\big[K (f_t(X) - y) + \\lambda (f_t(X) - f_0(X))
    \\big],

and the closed-form solution at time ``t`` (Jacot et al. 2018; Lee et al. 2019, eq. 9) is

.. math::

    f_t(x_*) = f_0(x_*) + K_* (K + \\lambda I)^{-1}
        \\big(I - e^{-\\mathrm{lr}\\, t\\, (K + \\lambda I)/n}\\big)\\, r ,
    \\qquad
    f_t(X) = f_0(X) + K (K + \\lambda I)^{-1}
        \\big(I - e^{-\\mathrm{lr}\\, t\\, (K + \\lambda I)/n}\\big)\\, r .

At ``t = infinity`` this is kernel ridge regression ``f_0(x_*) + K_* (K + lambda I)^{-1} r``; with
``ridge = 0`` the inverse is the pseudo-inverse on the range of ``K`` (gradient flow never moves
the null space of ``K``), i.e. the minimum-RKHS-norm interpolant ``f_0(x_*) + K_* K^+ r``.
Multi-output targets share the kernel: every output column evolves independently with the
same ``K`` (the trace kernel of an ``[N, O]`` model is ``K ⊗ I_O`` under this assumption).
Only the product ``lr * t`` matters: gradient descent with step ``lr`` for ``s`` steps is
approximated by ``t = s`` (the time unit is one step of size ``lr``), or equivalently by
``lr=1, t = s * lr``; gradient flow is the ``lr -> 0`` limit at fixed ``lr * t``.

Numerics: one symmetric eigendecomposition ``K = V diag(s) V^T`` (in float64) serves every
``t``; eigenvalues ``s_i <= rcond * max_j |s_j|`` are treated as exactly zero (the null space).

Discrete steps
--------------
:func:`kernel_descent` is the same linearized model (without the ridge term) trained by
gradient *descent* with step ``lr``: with the residual ``r_s = f_s(X) - y`` after ``s`` steps,

.. math::

    f_{s+1}(X) = f_s(X) - \\frac{\\mathrm{lr}}{n} K r_s , \\qquad
    f_{s+1}(x_*) = f_s(x_*) - \\frac{\\mathrm{lr}}{n} K_* r_s

(Lee et al. 2019, the discrete form of their eq. 9), exact for a network's linearization trained
by full-batch gradient descent. Gradient flow is its limit ``lr -> 0`` at fixed ``lr * s``; at a
finite step an eigenmode of ``K`` (eigenvalue ``lambda``, ``u = lr lambda / n``) keeps ``(1 -
u)^s`` of its residual under descent and ``exp(-u s)`` under flow, which differ by order one early
in training unless ``u`` is small (and descent diverges for ``u > 2``).
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from telescope.errors import UsageError
from telescope.kernels.solvers import (
    KernelLike,
    check_real,
    check_solver_options,
    check_square,
    kernel_dtype,
    kernel_matmul,
    solve_kernel_system,
)

__all__ = ["KernelRegressor", "kernel_regression", "kernel_descent", "SOLVERS"]

SOLVERS = ("eigh", "cg")
"""``solver=`` of :func:`kernel_regression` and :func:`telescope.kernels.smoother_weights`: one
eigendecomposition in memory, or conjugate gradients streaming the kernel
(:func:`telescope.kernels.solve_kernel_system`)."""

TimeLike = float | int | Sequence[float] | Tensor | None
StepsLike = int | Sequence[int] | Tensor


def _as_matrix(k: object, name: str) -> Tensor:
    if not isinstance(k, Tensor):
        raise UsageError(f"{name} must be a torch.Tensor, got {type(k).__name__}")
    if k.dim() != 2:
        raise UsageError(f"{name} must be a 2-D matrix, got shape {tuple(k.shape)}")
    if k.is_complex():
        raise UsageError(f"{name} must be real, got dtype {k.dtype}")
    if not bool(torch.isfinite(k).all()):
        raise UsageError(f"{name} contains NaN or infinite values")
    return k.detach()


def _check_solver(solver: object) -> str:
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise UsageError(f"solver must be one of {SOLVERS} (an eigendecomposition in memory, or "
                         f"conjugate gradients streaming the kernel), got {solver!r}")
    return solver


def _eigh_kernel(k: object, name: str) -> Tensor:
    """A kernel for ``solver="eigh"``, which takes tensors only (as it always has): a path or a
    ``numpy.memmap`` is refused with the way to stream it (``solver="cg"``) or load it."""
    if isinstance(k, Tensor):
        return k
    if isinstance(k, (str, os.PathLike, np.memmap)):
        what = f"the path {str(k)!r}" if isinstance(k, (str, os.PathLike)) else (
            f"a numpy.memmap of {k.filename}")
        raise UsageError(f"{name} must be a torch.Tensor for solver='eigh' (which decomposes the "
                         f"kernel in memory), got {what}: pass solver='cg' to stream it from its "
                         f"file, or load it (torch.from_numpy(np.load(path)))")
    raise UsageError(f"{name} must be a torch.Tensor, got {type(k).__name__}")


def _as_targets(y: object, name: str, rows: int, rows_name: str, outputs: int | None) -> Tensor:
    """Validate ``[rows]`` or ``[rows, O]`` targets and return them as float64 ``[rows, O]``."""
    if not isinstance(y, Tensor):
        raise UsageError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() not in (1, 2):
        raise UsageError(f"{name} must have shape [{rows_name}] or [{rows_name}, O], got "
                         f"shape {tuple(y.shape)}")
    if y.shape[0] != rows:
        raise UsageError(f"{name} has {y.shape[0]} rows (shape {tuple(y.shape)}) but "
                         f"{rows_name} = {rows}")
    y2 = (y if y.dim() == 2 else y.unsqueeze(1)).detach().to(torch.float64)
    if outputs is not None and y2.shape[1] != outputs:
        raise UsageError(f"{name} has {y2.shape[1]} output(s) (shape {tuple(y.shape)}) but "
                         f"y_train has {outputs}")
    if not bool(torch.isfinite(y2).all()):
        raise UsageError(f"{name} contains NaN or infinite values")
    return y2


def _check_scalar(value: object, name: str, *, positive: bool) -> float:
    """A finite real ``> 0`` (``positive``) or ``>= 0``."""
    return check_real(value, name, low=0.0, low_ok=not positive)


def _as_times(t: TimeLike) -> tuple[Tensor, bool]:
    """Times as float64 ``[T]`` (``inf`` = converged) and whether a single time was given."""
    if t is None:
        return torch.tensor([math.inf], dtype=torch.float64), True
    if isinstance(t, bool):
        raise UsageError("t must be a number, a 1-D sequence/tensor of numbers, or None")
    if isinstance(t, numbers.Real):
        times, single = torch.tensor([float(t)], dtype=torch.float64), True
    else:
        try:
            if isinstance(t, Tensor):
                times = t.detach().to(device="cpu", dtype=torch.float64)
            else:  # parse Python numbers in float64 (the default float32 would round them)
                times = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise UsageError(
                f"t must be a number, a 1-D sequence/tensor of numbers, or None, got {t!r}"
            ) from err
        if times.dim() > 1:
            raise UsageError(f"t must be a scalar or 1-D, got shape {tuple(times.shape)}")
        single = times.dim() == 0
        times = times.reshape(-1)
    if bool(torch.isnan(times).any()):
        raise UsageError("t contains NaN")
    if bool((times < 0).any()):
        raise UsageError(f"t must be >= 0, got {times.tolist()}")
    return times, single


def _as_steps(steps: StepsLike) -> tuple[list[int], bool]:
    """Step counts as a non-empty list of ints ``>= 0`` and whether a single count was given."""
    usage = "steps must be an int, or a 1-D sequence/tensor of ints"
    if isinstance(steps, bool):
        raise UsageError(f"{usage}, got {steps!r}")
    if isinstance(steps, (int, numbers.Integral)):  # int too: narrows the type for mypy
        values, single = [int(steps)], True
    elif isinstance(steps, Tensor):
        if steps.dtype == torch.bool or steps.is_floating_point() or steps.is_complex():
            raise UsageError(f"{usage}, got a tensor of dtype {steps.dtype}")
        if steps.dim() > 1:
            raise UsageError(f"steps must be a scalar or 1-D, got shape {tuple(steps.shape)}")
        values, single = [int(v) for v in steps.reshape(-1).tolist()], steps.dim() == 0
    else:
        try:
            values = list(steps)
        except TypeError as err:
            raise UsageError(f"{usage}, got {steps!r}") from err
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
            raise UsageError(f"{usage}, got {steps!r}")
        values, single = [int(v) for v in values], False
    if not values:
        raise UsageError("steps is empty: give at least one step count")
    if min(values) < 0:
        raise UsageError(f"steps must be >= 0, got {values}")
    return values, single


def _as_initial(f0: object, name: str, y_train: Tensor, rows: int, rows_name: str,
                outputs: int) -> Tensor:
    """Validate an initial function shaped like ``y_train`` with ``rows`` rows: float64
    ``[rows, O]``."""
    if not isinstance(f0, Tensor):
        raise UsageError(f"{name} must be a torch.Tensor, got {type(f0).__name__}")
    vector = y_train.dim() == 1
    if f0.dim() != y_train.dim():
        raise UsageError(f"{name} must have shape [{rows_name}{'' if vector else ', O'}] like "
                         f"y_train (shape {tuple(y_train.shape)}), got shape {tuple(f0.shape)}")
    return _as_targets(f0, name, rows, rows_name, outputs)


def _as_initial_train(f0_train: object, y_train: Tensor, n: int, outputs: int) -> Tensor:
    """Validate the initial function on the training points (the shape of ``y_train``): float64
    ``[n, O]``."""
    if not isinstance(f0_train, Tensor):
        raise UsageError(f"f0_train must be a torch.Tensor, got {type(f0_train).__name__}")
    if f0_train.shape != y_train.shape:
        raise UsageError(f"f0_train must have the shape of y_train {tuple(y_train.shape)}"
                         f", got {tuple(f0_train.shape)}")
    return _as_targets(f0_train, "f0_train", n, "n", outputs)


class KernelRegressor:
    """Gradient-flow kernel regression with a cached eigendecomposition of the train kernel.

    Solves the linear ODE of the module docstring once, in the eigenbasis of ``K``, so that
    predictions at many times and test sets cost one ``[m, n] x [n, n]`` product plus
    ``O(T m n O)``.

    Parameters
    ----------
    k_train_train : Tensor
        Train kernel ``K`` ``[n, n]`` (symmetrized as ``(K + K^T)/2``; should be PSD).
    y_train : Tensor
        Targets ``[n]`` or ``[n, O]``.
    f0_train : Tensor, optional
        Initial function on the training points, same shape as ``y_train`` (default 0).
    lr : float
        Learning rate (``> 0``); time is measured in units of steps of size ``lr``.
    ridge : float
        Ridge ``lambda >= 0`` of the module docstring (converges to ``K_*(K + lambda I)^{-1} r``).
    rcond : float, optional
        Relative cutoff below which eigenvalues of ``K`` count as zero (default
        ``n * eps(dtype of K)``).
    """

    def __init__(
        self,
        k_train_train: Tensor,
        y_train: Tensor,
        *,
        f0_train: Tensor | None = None,
        lr: float = 1.0,
        ridge: float = 0.0,
        rcond: float | None = None,
    ) -> None:
        k = _as_matrix(k_train_train, "k_train_train")
        n = check_square(tuple(k.shape), "k_train_train")
        self.n = n
        self.lr = _check_scalar(lr, "lr", positive=True)
        self.ridge = _check_scalar(ridge, "ridge", positive=False)
        y = _as_targets(y_train, "y_train", n, "n", None)
        self.vector_output = y_train.dim() == 1
        self.outputs = y.shape[1]
        r = y
        if f0_train is not None:
            f0 = _as_initial_train(f0_train, y_train, n, self.outputs)
            r = y - f0
        else:
            f0 = torch.zeros_like(y)
        self.f0_train = f0
        self.device = k.device
        dtypes = [d for d in (k.dtype, y_train.dtype) if d.is_floating_point]
        self.dtype = torch.promote_types(*dtypes) if len(dtypes) == 2 else (
            dtypes[0] if dtypes else torch.get_default_dtype()
        )

        k64 = k.to(torch.float64)
        k64 = 0.5 * (k64 + k64.T)
        evals, evecs = torch.linalg.eigh(k64)
        scale = float(evals.abs().max())
        if rcond is None:
            rcond = n * torch.finfo(k.dtype if k.dtype.is_floating_point else torch.float64).eps
        tol = float(rcond) * scale
        if scale > 0 and float(evals.min()) < -max(tol, 1e-6 * scale):
            warnings.warn(
                f"k_train_train is not positive semi-definite (smallest eigenvalue "
                f"{float(evals.min()):.3g}, largest {scale:.3g}); negative eigenvalues are "
                "treated as zero",
                RuntimeWarning,
                stacklevel=2,
            )
        self.eigenvalues = torch.where(evals > tol, evals, torch.zeros_like(evals))
        self.eigenvectors = evecs
        self.residual_eig = evecs.T @ r.to(k.device)  # V^T r, [n, O]

    def _gains(self, times: Tensor) -> Tensor:
        """``g(s) = (1 - exp(-lr t (s + lambda)/n)) / (s + lambda)`` per time and eigenvalue,
        ``[T, n]``; zero where ``s + lambda = 0`` (the null space does not move)."""
        s = self.eigenvalues + self.ridge
        active = s > 0
        safe = torch.where(active, s, torch.ones_like(s))
        times = times.to(s.device).unsqueeze(1)
        finite = torch.isfinite(times)
        rate = -torch.expm1(-self.lr * torch.where(finite, times, 0.0) * safe / self.n)
        rate = torch.where(finite, rate, torch.ones_like(rate))
        return torch.where(active, rate / safe, torch.zeros_like(rate))

    def coefficients(self, t: TimeLike = None) -> Tensor:
        """Dual coefficients ``alpha_t = (K + lambda I)^{-1}(I - e^{-lr t (K + lambda I)/n}) r``,
        ``[n, O]`` (or ``[T, n, O]`` for several times), float64; ``f_t = f_0 + K alpha_t``."""
        times, single = _as_times(t)
        gains = self._gains(times)  # [T, n]
        alpha = torch.einsum("ij,tj,jo->tio", self.eigenvectors, gains, self.residual_eig)
        return alpha[0] if single else alpha

    def _finish(self, out: Tensor, single: bool) -> Tensor:
        """``[T, m, O]`` float64 -> the caller's shape and dtype."""
        if self.vector_output:
            out = out.squeeze(-1)
        if single:
            out = out[0]
        return out.to(self.dtype)

    def predict(
        self, k_test_train: Tensor, t: TimeLike = None, *, f0_test: Tensor | None = None
    ) -> Tensor:
        """Test predictions ``f_t(x_*)`` at time(s) ``t``.

        Parameters
        ----------
        k_test_train : Tensor
            Kernel between test and training points ``K_*`` ``[m, n]``.
        t : float, sequence of floats, 1-D tensor, or None
            Time(s) ``>= 0``; ``None`` or ``inf`` means converged.
        f0_test : Tensor, optional
            Initial function on the test points, ``[m]`` or ``[m, O]`` matching ``y_train``.

        Returns
        -------
        Tensor
            ``[m]`` / ``[m, O]`` for a single time, ``[T, m]`` / ``[T, m, O]`` for a sequence.
        """
        ks = _as_matrix(k_test_train, "k_test_train")
        if ks.shape[1] != self.n:
            raise UsageError(
                f"k_test_train must be [m, n] with n = {self.n} training points (the size of "
                f"k_train_train), got shape {tuple(ks.shape)}"
            )
        m = ks.shape[0]
        times, single = _as_times(t)
        proj = ks.to(device=self.device, dtype=torch.float64) @ self.eigenvectors  # [m, n]
        gains = self._gains(times)
        out = torch.einsum("mj,tj,jo->tmo", proj, gains, self.residual_eig)
        if f0_test is not None:
            if not isinstance(f0_test, Tensor):
                raise UsageError(f"f0_test must be a torch.Tensor, got {type(f0_test).__name__}")
            if f0_test.dim() != (1 if self.vector_output else 2):
                raise UsageError(
                    f"f0_test must have shape [m]{'' if self.vector_output else ', O'} like "
                    f"y_train (shape [n{'' if self.vector_output else ', O'}]), got shape "
                    f"{tuple(f0_test.shape)}"
                )
            f0 = _as_targets(f0_test, "f0_test", m, "m (rows of k_test_train)", self.outputs)
            out = out + f0.to(self.device)
        return self._finish(out, single)

    def predict_train(self, t: TimeLike = None) -> Tensor:
        """Training-set predictions ``f_t(X) = f_0(X) + K alpha_t``, shaped like ``predict``."""
        times, single = _as_times(t)
        gains = self._gains(times) * self.eigenvalues
        out = torch.einsum("ij,tj,jo->tio", self.eigenvectors, gains, self.residual_eig)
        out = out + self.f0_train.to(self.device)
        return self._finish(out, single)


def kernel_regression(
    k_train_train: KernelLike,
    k_test_train: KernelLike,
    y_train: Tensor,
    *,
    f0_train: Tensor | None = None,
    f0_test: Tensor | None = None,
    t: TimeLike = None,
    lr: float = 1.0,
    ridge: float = 0.0,
    return_train: bool = False,
    rcond: float | None = None,
    solver: str = "eigh",
    solver_options: dict | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Predictions of gradient flow with a fixed kernel on ``0.5 * mean ||f - y||^2`` (+ ridge).

    .. math::

        f_t(x_*) = f_0(x_*) + K_* (K + \\lambda I)^{-1}
            \\big(I - e^{-\\mathrm{lr}\\, t\\, (K + \\lambda I)/n}\\big) (y - f_0(X)),

    the solution of ``df/dt = -(lr/n)[K (f - y) + lambda (f - f_0)]`` on the training set, i.e.
    gradient flow of a linearized model on ``(1/2n) sum_i ||f(x_i) - y_i||^2 +
    (lambda/2n) ||theta - theta_0||^2`` (Jacot et al. 2018; Lee et al. 2019). At ``t=None``
    (converged) this is ``f_0(x_*) + K_* (K + lambda I)^{-1} (y - f_0(X))``, kernel ridge
    regression; with ``ridge=0`` the inverse is the pseudo-inverse on the range of ``K``
    (minimum-norm interpolant). See the module docstring for the full convention.

    Two solvers compute it. ``solver="eigh"`` (default) decomposes ``K`` once in float64
    (:class:`KernelRegressor`): any ``t``, ``ridge = 0`` on a singular ``K`` (pseudo-inverse),
    but ``O(n^3)`` time and several ``n x n`` float64 copies of ``K`` in memory. ``solver="cg"``
    solves ``(K + ridge I) alpha = y - f_0(X)`` by preconditioned conjugate gradients
    (:func:`telescope.kernels.solve_kernel_system`), reading ``K`` in row blocks, and returns
    ``f_0(x_*) + K_* alpha``: converged predictions only (``t=None``), a positive definite
    ``K + ridge I`` (``ridge > 0``, or a positive definite ``K``), and ``K`` and ``K_*`` may be
    ``.npy`` paths or ``numpy.memmap`` s (``telescope.ntk(..., out=PATH)``) streamed from disk
    with one block in memory at a time. Its cost is one pass over ``K`` per iteration (plus one
    for the Nyström sketch and one for the final residual check), one pass over ``K_*``, and one
    more over ``K`` with ``return_train=True``.

    Parameters
    ----------
    k_train_train : Tensor, numpy array, numpy.memmap, str or PathLike
        ``K`` ``[n, n]`` between training points. ``solver="eigh"`` takes a tensor only (a
        memmap or a path is refused with the way to load it, or to stream it with
        ``solver="cg"``); ``solver="cg"`` also takes a numpy array, and streams a memmap or a
        ``.npy`` path (C-ordered float16/32/64) from its file.
    k_test_train : Tensor, numpy array, numpy.memmap, str or PathLike
        ``K_*`` ``[m, n]`` between test and training points (as ``k_train_train``).
    y_train : Tensor
        Targets ``[n]`` or ``[n, O]``; every output column uses the same kernel.
    f0_train, f0_test : Tensor, optional
        Initial network outputs on train ``[n(, O)]`` and test ``[m(, O)]`` (default 0).
    t : float, sequence, 1-D tensor, or None
        Training time(s) ``>= 0`` in units of steps of size ``lr`` (``None``/``inf``:
        converged). A sequence gives a leading time axis. ``solver="cg"``: ``None`` (or
        ``inf``) only.
    lr : float
        Learning rate ``> 0``.
    ridge : float
        ``lambda >= 0``.
    return_train : bool
        Also return the training-set predictions ``f_t(X)`` (with ``solver="cg"``
        ``f_0(X) + K alpha``, one more pass over ``K``).
    rcond : float, optional
        Relative eigenvalue cutoff of ``K`` (default ``n * eps``), see :class:`KernelRegressor`.
        Only with ``solver="eigh"``.
    solver : {"eigh", "cg"}
        An eigendecomposition in memory, or conjugate gradients streaming ``K`` (above).
    solver_options : dict, optional
        Only with ``solver="cg"``: keywords of :func:`telescope.kernels.solve_kernel_system`,
        ``tol`` (default ``1e-8``, on the relative residual of every output column),
        ``max_iter`` (1000), ``preconditioner`` (``"nystrom"``, ``"jacobi"`` or ``None``),
        ``rank`` (of the Nyström sketch, default ``min(n, 100)``), ``block_rows`` /
        ``max_memory_gb`` (the rows of a block, also for ``K_*``), ``seed``, ``progress``;
        anything else is refused.

    Returns
    -------
    Tensor or (Tensor, Tensor)
        Test predictions ``[m(, O)]``, or ``[T, m(, O)]`` for several times; with
        ``return_train=True`` the pair ``(test, train)``. Float dtype of the inputs.

    Raises
    ------
    ValueError
        Mismatched shapes (the message names the dimensions), NaN/inf values, negative ``t`` or
        ``ridge``, non-positive ``lr``, an unknown solver, options of the other solver.
    telescope.errors.NotConvergedError
        ``solver="cg"`` did not reach ``tol`` within ``max_iter`` iterations (the message names
        the fixes).
    """
    if _check_solver(solver) == "cg":
        return _cg_regression(k_train_train, k_test_train, y_train, f0_train=f0_train,
                              f0_test=f0_test, t=t, lr=lr, ridge=ridge,
                              return_train=return_train, rcond=rcond,
                              solver_options=solver_options)
    if solver_options is not None:
        raise UsageError("solver_options are options of solver='cg' (the iterative solver); "
                         "solver='eigh' takes none: drop them or pass solver='cg'")
    k_train = _eigh_kernel(k_train_train, "k_train_train")
    k_test = _eigh_kernel(k_test_train, "k_test_train")
    if isinstance(k_test, Tensor) and isinstance(k_train, Tensor):
        # Checked before the eigendecomposition (KernelRegressor validates everything else).
        square = k_train.dim() == 2 and k_train.shape[0] == k_train.shape[1]
        if square and k_test.dim() == 2 and (
            k_test.shape[1] != k_train.shape[0]
        ):
            raise UsageError(
                f"k_test_train has {k_test.shape[1]} columns but k_train_train has "
                f"{k_train.shape[0]} rows: both must index the same n training points "
                f"(shapes {tuple(k_test.shape)} and {tuple(k_train.shape)})"
            )
    reg = KernelRegressor(
        k_train, y_train, f0_train=f0_train, lr=lr, ridge=ridge, rcond=rcond
    )
    test = reg.predict(k_test, t, f0_test=f0_test)
    if return_train:
        return test, reg.predict_train(t)
    return test


def _cg_regression(k: KernelLike, ks: KernelLike, y_train: Tensor, *, f0_train: Tensor | None,
                   f0_test: Tensor | None, t: TimeLike, lr: float, ridge: float,
                   return_train: bool, rcond: float | None,
                   solver_options: dict | None) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`kernel_regression` with ``solver="cg"``: ``f_0(x_*) + K_* alpha``, ``(K + ridge
    I) alpha = y - f_0(X)`` solved by :func:`solve_kernel_system`."""
    if rcond is not None:
        raise UsageError("rcond is the eigenvalue cutoff of solver='eigh'; solver='cg' solves "
                         "(K + ridge I) alpha = y - f0 iteratively and has no cutoff (its "
                         "accuracy is solver_options['tol']): drop rcond")
    times, single = _as_times(t)
    if not single or bool(torch.isfinite(times).any()):
        raise UsageError(f"solver='cg' gives the converged predictions only (t=None); for the "
                         f"predictions at a finite time t use solver='eigh', got t={t!r}")
    _check_scalar(lr, "lr", positive=True)
    ridge = _check_scalar(ridge, "ridge", positive=False)
    options = check_solver_options(solver_options, "kernel_regression")
    k_dtype, k_shape = kernel_dtype(k, "k_train_train")
    n = check_square(k_shape, "k_train_train")
    _, ks_shape = kernel_dtype(ks, "k_test_train")
    if ks_shape[1] != n:
        raise UsageError(
            f"k_test_train has {ks_shape[1]} columns but k_train_train has {n} rows: both must "
            f"index the same n training points (shapes {ks_shape} and {k_shape})")
    m = ks_shape[0]
    y = _as_targets(y_train, "y_train", n, "n", None)
    vector = y_train.dim() == 1
    outputs = y.shape[1]
    if f0_train is not None:
        f0 = _as_initial_train(f0_train, y_train, n, outputs)
    else:
        f0 = torch.zeros_like(y)
    if f0_test is not None:
        f0s = _as_initial(f0_test, "f0_test", y_train, m, "m (rows of k_test_train)", outputs)
    else:
        f0s = torch.zeros(m, outputs, dtype=torch.float64)
    dtypes = [d for d in (k_dtype, y_train.dtype) if d.is_floating_point]
    dtype = torch.promote_types(*dtypes) if len(dtypes) == 2 else (
        dtypes[0] if dtypes else torch.get_default_dtype()
    )

    alpha = solve_kernel_system(k, y - f0, ridge=ridge, **options).solution    # [n, O]
    device = alpha.device
    blocks = {key: options[key] for key in ("block_rows", "max_memory_gb") if key in options}
    test = kernel_matmul(ks, alpha, **blocks).to(device) + f0s.to(device)

    def finish(out: Tensor) -> Tensor:
        return (out.squeeze(-1) if vector else out).to(dtype)

    if return_train:
        train = kernel_matmul(k, alpha, **blocks).to(device) + f0.to(device)
        return finish(test), finish(train)
    return finish(test)


def kernel_descent(
    k_train_train: Tensor,
    k_test_train: Tensor,
    y_train: Tensor,
    *,
    steps: StepsLike,
    f0_train: Tensor | None = None,
    f0_test: Tensor | None = None,
    lr: float = 1.0,
    return_train: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Predictions of gradient descent with a fixed kernel on ``0.5 * mean ||f - y||^2``, step by
    step: exact for a linearized network trained by full-batch gradient descent.

    .. math::

        f_{s+1}(X) = f_s(X) - \\frac{\\mathrm{lr}}{n} K \\big(f_s(X) - y\\big), \\qquad
        f_{s+1}(x_*) = f_s(x_*) - \\frac{\\mathrm{lr}}{n} K_* \\big(f_s(X) - y\\big),

    what the linearization ``f(x) = f_0(x) + <grad f_0(x), theta - theta_0>`` does under
    ``theta <- theta - lr * grad L`` (Lee et al. 2019, the discrete form of their eq. 9).
    :func:`kernel_regression` is its gradient-flow limit ``lr -> 0`` at fixed ``lr * steps``;
    at a finite step the two differ by ``(1 - u)^s - exp(-u s)`` of an eigenmode's initial
    residual (``u = lr lambda / n``), so compare a network trained with a finite step against
    this, not against the flow. Stable for ``lr < 2 n / lambda_max``; beyond that it diverges,
    as the network would. See the module docstring for the convention.

    The kernels are used as given (not symmetrized, no eigenvalue cutoff) and every step costs
    one ``[n, n]`` and one ``[m, n]`` product in float64; there is no ridge term.

    Parameters
    ----------
    k_train_train : Tensor
        ``K`` ``[n, n]`` between training points.
    k_test_train : Tensor
        ``K_*`` ``[m, n]`` between test and training points.
    y_train : Tensor
        Targets ``[n]`` or ``[n, O]``; every output column uses the same kernel.
    steps : int, sequence of ints, or 1-D integer tensor
        Number(s) of gradient-descent steps ``>= 0`` at which to return the predictions, in the
        order given. A sequence gives a leading step axis.
    f0_train, f0_test : Tensor, optional
        Initial network outputs on train ``[n(, O)]`` and test ``[m(, O)]`` (default 0).
    lr : float
        Learning rate ``> 0``.
    return_train : bool
        Also return the training-set predictions ``f_s(X)``.

    Returns
    -------
    Tensor or (Tensor, Tensor)
        Test predictions ``[m(, O)]``, or ``[S, m(, O)]`` for several step counts; with
        ``return_train=True`` the pair ``(test, train)``. Float dtype of the inputs.

    Raises
    ------
    ValueError
        Mismatched shapes (the message names the dimensions), NaN/inf values, negative or
        non-integer ``steps``, non-positive ``lr``.
    """
    k = _as_matrix(k_train_train, "k_train_train")
    n = check_square(tuple(k.shape), "k_train_train")
    ks = _as_matrix(k_test_train, "k_test_train")
    if ks.shape[1] != n:
        raise UsageError(
            f"k_test_train has {ks.shape[1]} columns but k_train_train has {n} rows: both must "
            f"index the same n training points (shapes {tuple(ks.shape)} and {tuple(k.shape)})"
        )
    m = ks.shape[0]
    lr = _check_scalar(lr, "lr", positive=True)
    wanted, single = _as_steps(steps)
    y = _as_targets(y_train, "y_train", n, "n", None)
    outputs = y.shape[1]
    device = k.device
    y = y.to(device)
    if f0_train is None:
        f = torch.zeros_like(y)
    else:
        f = _as_initial(f0_train, "f0_train", y_train, n, "n", outputs).to(device)
    if f0_test is None:
        f_test = torch.zeros(m, outputs, dtype=torch.float64, device=device)
    else:
        f_test = _as_initial(f0_test, "f0_test", y_train, m, "m (rows of k_test_train)",
                             outputs).to(device)
    dtypes = [d for d in (k.dtype, y_train.dtype) if d.is_floating_point]
    dtype = torch.promote_types(*dtypes) if len(dtypes) == 2 else (
        dtypes[0] if dtypes else torch.get_default_dtype()
    )

    k = k.to(torch.float64)
    ks = ks.to(device=device, dtype=torch.float64)
    last, keep = max(wanted), set(wanted)
    at_test: dict[int, Tensor] = {}
    at_train: dict[int, Tensor] = {}
    for s in range(last + 1):
        if s in keep:  # the updates below are out of place: no copy needed
            at_test[s], at_train[s] = f_test, f
        if s == last:
            break
        r = f - y
        f = f - (lr / n) * (k @ r)
        f_test = f_test - (lr / n) * (ks @ r)

    def finish(at: dict[int, Tensor]) -> Tensor:
        out = torch.stack([at[s] for s in wanted])
        if y_train.dim() == 1:
            out = out.squeeze(-1)
        if single:
            out = out[0]
        return out.to(dtype)

    test = finish(at_test)
    if return_train:
        return test, finish(at_train)
    return test
