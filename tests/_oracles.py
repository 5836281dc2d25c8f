"""Independent oracles for kernel tests: per-example Jacobians by plain autograd, one example
and one output at a time (no torch.func, no vmap, no telescope code)."""

from __future__ import annotations

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
