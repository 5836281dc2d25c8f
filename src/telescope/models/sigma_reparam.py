"""Linear layer with sigma-reparametrization (spectral normalization times a learned scale).

Zhai et al. (2023), "Stabilizing Transformer Training by Preventing Attention Entropy Collapse"
(ICML 2023), reparametrize every linear layer as

    W_hat = (gamma / sigma(W)) W,        y = x W_hat^T + b,

with ``sigma(W)`` the spectral norm (largest singular value) of ``W`` and ``gamma`` a learned
scalar. ``sigma(W)`` is estimated by power iteration (Miyato et al., 2018, "Spectral
Normalization for Generative Adversarial Networks"): with buffers ``u`` (left) and ``v`` (right
singular vector estimates), one step per training forward pass

    v <- W^T u / ||W^T u||,    u <- W v / ||W v||,

and ``sigma(W) = u^T W v``. The update of ``u, v`` runs outside autograd, so gradients flow
through ``sigma = u^T W v`` with ``u, v`` held fixed: ``d sigma / d W = u v^T``, which is the
exact gradient of the spectral norm when ``u, v`` are the top singular vectors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from telescope.errors import UsageError

__all__ = ["SigmaReparamLinear"]


class SigmaReparamLinear(nn.Module):
    r"""``y = x W_hat^T + b`` with ``W_hat = (gamma / sigma(W)) W`` (Zhai et al., 2023).

    Parameters
    ----------
    in_features, out_features, bias
        As for ``nn.Linear``; ``weight`` and ``bias`` are initialized exactly as ``nn.Linear``
        does (same random-number draws, so a seeded model gets the same ``W``).
    gamma_init
        Initial value of the learned scale ``gamma``. ``None`` (default): ``gamma = sigma(W_0)``,
        so ``W_hat = W_0`` and the layer computes exactly the function of the plain
        ``nn.Linear`` with the same weights at initialization; only the training dynamics
        differ. A number sets ``gamma`` directly, e.g. ``1.0`` gives a unit spectral norm at
        initialization (the initialization of ``gamma`` used by Zhai et al.'s reference setups).
    eps
        Floor for ``sigma`` and for the norms in power iteration.

    Notes
    -----
    * ``u`` ([out_features]) and ``v`` ([in_features]) are buffers, initialized to the exact
      top singular vectors of ``W_0`` (an SVD at construction, so ``sigma`` is exact at init;
      call :meth:`reset_power_iteration` after editing ``weight`` by hand).
    * One power-iteration step runs at the start of every forward pass in training mode, under
      ``torch.no_grad()``, and only when ``weight`` is the module's own ``nn.Parameter``: a
      functional call that substitutes the weights (``torch.func.functional_call``, as
      :func:`telescope.ntk` does) or eval mode leaves ``u, v`` untouched, so the layer is then
      a pure function of its parameters and buffers.
    * ``gamma`` is a 0-dimensional parameter. The structured NTK engine has no rule for this
      module and uses per-example Jacobians for its parameters.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 gamma_init: float | None = None, eps: float = 1e-12,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise UsageError(f"in_features and out_features must be positive, got "
                             f"{in_features}, {out_features}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.eps = in_features, out_features, float(eps)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        # nn.Linear's initialization: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.register_buffer("u", torch.zeros(out_features, **kw))
        self.register_buffer("v", torch.zeros(in_features, **kw))
        self.reset_power_iteration()
        with torch.no_grad():
            start = self.sigma() if gamma_init is None else torch.tensor(float(gamma_init), **kw)
        self.gamma = nn.Parameter(start.detach().clone().reshape(()))

    @torch.no_grad()
    def reset_power_iteration(self) -> None:
        """Set ``u, v`` to the exact top left/right singular vectors of the current ``W``."""
        w = self.weight.detach()
        u_all, _, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
        self.u.copy_(u_all[:, 0].to(w.dtype))
        self.v.copy_(vh[0].to(w.dtype))

    @torch.no_grad()
    def power_iteration(self, steps: int = 1) -> None:
        """``steps`` power-iteration updates of ``u, v`` (outside autograd)."""
        w = self.weight.detach()
        u, v = self.u, self.v
        for _ in range(steps):
            v = F.normalize(w.T @ u, dim=0, eps=self.eps)
            u = F.normalize(w @ v, dim=0, eps=self.eps)
        self.u.copy_(u)
        self.v.copy_(v)

    def sigma(self) -> Tensor:
        """The spectral-norm estimate ``sigma(W) = u^T W v`` (differentiable in ``W``)."""
        return torch.dot(self.u, self.weight @ self.v)

    def effective_weight(self) -> Tensor:
        """``W_hat = (gamma / sigma(W)) W``, the matrix the layer applies (differentiable)."""
        return (self.gamma / self.sigma().clamp_min(self.eps)) * self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.training and isinstance(self.weight, nn.Parameter):
            self.power_iteration(1)
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")
