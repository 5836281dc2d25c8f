"""A hypernetwork: a meta-network ``g`` that writes every weight of a primary MLP ``f``.

Littwin, Galanti, Wolf & Yang (2020), "On Infinite-Width Hypernetworks", NeurIPS. The model is

.. math::

    h(x, z) = f(x; \\theta(z)), \\qquad \\theta(z) = g(z; w),

where ``g`` (any module ``[N, d_z] -> [N, P]``, e.g. an NTK-parametrized :class:`~telescope.
models.MLP`) maps a task embedding ``z`` to the ``P`` numbers that are *all* the weights (and
biases) of the primary network ``f``, an MLP ``d_x -> m_1 -> ... -> m_{H-1} -> out`` in NTK
parametrization with no parameters of its own:

.. math::

    q^1 = \\frac{\\sigma_w}{\\sqrt{d_x}} W^1(z) x + \\sigma_b b^1(z), \\qquad
    q^{l+1} = \\frac{\\sigma_w}{\\sqrt{m_l}} W^{l+1}(z) \\phi(q^l) + \\sigma_b b^{l+1}(z),
    \\qquad f = q^H .

The trainable parameters are the meta-network's ``w`` only, so :func:`telescope.ntk` of a
:class:`HyperNetwork` is the paper's hypernetwork NTK ``<dh(u)/dw, dh(u')/dw>``. In the paper's
notation the meta-network is ``f`` and the primary ``g`` (the roles of the letters are swapped
here to match ``h(x, z) = f(x; g(z))``).

Inputs: ``telescope.ntk`` and ``telescope.train.fit`` take one tensor per example, so a
hypernetwork takes ``u = [x, z]`` concatenated along the feature axis (``[N, d_x + d_z]``,
:meth:`HyperNetwork.join`) and splits it at ``x_features``.

The infinite-width NNGP and NTK of this model (both widths to infinity) are in
:mod:`telescope.infinite.hypernetwork`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from telescope.errors import UsageError, check_positive_int, check_std
from telescope.models.mlp import MLP, Erf

__all__ = ["HyperNetwork", "primary_shapes"]

_PRIMARY_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "erf": Erf, "identity": nn.Identity,
                        "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def primary_shapes(x_features: int, primary_hidden: Sequence[int], out_features: int = 1, *,
                   bias: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors the meta-network writes, in the order of its output vector:
    ``[("weight1", (m_1, d_x)), ("bias1", (m_1,)), ("weight2", (m_2, m_1)), ...]`` (no biases
    with ``bias=False``). Their sizes add up to the meta-network's output width ``P``."""
    widths = [check_positive_int(x_features, "x_features")]
    widths += [check_positive_int(w, "every primary_hidden width") for w in primary_hidden]
    widths.append(check_positive_int(out_features, "out_features"))
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True), start=1):
        shapes.append((f"weight{i}", (n_out, n_in)))
        if bias:
            shapes.append((f"bias{i}", (n_out,)))
    return shapes


class HyperNetwork(nn.Module):
    """``h(u) = f(x; g(z))`` with ``u = [x, z]``: the meta-network ``meta`` writes all the
    weights of an NTK-parametrized primary MLP (see the module docstring for the formulas).

    Parameters
    ----------
    meta:
        A module mapping ``z`` ``[N, d_z]`` to ``[N, P]`` with ``P = self.n_generated`` (see
        :func:`primary_shapes`); its parameters are the hypernetwork's. :meth:`mlp` builds an
        NTK-parametrized MLP.
    x_features:
        ``d_x``: the first ``d_x`` columns of the input are ``x``, the rest ``z``.
    primary_hidden:
        Hidden widths ``m_1, ..., m_{H-1}`` of the primary network (``()``: a linear primary,
        ``H = 1``).
    out_features:
        Outputs of the primary network.
    activation:
        The primary's nonlinearity: ``"relu"``, ``"tanh"``, ``"erf"``, ``"gelu"``,
        ``"sigmoid"``, ``"identity"``, or any elementwise ``nn.Module``.
    weight_std, bias_std:
        ``sigma_w`` and ``sigma_b`` of the primary's NTK parametrization; ``bias_std=0``
        generates no biases.
    """

    def __init__(self, meta: nn.Module, x_features: int, primary_hidden: Sequence[int] = (),
                 out_features: int = 1, *, activation: str | nn.Module = "relu",
                 weight_std: float = 1.0, bias_std: float = 0.0) -> None:
        super().__init__()
        if not isinstance(meta, nn.Module):
            raise UsageError(
                f"meta must be an nn.Module mapping z [N, d_z] to the primary's weights [N, P], "
                f"got {type(meta).__name__}")
        if isinstance(primary_hidden, (str, bytes)) or not isinstance(primary_hidden, Sequence):
            raise UsageError(
                f"primary_hidden must be a sequence of widths such as (64,), got "
                f"{primary_hidden!r}")
        self.meta = meta
        self.x_features = check_positive_int(x_features, "x_features")
        self.primary_hidden = tuple(check_positive_int(w, "every primary_hidden width")
                                    for w in primary_hidden)
        self.out_features = check_positive_int(out_features, "out_features")
        self.weight_std = check_std(weight_std, "weight_std")
        self.bias_std = check_std(bias_std, "bias_std")
        if isinstance(activation, str):
            if activation not in _PRIMARY_ACTIVATIONS:
                raise UsageError(f"activation must be one of {sorted(_PRIMARY_ACTIVATIONS)} or an "
                                 f"nn.Module, got {activation!r}")
            activation = _PRIMARY_ACTIVATIONS[activation]()
        elif not isinstance(activation, nn.Module):
            raise UsageError(
                f"activation must be a name or an nn.Module, got {type(activation).__name__}")
        self.activation = activation
        self.shapes = primary_shapes(self.x_features, self.primary_hidden, self.out_features,
                                     bias=self.bias_std > 0)
        self.n_generated = sum(math.prod(shape) for _, shape in self.shapes)

    @classmethod
    def mlp(cls, x_features: int, z_features: int, meta_hidden: Sequence[int],
            primary_hidden: Sequence[int] = (), out_features: int = 1, *,
            activation: str | nn.Module = "relu", weight_std: float = 1.0,
            bias_std: float = 0.0, meta_activation: str = "relu", meta_weight_std: float = 1.0,
            meta_bias_std: float = 0.0) -> HyperNetwork:
        """A hypernetwork whose meta-network is the NTK-parametrized
        ``MLP(z_features, meta_hidden, P, parametrization="ntk")`` (weights and biases
        ``N(0, 1)``, scaled by ``meta_weight_std / sqrt(fan_in)`` and ``meta_bias_std``), built
        with torch's global RNG."""
        n_out = sum(math.prod(s) for _, s in primary_shapes(
            x_features, primary_hidden, out_features, bias=check_std(bias_std, "bias_std") > 0))
        meta = MLP(check_positive_int(z_features, "z_features"), meta_hidden, n_out,
                   activation=meta_activation, parametrization="ntk",
                   weight_std=meta_weight_std, bias_std=meta_bias_std,
                   bias=check_std(meta_bias_std, "meta_bias_std") > 0)
        return cls(meta, x_features, primary_hidden, out_features, activation=activation,
                   weight_std=weight_std, bias_std=bias_std)

    @staticmethod
    def join(x: Tensor, z: Tensor) -> Tensor:
        """The hypernetwork's input ``u = [x, z]`` (``[N, d_x + d_z]``) from ``x`` ``[N, d_x]``
        and ``z`` ``[N, d_z]`` (or ``[d_z]``, one task for every example)."""
        if x.dim() != 2:
            raise UsageError(f"x must be [N, d_x], got shape {tuple(x.shape)}")
        if z.dim() == 1:
            z = z.expand(x.shape[0], -1)
        if z.dim() != 2 or z.shape[0] != x.shape[0]:
            raise UsageError(
                f"z must be [N, d_z] with the N = {x.shape[0]} rows of x (or [d_z]), got shape "
                f"{tuple(z.shape)}")
        return torch.cat([x, z.to(x.dtype)], dim=1)

    def split(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, z)`` from ``u = [x, z]``."""
        if u.dim() != 2 or u.shape[1] <= self.x_features:
            raise UsageError(
                f"the hypernetwork takes u = [x, z] of shape [N, d_x + d_z] with d_x = "
                f"{self.x_features} and d_z >= 1 (HyperNetwork.join(x, z)); got shape "
                f"{tuple(u.shape)}")
        return u[:, :self.x_features], u[:, self.x_features:]

    def generated(self, z: Tensor) -> dict[str, Tensor]:
        """The primary network's tensors for every example: ``{"weight1": [N, m_1, d_x],
        "bias1": [N, m_1], ...}``, the meta-network's output ``[N, P]`` cut and reshaped in the
        order of :func:`primary_shapes`."""
        theta = self.meta(z)
        if theta.dim() != 2 or theta.shape[1] != self.n_generated:
            raise UsageError(
                f"the meta-network must output [N, {self.n_generated}] (the primary's weights: "
                f"{', '.join(f'{n} {s}' for n, s in self.shapes)}), got shape "
                f"{tuple(theta.shape)}")
        out: dict[str, Tensor] = {}
        start = 0
        for name, shape in self.shapes:
            size = math.prod(shape)
            out[name] = theta[:, start:start + size].reshape(theta.shape[0], *shape)
            start += size
        return out

    def primary(self, x: Tensor, weights: dict[str, Tensor]) -> Tensor:
        """The primary network on ``x`` ``[N, d_x]`` with per-example ``weights`` (as from
        :meth:`generated`); ``[N, out_features]``."""
        a = x
        n_layers = len(self.primary_hidden) + 1
        for i in range(1, n_layers + 1):
            w = weights[f"weight{i}"]
            scale = self.weight_std / math.sqrt(w.shape[-1])
            q = torch.bmm(w, a.unsqueeze(-1)).squeeze(-1) * scale
            if self.bias_std > 0:
                q = q + self.bias_std * weights[f"bias{i}"]
            a = self.activation(q) if i < n_layers else q
        return a

    def forward(self, u: Tensor) -> Tensor:
        x, z = self.split(u)
        return self.primary(x, self.generated(z))

    def extra_repr(self) -> str:
        return (f"x_features={self.x_features}, primary_hidden={self.primary_hidden}, "
                f"out_features={self.out_features}, weight_std={self.weight_std}, "
                f"bias_std={self.bias_std}, n_generated={self.n_generated}")
