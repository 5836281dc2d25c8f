"""What a point of ``ntk-double-descent`` predicts besides training: converged kernel regression
with the model's empirical NTK (at initialization: the lazy prediction; after training: the
after-kernel prediction) and the effective parameters of its smoother; what the infinitely wide
network predicts (its NNGP and NTK from :mod:`telescope.infinite`: the ensemble of Lee et al.
2019, and NTK theory's prediction for a given initial function); and the error measures every
prediction is scored with."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from telescope.infinite import gradient_descent_mse_ensemble
from telescope.kernels.empirical import ntk
from telescope.kernels.regression import KernelRegressor, kernel_regression
from telescope.kernels.smoothing import absolute_ridge, effective_parameters
from telescope.studies._binary import sign_error

__all__ = ["kernel_prediction", "mse", "relative_distance", "limit_kernels", "limit_ensemble",
           "limit_columns", "limit_setup", "limit_gaps"]


def kernel_prediction(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      x_test: torch.Tensor, f0: torch.Tensor, f0_test: torch.Tensor,
                      ridge: float) -> dict[str, torch.Tensor]:
    """Converged kernel regression with the model's empirical NTK (float64), and its smoother.

    With ``K = K(X, X)``, ``K_* = K(x_*, X)``: predictions ``f_0(x_*) + K_* (K + ridge I)^+
    (y - f_0(X))`` (:class:`telescope.kernels.KernelRegressor`) and smoother weights ``S_* =
    K_* (K + ridge I)^+`` (the same regression with the identity as targets, solved together
    with the predictions: :func:`telescope.kernels.smoother_weights` with
    ``ridge_convention="absolute"``), from which the effective parameters ``p = n/|I| sum_j
    ||s(x_j)||^2`` follow (:func:`telescope.kernels.effective_parameters`).

    Returns ``test`` ``[m]``, ``train`` ``[n]`` predictions, ``p_train``, ``p_test``, the train
    kernel ``k`` and the test-train kernel ``k_test``.
    """
    m64 = copy.deepcopy(model).to(torch.float64)
    x64, xt64 = x.to(torch.float64), x_test.to(torch.float64)
    n = x.shape[0]
    k_all = ntk(m64, torch.cat([x64, xt64]), x64)          # [n + m, n]
    k, k_test = k_all[:n], k_all[n:]
    eye = torch.eye(n, dtype=torch.float64, device=k.device)
    targets = torch.cat([y.reshape(n, 1).to(torch.float64), eye], dim=1)
    offsets = torch.cat([f0.reshape(n, 1).to(torch.float64), torch.zeros_like(eye)], dim=1)
    reg = KernelRegressor(k, targets, f0_train=offsets,
                          ridge=absolute_ridge(k, ridge, ridge_convention="absolute"))
    test = reg.predict(k_test, f0_test=torch.cat(
        [f0_test.reshape(-1, 1).to(torch.float64),
         torch.zeros(k_test.shape[0], n, dtype=torch.float64, device=k.device)], dim=1))
    train = reg.predict_train()
    s_train, s_test = train[:, 1:], test[:, 1:]
    return {
        "train": train[:, 0], "test": test[:, 0],
        "p_train": effective_parameters(s_train), "p_test": effective_parameters(s_test),
        "k": k, "k_test": k_test,
    }


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error of two prediction vectors (float64)."""
    return float((pred.reshape(-1).double() - target.reshape(-1).double()).pow(2).mean())


def relative_distance(pred: torch.Tensor, net: torch.Tensor) -> float:
    """Relative distance ``||pred - net|| / ||net||`` of two prediction vectors."""
    a, b = pred.reshape(-1).double(), net.reshape(-1).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# --------------------------------------------------------------------------- the infinite width


def limit_kernels(arch, x: torch.Tensor, x_test: torch.Tensor) -> dict[str, dict[str, Tensor]]:
    """The infinite-width NNGP ``K`` and NTK ``Theta`` of ``arch`` (a
    :class:`telescope.infinite.Layer`) in float64: ``train`` ``[n, n]``, ``test_train``
    ``[m, n]`` and ``test_test`` ``[m, m]``, each ``{"nngp": ..., "ntk": ...}``. They depend
    on the inputs only (not on the targets, the label noise or any width). Computed on the
    inputs' device, returned on the CPU (where the predictions are made)."""
    x64, xt64 = x.detach().to(torch.float64), x_test.detach().to(torch.float64)
    pairs = {"train": arch.kernel(x64), "test_train": arch.kernel(xt64, x64),
             "test_test": arch.kernel(xt64)}
    return {k: {name: v.cpu() for name, v in ks.items()} for k, ks in pairs.items()}


def _first(kernels: dict, n: int) -> tuple[dict, dict]:
    """The train-train and test-train kernels of the first ``n`` training points."""
    return ({k: v[:n, :n] for k, v in kernels["train"].items()},
            {k: v[:, :n] for k, v in kernels["test_train"].items()})


def limit_ensemble(kernels: dict, y: Tensor, ridge: float, t: float | None = None
                   ) -> dict[str, dict[str, Tensor]]:
    """Mean and covariance over initializations of the infinitely wide network trained by
    gradient flow on the first ``n = len(y)`` training points (targets ``y``) for time ``t``
    (``None``: converged; kernel-regression time, :mod:`telescope.infinite.predictions`), for
    the NTK (every layer trained) and the NNGP (readout only): Lee et al. (2019), eq. 15-16,
    through :func:`telescope.infinite.gradient_descent_mse_ensemble` with the absolute
    ``ridge``. The NTK mean is kernel regression from ``f_0 = 0``, ``Theta_* (Theta + ridge
    I)^+ y``."""
    n = int(y.shape[0])
    k_train, k_test = _first(kernels, n)
    return gradient_descent_mse_ensemble(
        k_train, k_test, y.reshape(n, 1).detach().cpu().to(torch.float64),
        k_test_test=kernels["test_test"], t=t, lr=1.0, ridge=ridge, get=("nngp", "ntk"),
        compute_cov=True)


def limit_columns(ens: dict, y_test: Tensor) -> dict[str, float]:
    """What the infinite-width limit predicts (``ens``: :func:`limit_ensemble`): the test MSE and
    sign error of the NTK ensemble mean ``mu = Theta_* Theta^+ y`` (``infinite_ntk_*``) and of
    the NNGP mean ``K_* K^+ y`` (``infinite_nngp_*``), and ``infinite_ntk_draw_test_mse = mse(mu)
    + tr(Sigma) / m``, the expected test MSE of *one* infinitely wide network (its random initial
    function stays in its predictions: ``Sigma``, the NTK ensemble's covariance, Lee et al. 2019
    eq. 16)."""
    mu, cov = ens["ntk"]["mean"].reshape(-1), ens["ntk"]["cov"]
    nngp = ens["nngp"]["mean"].reshape(-1)
    y_test = y_test.detach().cpu()
    m = mu.shape[0]
    return {
        "infinite_ntk_test_mse": mse(mu, y_test),
        "infinite_ntk_test_error": sign_error(mu, y_test),
        "infinite_nngp_test_mse": mse(nngp, y_test),
        "infinite_nngp_test_error": sign_error(nngp, y_test),
        "infinite_ntk_draw_test_mse": mse(mu, y_test) + float(torch.diagonal(cov).sum()) / m,
    }


def limit_setup(kernels: dict, n: int, ridge: float) -> dict[str, float]:
    """The numerical rank of the infinite-width NTK of the first ``n`` training points
    (``infinite_ntk_rank``, :func:`torch.linalg.matrix_rank`, default tolerance ``n * eps *
    max|eigenvalue|``): ``n`` means the ridgeless limit interpolates every training target;
    and the ridge its predictions used (``infinite_ridge``)."""
    theta = kernels["train"]["ntk"][:n, :n]
    return {"infinite_ntk_rank": int(torch.linalg.matrix_rank(theta, hermitian=True)),
            "infinite_ridge": float(ridge)}


def limit_gaps(kernels: dict, ens: dict, y: Tensor, f_test: Tensor, f0: Tensor,
               f0_test: Tensor, ridge: float, t: float | None) -> dict[str, float]:
    """How far a trained network's test outputs ``f_test`` are from what NTK theory predicts,
    all relative to ``||f_test||`` (:func:`relative_distance`), for a network trained on the
    first ``n = len(y)`` training points from the initial function ``f0`` (train), ``f0_test``:

    * ``infinite_gap``: from the infinite-width NTK ensemble mean ``mu = Theta_* Theta^+ y``
      (converged; ``ens``: :func:`limit_ensemble` on the same points);
    * ``infinite_gap_floor``: ``sqrt(tr Sigma / (||mu||^2 + tr Sigma))``, the rms relative
      distance of one infinitely wide network trained to convergence from that mean (its random
      initial function does not train away): no network is expected closer than this;
    * ``infinite_init_gap``: from NTK theory's prediction for *this* network, its own initial
      function plus the infinite-NTK regression of its residual, ``f_0(x_*) + Theta_*
      (Theta + ridge I)^{-1} (I - e^{-t (Theta + ridge I)/n}) (y - f_0(X))``
      (:func:`telescope.kernel_regression`) at kernel-regression time ``t`` (``None``:
      converged). Under gradient flow it tends to 0 as the width grows (Jacot et al. 2018; Lee
      et al. 2019); ``infinite_time`` records ``t`` (``inf``: converged).
    """
    n = int(y.shape[0])
    k_train, k_test = _first(kernels, n)
    mu, cov = ens["ntk"]["mean"].reshape(-1), ens["ntk"]["cov"]
    trace = float(torch.diagonal(cov).sum())
    own = kernel_regression(k_train["ntk"], k_test["ntk"], y.reshape(n, 1).double().cpu(),
                            f0_train=f0.reshape(n, 1).double().cpu(),
                            f0_test=f0_test.reshape(-1, 1).double().cpu(), t=t, lr=1.0,
                            ridge=ridge)
    net = f_test.detach().cpu()
    return {"infinite_gap": relative_distance(mu, net),
            "infinite_gap_floor": math.sqrt(trace / (float(mu.pow(2).sum()) + trace)),
            "infinite_init_gap": relative_distance(own, net),
            "infinite_time": math.inf if t is None else float(t)}
