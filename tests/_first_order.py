"""A plain reference for the first-order models of a network in training, for the study and CLI
tests: the telescoping model ``f_0 + sum_s J_{s-1} (theta_s - theta_{s-1})`` and the model
linearized at the initialization ``f_0 + J_0 (theta_t - theta_0)``, each Jacobian-vector product
taken with ``torch.func.jvp`` (not the library's code)."""

from __future__ import annotations

import torch
from _oracles import oracle_jacobian
from torch.func import functional_call, jvp


class FirstOrder:
    """Call :meth:`before` just before and :meth:`after` just after every ``optimizer.step()``."""

    def __init__(self, model: torch.nn.Module, probes: dict[str, torch.Tensor]) -> None:
        self.model, self.probes = model, probes
        self.theta0 = self._params()
        with torch.no_grad():
            self.f0 = {k: model(x).detach() for k, x in probes.items()}
        self.tele = {k: v.clone() for k, v in self.f0.items()}
        self._prev: dict | None = None

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def _jvp(self, at: dict, tangent: dict, x: torch.Tensor) -> torch.Tensor:
        return jvp(lambda p: functional_call(self.model, p, (x,)), (at,), (tangent,))[1]

    def before(self) -> None:
        self._prev = self._params()

    def after(self) -> None:
        now = self._params()
        delta = {n: now[n] - self._prev[n] for n in now}
        for k, x in self.probes.items():
            self.tele[k] = self.tele[k] + self._jvp(self._prev, delta, x).detach()

    def actual(self, name: str) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.probes[name]).detach()

    def telescoping(self, name: str) -> torch.Tensor:
        return self.tele[name]

    def linearized(self, name: str) -> torch.Tensor:
        now = self._params()
        delta = {n: now[n] - self.theta0[n] for n in now}
        return self.f0[name] + self._jvp(self.theta0, delta, self.probes[name]).detach()

    def maes(self, name: str) -> dict[str, float]:
        """``telescoping_mae``, ``linearized_mae`` and ``output_scale`` of one probe set."""
        actual = self.actual(name).double()
        return {"telescoping_mae": float((self.telescoping(name).double() - actual).abs().mean()),
                "linearized_mae": float((self.linearized(name).double() - actual).abs().mean()),
                "output_scale": float(actual.abs().mean())}


class SmootherReference:
    """The function-space smoother of SGD with heavy-ball momentum on ``F.mse_loss`` (mean
    reduction, one output), written from the recursion of the paper: at every step, with the
    kernel ``K = J_x J_B^T`` from explicit per-point Jacobians at the parameters before the step,
    ``g(x) = 2/|B| K(x, X_B) (f~(X_B) - y_B)``, ``b = mu b + g``, ``f~ <- f~ - lr b``, every
    quantity kept as ``[S | c]`` (coefficients of the labels and a constant). Call :meth:`step`
    with the batch indices just before ``optimizer.step()``."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, probes: dict[str, torch.Tensor],
                 *, lr: float, momentum: float = 0.0) -> None:
        self.model, self.lr, self.momentum = model, lr, momentum
        self.sets = {"train": x, **probes}
        n = x.shape[0]
        self.n = n
        self.a, self.b = {}, {}
        with torch.no_grad():
            for k, pts in self.sets.items():
                a = torch.zeros(pts.shape[0], n + 1, dtype=torch.float64)
                a[:, -1] = model(pts).reshape(-1).double()
                self.a[k], self.b[k] = a, torch.zeros_like(a)

    def step(self, batch: torch.Tensor) -> None:
        jac = {}
        for k, pts in self.sets.items():
            j = oracle_jacobian(self.model, pts)  # [N, O, P], one backward per point and output
            assert j.shape[1] == 1, "the reference smoother is for single-output models"
            jac[k] = j[:, 0].double()
        sel = torch.zeros(len(batch), self.n + 1, dtype=torch.float64)
        sel[torch.arange(len(batch)), batch] = 1.0
        resid = 2.0 / len(batch) * (self.a["train"][batch] - sel)     # [|B|, n+1]
        jb = jac["train"][batch]
        for k in self.sets:
            g = (jac[k] @ jb.T) @ resid
            self.b[k] = self.momentum * self.b[k] + g
        for k in self.sets:
            self.a[k] = self.a[k] - self.lr * self.b[k]

    def weights(self, name: str) -> torch.Tensor:
        return self.a[name][:, :-1]

    def predict(self, name: str, y: torch.Tensor) -> torch.Tensor:
        return self.weights(name) @ y.reshape(-1).double() + self.a[name][:, -1]

    def effective_parameters(self, name: str) -> float:
        """``n / |I| sum_{j in I} ||S(x_j)||^2``."""
        s = self.weights(name)
        return float(self.n * (s ** 2).sum() / s.shape[0])
