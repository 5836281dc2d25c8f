"""Collegial ensembles: ``m`` networks run side by side as one, through block-diagonal layers.

Littwin, Myara, Sabah, Susskind, Zhai & Golan (2020), "Collegial Ensembles", NeurIPS: an
ensemble of ``m`` networks of identical architecture whose outputs are aggregated and that is
trained as a single model. With members ``f_k`` (independently initialized ``in -> width -> ...
-> width -> out`` MLPs in NTK parametrization)

    ``f(x) = c_m * sum_{k=1}^m f_k(x)``,  ``c_m = 1 / sqrt(m)`` (``normalization="sqrt"``) or
    ``1 / m`` (``"mean"``),

and since the members share no parameter the ensemble's tangent kernel is the scaled sum of
theirs, ``Theta(x, x') = c_m^2 sum_k Theta_k(x, x')``. With ``1 / sqrt(m)`` it is the *mean*
of the members' kernels, on the scale of one member's (the same learning rate trains both), so
it concentrates around ``E[Theta_width]`` with variance ``Var[Theta_width] / m``, the way a
wide network's kernel concentrates with its width; the output at initialization keeps one
member's variance. ``"mean"`` (the members' average output) divides the kernel by ``m`` more,
so gradient descent needs a learning rate ``m`` times larger to move the function as fast, and
shrinks the initial output's variance to ``1 / m`` of a member's; with that learning rate the
two follow the same kernel. The ``1 / sqrt(m)`` scale is also what one NTK-parametrized readout
over the ``m * width`` concatenated features computes (``1/sqrt(m width) = (1/sqrt(m))
(1/sqrt(width))``): the ensemble is a width-``m * width`` network whose hidden-to-hidden and
readout weights are block-diagonal.

The ensemble is built from one wide layer per depth, not ``m`` small modules:

- the first layer, ``in -> m * width``, is one :class:`~telescope.models.NTKLinear` (every
  member reads the whole input; rows ``k width:(k+1) width`` are member ``k``'s first layer);
- each further hidden layer is a :class:`BlockDiagonalLinear` ``(m width -> m width, groups=m)``;
- the readout is a :class:`BlockDiagonalLinear` ``(m width -> m out, groups=m)``, then the sum
  over the ``m`` output blocks times ``c_m``.

:class:`BlockDiagonalLinear` declares its structured-NTK rule (``kind="block_diagonal"``,
:class:`telescope.kernels.rules.BlockDiagonalRule`: one factor per block), so
:func:`telescope.ntk` computes the ensemble's kernel exactly at the cost of its blocks.
:meth:`Ensemble.member` returns member ``k`` as a separate :class:`~telescope.models.MLP` with
the same weights (the oracle of the kernel identity above).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from telescope.errors import UsageError, check_positive_int, check_std
from telescope.models.mlp import _ACTIVATIONS, MLP, Erf, NTKLinear

__all__ = ["BlockDiagonalLinear", "Ensemble", "collegial_ensemble", "member_parameter_count",
           "members_for_budget", "NORMALIZATIONS"]

NORMALIZATIONS = ("sqrt", "mean")
"""``f = sum_k f_k / sqrt(m)`` or ``/ m`` (see the module docstring)."""


class BlockDiagonalLinear(nn.Module):
    """A linear layer whose weight is block-diagonal: ``groups = G`` independent blocks.

    The input's last axis (``in_features``) is cut into ``G`` equal consecutive blocks
    ``x_g`` (``in_features / G`` features each), the output's into ``G`` blocks ``y_g``
    (``out_features / G``), and

        ``y_g = (weight_std / sqrt(in_features / G)) W_g x_g + bias_std * b_g``

    (``parametrization="ntk"``, ``W_g``, ``b`` i.i.d. ``N(0, 1)``, as
    :class:`~telescope.models.NTKLinear` per block), or ``y_g = W_g x_g + b_g`` with ``W_g ~
    N(0, weight_std^2 / (in_features / G))`` and ``b ~ N(0, bias_std^2)``
    (``"standard"``). The same map as ``nn.Conv1d(in, out, 1, groups=G)`` on ``[N, in, S]``,
    for inputs of any leading shape ``[..., in_features]``.

    ``weight`` is ``[out_features, in_features / G]``: the ``G`` blocks ``W_g`` (``[out/G,
    in/G]``) stacked, rows ``g out/G:(g+1) out/G``; ``bias`` is ``[out_features]``. The layer
    declares its structured-NTK rule in :attr:`ntk_rule` (:class:`telescope.kernels.rules.
    BlockDiagonalRule`, kernel ``sum_g <x_g, x'_g> <delta_g, delta'_g>`` summed over tokens).
    """

    ntk_rule: ClassVar[dict[str, str]] = {"kind": "block_diagonal", "groups": "groups",
                                          "weight_scale": "weight_scale",
                                          "bias_scale": "bias_scale"}

    def __init__(self, in_features: int, out_features: int, groups: int, *,
                 weight_std: float = 1.0, bias_std: float = 0.0, bias: bool = True,
                 parametrization: Literal["ntk", "standard"] = "ntk") -> None:
        super().__init__()
        in_features, out_features, groups = (check_positive_int(v, n) for v, n in (
            (in_features, "in_features"), (out_features, "out_features"), (groups, "groups")))
        if in_features % groups or out_features % groups:
            raise UsageError(f"in_features ({in_features}) and out_features ({out_features}) "
                             f"must both be multiples of groups ({groups})")
        if parametrization not in ("ntk", "standard"):
            raise UsageError(f"parametrization must be 'ntk' or 'standard', got "
                             f"{parametrization!r}")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight_std = check_std(weight_std, "weight_std")
        self.bias_std = check_std(bias_std, "bias_std")
        self.parametrization = parametrization
        fan_in = in_features // groups
        self.weight = nn.Parameter(torch.randn(out_features, fan_in))
        self.bias = nn.Parameter(torch.randn(out_features)) if bias else None
        if parametrization == "standard":
            with torch.no_grad():
                self.weight.mul_(self.weight_std / math.sqrt(fan_in))
                if self.bias is not None:
                    self.bias.mul_(self.bias_std)

    @property
    def weight_scale(self) -> float:
        """The constant factor of the weight: ``weight_std / sqrt(in_features / groups)`` in the
        NTK parametrization, 1 in the standard one."""
        if self.parametrization == "standard":
            return 1.0
        return self.weight_std / math.sqrt(self.in_features // self.groups)

    @property
    def bias_scale(self) -> float:
        """The constant factor of the bias: ``bias_std`` (NTK), 1 (standard)."""
        return 1.0 if self.parametrization == "standard" else self.bias_std

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise UsageError(f"BlockDiagonalLinear takes [..., {self.in_features}] inputs, got "
                             f"shape {list(x.shape)}")
        g = self.groups
        blocks = x.reshape(*x.shape[:-1], g, self.in_features // g)
        w = self.weight.view(g, self.out_features // g, self.in_features // g)
        y = torch.einsum("...gi,goi->...go", blocks, w).reshape(*x.shape[:-1],
                                                                  self.out_features)
        y = y * self.weight_scale
        if self.bias is not None:
            y = y + self.bias_scale * self.bias
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"groups={self.groups}, weight_std={self.weight_std}, bias_std={self.bias_std}, "
                f"parametrization={self.parametrization!r}")


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise UsageError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    cls = _ACTIVATIONS[name]
    return Erf() if cls is None else cls()


class Ensemble(nn.Module):
    """``f(x) = c_m sum_{k=1}^m f_k(x)``: ``m`` NTK-parametrized MLPs ``in -> width (x depth)
    -> out`` run as one network through block-diagonal layers (see the module docstring).

    Parameters
    ----------
    in_features, width, out_features:
        The members' input size, hidden width and output size.
    members:
        ``m >= 1``; ``m = 1`` is a plain NTK-parametrized MLP of width ``width``.
    depth:
        Hidden layers per member (``>= 1``).
    activation:
        As :class:`~telescope.models.MLP` (``"relu"``, ``"erf"``, ``"tanh"``, ...).
    normalization:
        ``"sqrt"``: ``c_m = 1 / sqrt(m)`` (the kernel is the members' mean kernel);
        ``"mean"``: ``c_m = 1 / m`` (the members' average output; kernel ``1 / m`` of that).
    weight_std, bias_std, bias:
        Every layer's NTK-parametrization constants (as :class:`~telescope.models.NTKLinear`);
        ``bias=False``: no biases.

    Attributes
    ----------
    net:
        The wide layers, ``[N, in] -> [N, m * out]`` (the members' outputs, member-major).
    scale:
        ``c_m``.
    """

    def __init__(self, in_features: int, width: int, out_features: int, members: int, *,
                 depth: int = 1, activation: str = "relu", normalization: str = "sqrt",
                 weight_std: float = 1.0, bias_std: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        in_features, width, out_features, members, depth = (
            check_positive_int(v, n) for v, n in ((in_features, "in_features"), (width, "width"),
                                                  (out_features, "out_features"),
                                                  (members, "members"), (depth, "depth")))
        if normalization not in NORMALIZATIONS:
            raise UsageError(f"normalization must be one of {NORMALIZATIONS}, got "
                             f"{normalization!r}")
        _activation(activation)  # refuse an unknown name before building anything
        self.in_features, self.width, self.out_features = in_features, width, out_features
        self.members, self.depth = members, depth
        self.activation, self.normalization = activation, normalization
        self.weight_std = check_std(weight_std, "weight_std")
        self.bias_std = check_std(bias_std, "bias_std")
        self.has_bias = bool(bias)
        self.scale = 1.0 / (math.sqrt(members) if normalization == "sqrt" else members)
        std = {"weight_std": weight_std, "bias_std": bias_std, "bias": bias}
        m, wide = members, members * width
        layers: list[nn.Module] = [NTKLinear(in_features, wide, **std), _activation(activation)]
        for _ in range(depth - 1):
            layers += [BlockDiagonalLinear(wide, wide, m, **std), _activation(activation)]
        layers.append(BlockDiagonalLinear(wide, m * out_features, m, **std))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x.flatten(1))
        return out.view(out.shape[0], self.members, self.out_features).sum(1) * self.scale

    def member(self, k: int) -> MLP:
        """Member ``k`` as a separate NTK-parametrized :class:`~telescope.models.MLP` holding a
        copy of its weights: ``ensemble(x) == scale * sum_k ensemble.member(k)(x)``."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.members:
            raise UsageError(f"k must be an int in [0, {self.members}), got {k!r}")
        mlp = MLP(self.in_features, [self.width] * self.depth, self.out_features,
                  activation=self.activation, parametrization="ntk",
                  weight_std=self.weight_std, bias_std=self.bias_std, bias=self.has_bias)
        mine = [layer for layer in self.net if isinstance(layer, NTKLinear | BlockDiagonalLinear)]
        theirs = [layer for layer in mlp.net if isinstance(layer, NTKLinear)]
        sizes = [self.width] * self.depth + [self.out_features]
        with torch.no_grad():
            for src, dst, rows in zip(mine, theirs, sizes, strict=True):
                block = slice(k * rows, (k + 1) * rows)
                dst.weight.copy_(src.weight[block])
                if dst.bias is not None and src.bias is not None:
                    dst.bias.copy_(src.bias[block])
        return mlp.to(dtype=self.net[0].weight.dtype, device=self.net[0].weight.device)

    def extra_repr(self) -> str:
        return (f"members={self.members}, width={self.width}, depth={self.depth}, "
                f"normalization={self.normalization!r}")


def collegial_ensemble(m: int, width: int, in_features: int, out_features: int = 1, *,
                       depth: int = 1, activation: str = "relu", normalization: str = "sqrt",
                       weight_std: float = 1.0, bias_std: float = 0.0,
                       bias: bool = True) -> Ensemble:
    """An :class:`Ensemble` of ``m`` MLPs of hidden width ``width`` (Littwin et al. 2020):
    ``f(x) = c_m sum_k f_k(x)`` with ``c_m = 1/sqrt(m)`` (default) or ``1/m``, built from one
    dense first layer and block-diagonal hidden and readout layers (``groups = m``)."""
    return Ensemble(in_features, width, out_features, m, depth=depth, activation=activation,
                    normalization=normalization, weight_std=weight_std, bias_std=bias_std,
                    bias=bias)


def member_parameter_count(width: int, in_features: int, out_features: int = 1, *,
                           depth: int = 1, bias: bool = True) -> int:
    """The parameters of one member: ``in w + (depth - 1) w^2 + w out`` weights, plus ``depth w
    + out`` biases with ``bias`` (an ensemble of ``m`` has ``m`` times as many)."""
    width, in_features, out_features, depth = (
        check_positive_int(v, n) for v, n in ((width, "width"), (in_features, "in_features"),
                                              (out_features, "out_features"), (depth, "depth")))
    weights = in_features * width + (depth - 1) * width * width + width * out_features
    return weights + (depth * width + out_features if bias else 0)


def members_for_budget(budget: int, width: int, in_features: int, out_features: int = 1, *,
                       depth: int = 1, bias: bool = True) -> int:
    """The number of members ``m >= 1`` of width ``width`` whose total parameter count comes
    closest to ``budget``: ``round(budget / member_parameter_count(...))``."""
    budget = check_positive_int(budget, "budget")
    per = member_parameter_count(width, in_features, out_features, depth=depth, bias=bias)
    return max(1, round(budget / per))
