"""Independent oracles for kernel tests: per-example Jacobians by plain autograd, one example
and one output at a time (no torch.func, no vmap, no telescope code), and the infinite-width
ReLU NTK written out in numpy."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def oracle_jacobian(model: nn.Module, x: torch.Tensor, names=None) -> torch.Tensor:
    """[N, O, P] per-example Jacobians by plain autograd, one example and output at a time (of
    the parameters ``names`` only, when given)."""
    params = [p for n, p in model.named_parameters()
              if p.requires_grad and (names is None or n in names)]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        per_out = []
        for o in range(out.shape[0]):
            grads = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
            per_out.append(torch.cat([
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, params, strict=True)]))
        rows.append(torch.stack(per_out))
    return torch.stack(rows).detach()


def oracle_ntk(model, x1, x2, output, names=None):
    j1 = oracle_jacobian(model, x1, names)
    j2 = j1 if x2 is None else oracle_jacobian(model, x2, names)
    full = torch.einsum("aop,bqp->aboq", j1, j2)
    if output == "full":
        return full
    diag = full.diagonal(dim1=2, dim2=3)
    return diag.sum(-1) if output == "trace" else diag


def np_relu_ntk(x1: np.ndarray, x2: np.ndarray | None, depth: int) -> np.ndarray:
    """Infinite-width NTK of a bias-free ReLU net (NTK parametrization, unit weight std, scalar
    readout) by the arc-cosine recursion of Jacot et al. / Cho & Saul, written out in numpy."""
    same = x2 is None
    x2 = x1 if same else x2
    d = x1.shape[1]
    k = x1 @ x2.T / d
    kxx, kyy = (x1 ** 2).sum(1) / d, (x2 ** 2).sum(1) / d
    theta = k.copy()
    for _ in range(depth):
        norm = np.sqrt(np.outer(kxx, kyy))
        cos = np.clip(k / norm, -1.0, 1.0)
        if same:
            np.fill_diagonal(cos, 1.0)               # the angle of a point with itself is 0
        ang = np.arccos(cos)
        k = norm / (2 * np.pi) * (np.sin(ang) + (np.pi - ang) * cos)
        theta = k + (np.pi - ang) / (2 * np.pi) * theta
        kxx, kyy = kxx / 2, kyy / 2                  # E[relu(u)^2] = Var(u) / 2
    return theta
