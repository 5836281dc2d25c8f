"""Fully-connected networks in standard or NTK parametrization."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from telescope.errors import UsageError

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
                "erf": None, "identity": nn.Identity}


class Erf(nn.Module):
    """Elementwise error function (the activation with a closed-form infinite-width kernel)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(x)


class NTKLinear(nn.Module):
    """Dense layer in NTK parametrization: ``y = (weight_std / sqrt(n_in)) W x + bias_std * b``.

    ``W`` and ``b`` are initialized i.i.d. ``N(0, 1)`` (Jacot et al., 2018), the convention of
    neural-tangents' ``stax.Dense(out, W_std, b_std)``, so the empirical NTK of a wide network of
    these layers converges to :func:`telescope.infinite_ntk`.

    The layer declares its own structured-NTK rule in :attr:`ntk_rule` (a linear rule with the
    constant factors ``weight_scale`` and ``bias_std``), which :mod:`telescope.kernels.rules`
    reads: the kernels import no model class, and a layer of yours can declare its rule the
    same way (see there).
    """

    ntk_rule: ClassVar[dict[str, str]] = {"kind": "linear", "weight_scale": "weight_scale",
                                          "bias_scale": "bias_std"}

    def __init__(self, in_features: int, out_features: int, *, weight_std: float = 1.0,
                 bias_std: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_std, self.bias_std = float(weight_std), float(bias_std)
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.randn(out_features)) if bias else None

    @property
    def weight_scale(self) -> float:
        return self.weight_std / math.sqrt(self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.linear(x, self.weight) * self.weight_scale
        if self.bias is not None:
            y = y + self.bias_std * self.bias
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_std={self.weight_std}, bias_std={self.bias_std}")


class MLP(nn.Module):
    """Multi-layer perceptron ``in -> hidden[0] -> ... -> hidden[-1] -> out``.

    Parameters
    ----------
    parametrization:
        ``"standard"``: ``nn.Linear`` layers with PyTorch's default initialization, weights then
        scaled by ``alpha`` (the initialization scale of Liu et al. 2022, Omnigrok).
        ``"ntk"``: :class:`NTKLinear` layers with ``weight_std``/``bias_std``.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, *,
                 activation: str = "relu", parametrization: str = "standard",
                 weight_std: float = 1.0, bias_std: float = 0.0, bias: bool = True,
                 alpha: float = 1.0) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise UsageError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if parametrization not in ("standard", "ntk"):
            raise UsageError(
                f"parametrization must be 'standard' or 'ntk', got {parametrization!r}")
        widths = [int(in_features), *map(int, hidden), int(out_features)]
        if min(widths) < 1:
            raise UsageError(f"all layer widths must be >= 1, got {widths}")
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            if parametrization == "ntk":
                layers.append(NTKLinear(n_in, n_out, weight_std=weight_std, bias_std=bias_std,
                                        bias=bias))
            else:
                lin = nn.Linear(n_in, n_out, bias=bias)
                if alpha != 1.0:
                    with torch.no_grad():
                        lin.weight.mul_(alpha)
                layers.append(lin)
            if i < len(widths) - 2:
                layers.append(Erf() if activation == "erf" else _ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))
