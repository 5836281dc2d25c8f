"""Predictions of infinitely wide networks: gradient-descent ensembles and exact GP inference.

An infinitely wide network at initialization is a Gaussian process whose covariance is the NNGP
kernel ``K`` (Neal 1996; Lee et al. 2018; Matthews et al. 2018), and under gradient flow on the
squared loss it evolves as its linearization with the fixed NTK ``Theta`` (Jacot et al. 2018;
Lee et al. 2019). Its test outputs after training for a time ``t`` are therefore Gaussian over
the random initialization, with a mean and covariance in closed form (Lee et al. 2019, "Wide
Neural Networks of Any Depth Evolve as Linear Models Under Gradient Descent", sections 2.3-2.4,
eq. 15-16). :func:`gradient_descent_mse_ensemble` returns them, as neural-tangents'
``predict.gradient_descent_mse_ensemble`` does (Novak et al. 2020); :func:`gp_inference` is the
exact Bayesian posterior of the NNGP (neural-tangents' ``predict.gp_inference``).

Convention
----------
The one of :mod:`telescope.kernels.regression`: gradient flow ``d theta/dt = -lr grad L`` on

.. math::

    L = \\frac{1}{2n} \\sum_{i=1}^n \\lVert f(x_i) - y_i \\rVert^2

(``0.5 * mean`` over the ``n`` training points, sum over the ``O`` outputs), so a training
kernel ``Q`` (``Theta``, or ``K`` when only the readout is trained) moves the training outputs by
``df/dt = -(lr/n) Q (f - y)`` and every mode of ``Q`` decays as ``exp(-lr t q_i / n)``. Write

.. math::

    Q_\\lambda = Q + \\lambda I, \\qquad
    E_t = e^{-\\mathrm{lr}\\, t\\, Q_\\lambda / n}, \\qquad
    A_t = Q_\\lambda^{-1} (I - E_t)

with ``lambda = ridge`` added to the train-train training kernel (in the inverse and in the
exponent alike), ``K_*``/``Theta_*`` the test-train and ``K_**`` the test-test blocks. Then

* NTK (every layer trained, Lee et al. 2019 eq. 15-16), ``Q = Theta``:

  .. math::

      \\mu_t = \\Theta_* A_t\\, y, \\qquad
      \\Sigma_t = K_{**} + \\Theta_* A_t K A_t \\Theta_*^\\top
          - \\big(\\Theta_* A_t K_*^\\top + K_* A_t \\Theta_*^\\top\\big),

  with the un-regularized NNGP ``K`` of the training points in the middle term;
* NNGP (only the readout layer trained, Lee et al. 2019 section 2.3), ``Q = K``:

  .. math::

      \\mu_t = K_* A_t\\, y, \\qquad
      \\Sigma_t = K_{**} - K_* K_\\lambda^{-1}\\big(I - E_t^2\\big) K_*^\\top ,

  where ``E_t^2 = e^{-2 lr t K_lambda / n}`` (the factor 2 of the exponent).

At ``t = 0`` both are the prior, mean ``0`` and covariance ``K_**``. As ``t -> infinity``
(``t=None``) ``A_t -> Q_lambda^{-1}``: the NNGP ensemble becomes the GP posterior
``K_* K_lambda^{-1} y``, ``K_** - K_* K_lambda^{-1} K_*^T`` (:func:`gp_inference` with
``noise_variance = ridge``) and the NTK ensemble's mean becomes kernel ridge regression with
the NTK. With ``ridge = 0`` and a singular ``Q`` the inverse is the pseudo-inverse on the range
of ``Q`` (gradient flow never moves its null space), exactly as in
:func:`telescope.kernels.regression.kernel_regression`, whose :class:`KernelRegressor`
computes every ``A_t`` here: one eigendecomposition of the symmetrized ``Q`` per kernel serves
the mean, the covariance and every time; eigenvalues below ``n * eps * max|q|`` (tiny negative
ones of a numerically PSD kernel included) are treated as zero.

The ridge is neural-tangents' absolute ``diag_reg`` (``diag_reg_absolute_scale=True``): the
training kernel becomes ``Q + ridge * I`` and nothing else changes. In weight space it is one
extra trained parameter per training point, entering only that point's output with scale
``sqrt(ridge)`` (initialized at random for the NNGP, so that the train block of the prior
becomes ``K + ridge * I``; at zero for the NTK, so the middle ``K`` above stays as it is). For
the NNGP at ``t = None`` it is the observation-noise variance of the GP posterior. The mean is
that of ``kernel_regression(..., ridge=ridge)`` (whose ridge is ``lambda/(2n) ||theta -
theta_0||^2``); the covariance has no counterpart there.

Relation to neural-tangents
---------------------------
neural-tangents' exponent is ``exp(-learning_rate * t * q_i / y_train.size)``, gradient flow on
the mean over all ``n * O`` entries of ``y_train``; telescope's is ``exp(-lr * t * q_i / n)``,
the mean over the ``n`` training points. For one output (``O = 1``) they are the same; for ``O``
outputs neural-tangents' time ``t`` is telescope's ``t / O`` (or pass ``lr / O``). Its ``t=None``
is computed by a Cholesky solve (so a singular kernel fails there) where this module uses the
pseudo-inverse, and it clips the eigenvalues of ``Q_lambda`` at 0 where this module zeroes
those of ``Q`` below ``n * eps * max|q|`` (the two differ only for numerically singular
kernels); its ``get`` and ``compute_cov`` are the arguments of the same names.

References
----------
* J. Lee, L. Xiao, S. Schoenholz, Y. Bahri, R. Novak, J. Sohl-Dickstein, J. Pennington. Wide
  Neural Networks of Any Depth Evolve as Linear Models Under Gradient Descent. NeurIPS 2019.
* A. Jacot, F. Gabriel, C. Hongler. Neural Tangent Kernel. NeurIPS 2018.
* J. Lee, Y. Bahri, R. Novak, S. Schoenholz, J. Pennington, J. Sohl-Dickstein. Deep Neural
  Networks as Gaussian Processes. ICLR 2018.
* C. Rasmussen, C. Williams. Gaussian Processes for Machine Learning. MIT Press 2006
  (algorithm 2.1).
* R. Novak et al. Neural Tangents: Fast and Easy Infinite Neural Networks in Python. ICLR 2020.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from telescope.errors import UsageError
from telescope.kernels.regression import KernelRegressor

__all__ = ["gradient_descent_mse_ensemble", "gp_inference"]

TimeLike = float | int | Sequence[float] | Tensor | None
KernelDict = Mapping[str, Tensor]

_GETS = ("nngp", "ntk")


# ----------------------------------------------------------------------------- validation


def _matrix(k: object, name: str, rows: int | None, cols: int | None,
            rows_name: str = "", cols_name: str = "") -> Tensor:
    """A finite real 2-D tensor of shape ``[rows, cols]`` (``None``: any), detached."""
    if isinstance(k, Mapping):
        raise UsageError(
            f"{name} must be a kernel matrix (torch.Tensor), got a mapping with keys "
            f"{sorted(k)}: pick one, e.g. {name}['nngp'] for the NNGP posterior")
    if not isinstance(k, Tensor):
        raise UsageError(f"{name} must be a torch.Tensor, got {type(k).__name__}")
    if k.dim() != 2:
        raise UsageError(f"{name} must be a 2-D matrix, got shape {tuple(k.shape)}")
    if k.is_complex() or not (k.is_floating_point() or k.dtype in (torch.int32, torch.int64)):
        raise UsageError(f"{name} must be a real matrix, got dtype {k.dtype}")
    if rows is not None and k.shape[0] != rows:
        raise UsageError(f"{name} has {k.shape[0]} rows (shape {tuple(k.shape)}) but "
                         f"{rows_name} = {rows}")
    if cols is not None and k.shape[1] != cols:
        raise UsageError(f"{name} has {k.shape[1]} columns (shape {tuple(k.shape)}) but "
                         f"{cols_name} = {cols}")
    if not bool(torch.isfinite(k).all()):
        raise UsageError(f"{name} contains NaN or infinite values")
    return k.detach()


def _entry(kernels: object, key: str, name: str, why: str) -> Tensor:
    """``kernels[key]`` of a kernel mapping, with an error that names what needs it."""
    if not isinstance(kernels, Mapping):
        raise UsageError(
            f"{name} must be a mapping {{'nngp': Tensor, 'ntk': Tensor}} such as arch.kernel("
            f"...) returns, got {type(kernels).__name__}")
    if key not in kernels or kernels[key] is None:
        raise UsageError(f"{name} has no {key!r} kernel, which {why} needs (keys: "
                         f"{sorted(kernels)}): pass the mapping arch.kernel(...) returns")
    return kernels[key]


def _targets(y: object, n: int) -> Tensor:
    if not isinstance(y, Tensor):
        raise UsageError(f"y_train must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() not in (1, 2):
        raise UsageError(f"y_train must have shape [n] or [n, O], got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise UsageError(f"y_train has {y.shape[0]} rows (shape {tuple(y.shape)}) but the "
                         f"train-train kernel is over n = {n} training points")
    if y.is_complex():
        raise UsageError(f"y_train must be real, got dtype {y.dtype}")
    y2 = (y if y.dim() == 2 else y.unsqueeze(1)).detach().to(torch.float64)
    if y2.shape[1] == 0:
        raise UsageError(f"y_train has no outputs (shape {tuple(y.shape)})")
    if not bool(torch.isfinite(y2).all()):
        raise UsageError("y_train contains NaN or infinite values")
    return y2


def _result_dtype(*tensors: Tensor) -> torch.dtype:
    floating = [t.dtype for t in tensors if t.is_floating_point()]
    if not floating:
        return torch.get_default_dtype()
    dtype = floating[0]
    for d in floating[1:]:
        dtype = torch.promote_types(dtype, d)
    return dtype


def _as_get(get: object) -> tuple[str, ...]:
    items = (get,) if isinstance(get, str) else get
    if not isinstance(items, Sequence) or not items or not all(
            isinstance(g, str) for g in items):
        raise UsageError(f"get must be 'nngp', 'ntk' or a non-empty tuple of them, got {get!r}")
    bad = [g for g in items if g not in _GETS]
    if bad:
        raise UsageError(f"get must name 'nngp' and/or 'ntk', got {bad[0]!r}")
    return tuple(dict.fromkeys(items))  # in order, without repeats


def _doubled(t: TimeLike) -> TimeLike:
    """``2 t`` for any ``t`` that :meth:`KernelRegressor.coefficients` accepted."""
    if t is None:
        return None
    if isinstance(t, numbers.Real):
        return 2.0 * float(t)
    if isinstance(t, Tensor):
        return 2.0 * t.detach().to(device="cpu", dtype=torch.float64)
    return 2.0 * torch.as_tensor(t, dtype=torch.float64)


def _sym(c: Tensor) -> Tensor:
    return 0.5 * (c + c.transpose(-1, -2))


# ----------------------------------------------------------------------------- ensemble


def gradient_descent_mse_ensemble(
    k_train_train: KernelDict,
    k_test_train: KernelDict,
    y_train: Tensor,
    *,
    k_test_test: KernelDict | None = None,
    t: TimeLike = None,
    lr: float = 1.0,
    ridge: float = 0.0,
    get: str | Sequence[str] = ("nngp", "ntk"),
    compute_cov: bool = True,
) -> dict[str, dict[str, Tensor]]:
    """Mean and covariance over initializations of an infinitely wide network trained by
    gradient flow on ``0.5 * mean_i ||f(x_i) - y_i||^2``, at time(s) ``t``.

    With ``A_t = Q_lambda^{-1}(I - exp(-lr t Q_lambda / n))``, ``Q_lambda = Q + ridge * I``
    (module docstring; Lee et al. 2019, eq. 15-16):

    * ``"ntk"`` (all layers trained, ``Q = Theta``): mean ``Theta_* A_t y``, covariance
      ``K_** + Theta_* A_t K A_t Theta_*^T - (Theta_* A_t K_*^T + K_* A_t Theta_*^T)``;
    * ``"nngp"`` (readout only, ``Q = K``): mean ``K_* A_t y``, covariance
      ``K_** - K_* K_lambda^{-1}(I - exp(-2 lr t K_lambda / n)) K_*^T``.

    ``t=None`` is the converged network (``A = Q_lambda^{-1}``, the pseudo-inverse on the range
    of ``Q`` when ``ridge=0``). For one output this is neural-tangents'
    ``predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, learning_rate=lr,
    diag_reg=ridge, diag_reg_absolute_scale=True)(t, x_test, get, compute_cov)``; for ``O``
    outputs its time ``t`` is this one's ``t / O`` (see the module docstring).

    Parameters
    ----------
    k_train_train : mapping
        ``{"nngp": K [n, n], "ntk": Theta [n, n]}`` between the training points (what
        ``arch.kernel(x_train)`` returns). Only the kernels that ``get`` and ``compute_cov``
        need must be present (the NTK covariance needs the NNGP too).
    k_test_train : mapping
        The same between test and training points, each ``[m, n]``
        (``arch.kernel(x_test, x_train)``).
    y_train : Tensor
        Targets ``[n]`` or ``[n, O]``; every output uses the same kernel.
    k_test_test : mapping, optional
        ``{"nngp": K_** [m, m], ...}`` between the test points (only its ``"nngp"`` is read),
        required for ``compute_cov=True``.
    t : float, sequence of floats, 1-D tensor, or None
        Training time(s) ``>= 0`` (``None`` or ``inf``: converged); a sequence gives a leading
        time axis. Only ``lr * t`` matters.
    lr : float
        Learning rate ``> 0``.
    ridge : float
        ``>= 0``, added to the train-train training kernel (neural-tangents' absolute
        ``diag_reg``).
    get : str or tuple of str
        ``"nngp"``, ``"ntk"`` or both.
    compute_cov : bool
        Also compute the covariance over initializations.

    Returns
    -------
    dict
        ``{g: {"mean": ..., "cov": ...}}`` for every ``g`` in ``get``: ``mean`` ``[m, O]``
        (``[m]`` for 1-D ``y_train``) and ``cov`` ``[m, m]`` (the same for every output; absent
        with ``compute_cov=False``), each with a leading ``[T]`` axis when ``t`` is a sequence.
        Float dtype of the inputs, device of ``k_train_train``.

    Raises
    ------
    UsageError
        Missing kernels, mismatched shapes (the message names the dimensions), NaN/inf values,
        ``compute_cov=True`` without ``k_test_test``, negative ``t`` or ``ridge``,
        non-positive ``lr``, an unknown ``get``.
    """
    gets = _as_get(get)
    if not isinstance(compute_cov, bool):
        raise UsageError(f"compute_cov must be True or False, got {compute_cov!r}")
    if compute_cov and k_test_test is None:
        raise UsageError(
            "compute_cov=True needs k_test_test, the kernels between the test points (e.g. "
            "arch.kernel(x_test)); pass it, or compute_cov=False for the mean alone")

    needed = set(gets) | ({"nngp"} if compute_cov else set())
    train: dict[str, Tensor] = {}
    test: dict[str, Tensor] = {}
    n: int | None = None
    m: int | None = None
    for key in ("nngp", "ntk"):
        if key not in needed:
            continue
        why = (f"get={key!r}" if key in gets else "the NTK covariance (compute_cov=True)")
        kt = _matrix(_entry(k_train_train, key, "k_train_train", why),
                     f"k_train_train[{key!r}]", n, n, "n", "n")
        if kt.shape[0] != kt.shape[1]:
            raise UsageError(f"k_train_train[{key!r}] must be square [n, n], got shape "
                             f"{tuple(kt.shape)}")
        n = kt.shape[0]
        ks = _matrix(_entry(k_test_train, key, "k_test_train", why),
                     f"k_test_train[{key!r}]", m, n, "m (test points)",
                     "n (training points, the size of k_train_train)")
        m = ks.shape[0]
        train[key], test[key] = kt, ks
    assert n is not None and m is not None
    if n == 0:
        raise UsageError("k_train_train is empty: need at least one training point")
    y = _targets(y_train, n)
    outputs = y.shape[1]
    kss: Tensor | None = None
    if compute_cov:
        kss = _matrix(_entry(k_test_test, "nngp", "k_test_test", "the covariance"),
                      "k_test_test['nngp']", m, m, "m (rows of k_test_train)",
                      "m (rows of k_test_train)")
    dtype = _result_dtype(*train.values(), *test.values(), y_train,
                          *([] if kss is None else [kss]))
    device = next(iter(train.values())).device

    def finish(value: Tensor, single: bool, is_mean: bool) -> Tensor:
        if is_mean and y_train.dim() == 1:
            value = value.squeeze(-1)
        return (value[0] if single else value).to(dtype)

    out: dict[str, dict[str, Tensor]] = {}
    for g in gets:
        q = train[g].to(device=device, dtype=torch.float64)
        q_star = test[g].to(device=device, dtype=torch.float64)  # [m, n]
        y_dev = y.to(device)
        # A_t applied to [y, Q_*^T] at once: one eigendecomposition of Q for everything.
        rhs = torch.cat([y_dev, q_star.T], dim=1) if compute_cov else y_dev
        reg = KernelRegressor(q, rhs, lr=lr, ridge=ridge)
        alpha = reg.coefficients(t)  # [n, O (+ m)] or [T, n, O (+ m)]
        single = alpha.dim() == 2
        if single:
            alpha = alpha.unsqueeze(0)
        mean = q_star @ alpha[..., :outputs]  # [T, m, O]
        result = {"mean": finish(mean, single, True)}
        if compute_cov and g == "ntk":
            assert kss is not None
            k = train["nngp"].to(device=device, dtype=torch.float64)
            k_star = test["nngp"].to(device=device, dtype=torch.float64)
            a_theta = alpha[..., outputs:]  # A_t Theta_*^T, [T, n, m]
            cross = k_star @ a_theta  # K_* A_t Theta_*^T, [T, m, m]
            cov = (kss.to(device=device, dtype=torch.float64)
                   + a_theta.transpose(-1, -2) @ k @ a_theta
                   - (cross + cross.transpose(-1, -2)))
            result["cov"] = finish(_sym(cov), single, False)
        elif compute_cov:
            assert kss is not None
            a2 = reg.coefficients(_doubled(t))  # K_lambda^{-1}(I - E_t^2) [y, K_*^T]
            a2 = a2.unsqueeze(0) if a2.dim() == 2 else a2
            cov = kss.to(device=device, dtype=torch.float64) - q_star @ a2[..., outputs:]
            result["cov"] = finish(_sym(cov), single, False)
        out[g] = result
    return out


# ----------------------------------------------------------------------------- GP posterior


def gp_inference(
    k_train_train: Tensor,
    k_test_train: Tensor,
    y_train: Tensor,
    *,
    k_test_test: Tensor | None = None,
    noise_variance: float = 0.0,
) -> dict[str, Tensor]:
    """Exact Gaussian-process posterior on the test points.

    With ``K`` the train-train, ``K_*`` the test-train and ``K_**`` the test-test covariance
    and i.i.d. Gaussian observation noise of variance ``sigma^2 = noise_variance``:

    .. math::

        \\mu = K_* (K + \\sigma^2 I)^{-1} y, \\qquad
        \\Sigma = K_{**} - K_* (K + \\sigma^2 I)^{-1} K_*^\\top

    (Rasmussen & Williams 2006, eq. 2.22-2.24), computed in float64 from the Cholesky factor
    ``K + sigma^2 I = L L^T`` (their algorithm 2.1): ``mu = K_* L^{-T} L^{-1} y`` and
    ``Sigma = K_** - V^T V`` with ``V = L^{-1} K_*^T``. With the NNGP of an infinitely wide
    network this is the Bayesian posterior of the infinite network (Lee et al. 2018), and equals
    :func:`gradient_descent_mse_ensemble` ``(..., get="nngp", t=None, ridge=noise_variance)``;
    it is neural-tangents' ``predict.gp_inference(k_train_train, y_train,
    diag_reg=noise_variance, diag_reg_absolute_scale=True)("nngp", k_test_train,
    k_test_test)``.

    Parameters
    ----------
    k_train_train : Tensor
        ``K`` ``[n, n]`` (symmetrized as ``(K + K^T)/2``).
    k_test_train : Tensor
        ``K_*`` ``[m, n]``.
    y_train : Tensor
        Targets ``[n]`` or ``[n, O]``.
    k_test_test : Tensor, optional
        ``K_**`` ``[m, m]``; the covariance is returned only when it is given.
    noise_variance : float
        ``sigma^2 >= 0`` added to the diagonal of ``K``.

    Returns
    -------
    dict
        ``{"mean": [m(, O)], "cov": [m, m]}`` (``"cov"`` only with ``k_test_test``), in the
        inputs' float dtype, on the device of ``k_train_train``.

    Raises
    ------
    UsageError
        Mismatched shapes, NaN/inf values, a negative ``noise_variance``, or ``K + sigma^2 I``
        that is not positive definite (a singular kernel with ``noise_variance=0``): pass
        ``noise_variance > 0``.
    """
    k = _matrix(k_train_train, "k_train_train", None, None)
    n = k.shape[0]
    if k.shape[1] != n:
        raise UsageError(f"k_train_train must be square [n, n], got shape {tuple(k.shape)}")
    if n == 0:
        raise UsageError("k_train_train is empty: need at least one training point")
    ks = _matrix(k_test_train, "k_test_train", None, n, "",
                 "n (training points, the size of k_train_train)")
    m = ks.shape[0]
    kss = None if k_test_test is None else _matrix(
        k_test_test, "k_test_test", m, m, "m (rows of k_test_train)", "m (rows of k_test_train)")
    if isinstance(noise_variance, bool) or not isinstance(noise_variance, numbers.Real):
        raise UsageError(f"noise_variance must be a real number, got "
                         f"{type(noise_variance).__name__}")
    noise = float(noise_variance)
    if not math.isfinite(noise) or noise < 0:
        raise UsageError(f"noise_variance must be finite and >= 0, got {noise}")
    y = _targets(y_train, n)
    dtype = _result_dtype(k, ks, y_train, *([] if kss is None else [kss]))
    device = k.device

    k64 = _sym(k.to(torch.float64))
    k64 = k64 + noise * torch.eye(n, dtype=torch.float64, device=device)
    chol, info = torch.linalg.cholesky_ex(k64)
    if int(info) != 0:
        smallest = float(torch.linalg.eigvalsh(k64)[0])
        raise UsageError(
            f"k_train_train + noise_variance * I is not positive definite (noise_variance = "
            f"{noise:g}, smallest eigenvalue {smallest:.3g}; the Cholesky factorization failed "
            f"at column {int(info)}): pass noise_variance > 0 (e.g. 1e-6 times the mean of the "
            f"diagonal of k_train_train) or check the kernel for duplicate training points")
    ks64 = ks.to(device=device, dtype=torch.float64)
    alpha = torch.cholesky_solve(y.to(device), chol)  # (K + s^2 I)^{-1} y
    mean = ks64 @ alpha
    if y_train.dim() == 1:
        mean = mean.squeeze(1)
    out = {"mean": mean.to(dtype)}
    if kss is not None:
        v = torch.linalg.solve_triangular(chol, ks64.T, upper=False)  # L^{-1} K_*^T
        cov = kss.to(device=device, dtype=torch.float64) - v.T @ v
        out["cov"] = _sym(cov).to(dtype)
    return out
