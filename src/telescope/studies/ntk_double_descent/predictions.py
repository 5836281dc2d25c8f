"""What a point of ``ntk-double-descent`` predicts besides training: converged kernel regression
with the model's empirical NTK (at initialization: the lazy prediction; after training: the
after-kernel prediction) and the effective parameters of its smoother; and the error measures
every prediction is scored with."""

from __future__ import annotations

import copy

import torch

from telescope.kernels.empirical import ntk
from telescope.kernels.regression import KernelRegressor
from telescope.kernels.smoothing import absolute_ridge, effective_parameters

__all__ = ["kernel_prediction", "mse", "relative_distance"]


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
