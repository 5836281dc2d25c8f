"""The two-layer network of the polynomial grokking task (Kumar et al., 2024, "Grokking as the
transition from lazy to rich training dynamics"), as the telescoping paper's Section 5 uses it."""

from __future__ import annotations

import torch
from torch import nn

from telescope.data.synthetic import polynomial_activation

__all__ = ["TwoLayerPolynomialNet"]


class TwoLayerPolynomialNet(nn.Module):
    """``f(x) = alpha / N sum_i [phi(w_i . x) - phi(w0_i . x)]``, ``phi =
    polynomial_activation(., epsilon)``, ``w_i ~ N(0, I)`` (inputs ``x ~ N(0, I/d)``, so
    ``w_i . x`` is about standard normal); centered at its initial function as in Kumar et al."""

    def __init__(self, d: int, width: int, alpha: float, epsilon: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.alpha, self.epsilon = float(alpha), float(epsilon)
        self.hidden = nn.Linear(d, width, bias=False)   # the structured NTK rule applies
        with torch.no_grad():
            self.hidden.weight.copy_(torch.randn(width, d, generator=generator))
        self.register_buffer("w0", self.hidden.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = polynomial_activation(self.hidden(x), self.epsilon)
        h0 = polynomial_activation(x @ self.w0.T, self.epsilon)
        return self.alpha * (h - h0).mean(dim=1, keepdim=True)
