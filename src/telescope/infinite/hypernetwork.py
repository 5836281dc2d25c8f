r"""The infinite-width kernels of a hypernetwork (Littwin, Galanti, Wolf & Yang 2020).

A hypernetwork ``h(x, z) = f(x; g(z))`` (:class:`telescope.models.HyperNetwork`): the
meta-network ``g`` maps the task embedding ``z`` to *all* the weights of an NTK-parametrized
primary MLP ``f`` of depth ``H`` on ``x``; only ``g``'s parameters ``w`` are trained. "On
Infinite-Width Hypernetworks" (NeurIPS 2020) shows that the hypernetwork is a Gaussian process
with a deterministic NTK, the *hyperkernel*, only when both the meta-network and the primary
network are infinitely wide, and that this kernel is a Hadamard (elementwise) product of a
kernel of the meta-network on ``z`` and a kernel of the primary network on ``x``. (The paper
names the meta-network ``f`` and the primary ``g``; here the letters follow ``h = f(x; g(z))``.)

Derivation (the limit used here, written out so that it can be checked)
-----------------------------------------------------------------------
Let ``S(z, z') = Sigma^g`` and ``T(z, z') = Theta^g`` be the NNGP and NTK of *one output* of the
meta-network (its body followed by its readout ``Dense(P, meta_W_std, meta_b_std)``;
:mod:`telescope.infinite` computes them). As the meta width ``n -> infinity`` its ``P`` outputs
are independent Gaussian processes with covariance ``S`` and its output NTK is ``T`` times the
identity over outputs. Every primary weight ``W^l_{ij}(z)`` and bias ``b^l_i(z)`` is one such
output, so for the pair ``u = (x, z)``, ``u' = (x', z')`` the primary network runs with weights
that are *correlated across the two tasks* with correlation ``S(z, z')``. Its forward pass and
its gradient then give, as the primary widths ``m -> infinity`` too, the recursion (with
``pre^l`` the covariance a layer sees, ``K_x = x.x' / d_x``):

.. math::

    pre^1 = \sigma_w^2 K_x + \sigma_b^2, \qquad
    \Sigma^l = S \odot pre^l, \qquad
    \Theta^l = S \odot \sigma_w^2\, \dot\Sigma^{l}\odot\Theta^{l-1} + T \odot pre^l,

    pre^{l+1} = \sigma_w^2\, E[\phi(a)\phi(b)] + \sigma_b^2, \qquad
    \dot\Sigma^{l+1} = E[\phi'(a)\phi'(b)], \qquad (a, b) \sim N(0, \Sigma^l),

and ``(Sigma^h, Theta^h) = (Sigma^H, Theta^H)`` (``Theta^0 = 0``, ``Sigma-dot^1 = 1``). The
``S`` factors are the covariance of a layer's generated weights across the two tasks (in place
of the ``1`` of an ordinary layer with ``N(0, 1)`` weights); the ``T`` term is the derivative
through the layer's own generated weights, ``<d W(z)/dw, d W(z')/dw> = T(z, z')``. Unrolled,

.. math::

    \Theta^h(u, u') = \Theta^g(z, z') \cdot Q(u, u'), \qquad
    Q = \sum_{l=1}^{H} pre^l \prod_{k=l+1}^{H} S\, \sigma_w^2\, \dot\Sigma^k ,

the Hadamard product of the meta-network's NTK with the primary network's NTK ``Q``
computed with ``Sigma^g(z, z')`` as the covariance of its weights (:meth:`HyperMLP.kernel`).
``Q`` is the primary's own NTK ``Theta^f(x, x')`` exactly when the weights it sees are the
ordinary ones, ``S = 1`` on the pair and on both diagonals, so the plain product of the two
networks' own kernels (:meth:`HyperMLP.hadamard`),

.. math::

    \Theta^h = \Theta^g(z, z') \odot \Theta^f(x, x'), \qquad
    \Sigma^h = \Sigma^g(z, z') \odot \Sigma^f(x, x'),

holds exactly (a) for a linear primary (``H = 1``: ``Theta^f = Sigma^f = pre^1``) whatever
``S`` is, and (b) for pairs of one task (``z = z'``) when the meta's output variance is
``S(z, z) = 1``; for a nonlinear primary on pairs of different tasks the correlation
``S(z, z') / sqrt(S(z, z) S(z', z'))`` enters the primary's nonlinearities and the plain product
is only an approximation (the ``hypernetwork-ntk`` study measures how far).

For a *finite* primary network the kernel stays random even for an infinitely wide meta-network
(the primary's weights ``g(z)`` are Gaussian but not averaged over), and the hypernetwork is
not linear in ``w``: its first ``H`` Taylor terms stay of order one (the paper's result for a
primary network of fixed size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from telescope.errors import UsageError, check_positive_int, check_std
from telescope.infinite._front import input_covariances
from telescope.infinite._layer import ElementwiseLayer, ElementwiseModule, Layer
from telescope.infinite._state import Covariances
from telescope.infinite.activations import Relu
from telescope.infinite.combinators import serial
from telescope.infinite.layers import Dense
from telescope.models.hypernetwork import HyperNetwork, primary_shapes

__all__ = ["HyperMLP"]


class HyperMLP:
    """One description of a hypernetwork with an MLP primary: the finite network
    (:meth:`module`, a :class:`telescope.models.HyperNetwork`) and its infinite-width NNGP and
    NTK (:meth:`kernel`, the module docstring's recursion).

    Parameters
    ----------
    meta:
        The meta-network's body as a :mod:`telescope.infinite` description on flat ``z``
        ``[N, d_z]``, e.g. ``serial(Dense(512), Relu())``; its readout ``Dense(P, meta_W_std,
        meta_b_std)`` to the ``P`` primary weights is added here.
    x_features:
        ``d_x``; the inputs are ``u = [x, z]`` (``[N, d_x + d_z]``, see
        :meth:`telescope.models.HyperNetwork.join`).
    primary_hidden:
        The primary's hidden widths (they set the finite module; the kernel is their limit).
    out_features:
        Outputs of the primary (each has the same kernel; different outputs are uncorrelated).
    activation:
        The primary's nonlinearity, an elementwise :mod:`telescope.infinite` layer (``Relu()``
        by default, ``Erf()``, ``Tanh()``, ...).
    W_std, b_std:
        The primary's ``sigma_w``, ``sigma_b`` (``b_std = 0``: no biases are generated).
    meta_W_std, meta_b_std:
        The meta readout's scales.

    Example
    -------
    ::

        from telescope import infinite as inf
        from telescope.infinite.hypernetwork import HyperMLP

        arch = HyperMLP(inf.serial(inf.Dense(1024), inf.Relu()), x_features=2,
                        primary_hidden=(256,), b_std=0.5)
        k = arch.kernel(u)                 # {"nngp": [N, N], "ntk": [N, N]}, u = [x, z]
        net = arch.module(z_features=3)    # its empirical NTK (telescope.ntk) tends to k["ntk"]
    """

    def __init__(self, meta: Layer, x_features: int, primary_hidden: Sequence[int] = (),
                 out_features: int = 1, *, activation: ElementwiseLayer | None = None,
                 W_std: float = 1.0, b_std: float = 0.0, meta_W_std: float = 1.0,
                 meta_b_std: float = 0.0) -> None:
        if not isinstance(meta, Layer):
            raise UsageError(
                f"meta must be a telescope.infinite description of the meta-network's body "
                f"(e.g. serial(Dense(512), Relu())), got {type(meta).__name__}")
        activation = Relu() if activation is None else activation
        if not isinstance(activation, ElementwiseLayer):
            raise UsageError(
                "activation must be an elementwise telescope.infinite layer (Relu(), Erf(), "
                f"Tanh(), Elementwise(fn)...), got {type(activation).__name__}")
        if isinstance(primary_hidden, (str, bytes)) or not isinstance(primary_hidden, Sequence):
            raise UsageError(f"primary_hidden must be a sequence of widths, got "
                             f"{primary_hidden!r}")
        self.meta = meta
        self.x_features = check_positive_int(x_features, "x_features")
        self.primary_hidden = tuple(check_positive_int(w, "every primary_hidden width")
                                    for w in primary_hidden)
        self.out_features = check_positive_int(out_features, "out_features")
        self.activation = activation
        self.W_std = check_std(W_std, "W_std")
        self.b_std = check_std(b_std, "b_std")
        self.meta_W_std = check_std(meta_W_std, "meta_W_std")
        self.meta_b_std = check_std(meta_b_std, "meta_b_std")

    def __repr__(self) -> str:
        return (f"HyperMLP(meta={self.meta!r}, x_features={self.x_features}, primary_hidden="
                f"{self.primary_hidden}, activation={self.activation!r}, W_std={self.W_std}, "
                f"b_std={self.b_std}, meta_W_std={self.meta_W_std}, "
                f"meta_b_std={self.meta_b_std})")

    @property
    def n_generated(self) -> int:
        """``P``: the number of primary weights the meta-network writes."""
        return sum(math.prod(s) for _, s in primary_shapes(
            self.x_features, self.primary_hidden, self.out_features, bias=self.b_std > 0))

    def meta_network(self) -> Layer:
        """The meta-network with its readout, ``serial(meta, Dense(P, meta_W_std,
        meta_b_std))`` (its kernel is that of every one of its outputs)."""
        return serial(self.meta, Dense(self.n_generated, self.meta_W_std, self.meta_b_std))

    def primary_network(self) -> Layer:
        """The primary MLP as an ordinary network with its own ``N(0, 1)`` weights:
        ``serial(Dense(m_1, W_std, b_std), activation, ..., Dense(out, W_std, b_std))``."""
        layers: list[Layer] = []
        for width in self.primary_hidden:
            layers += [Dense(width, self.W_std, self.b_std), self.activation]
        layers.append(Dense(self.out_features, self.W_std, self.b_std))
        return serial(*layers)

    def module(self, z_features: int) -> HyperNetwork:
        """The finite hypernetwork for task embeddings of ``z_features`` numbers (NTK
        parametrization, torch's global RNG, the default dtype): its input is ``[N, d_x +
        z_features]``."""
        meta = self.meta_network().module((check_positive_int(z_features, "z_features"),))
        act = ElementwiseModule(self.activation.function, repr(self.activation))
        return HyperNetwork(meta, self.x_features, self.primary_hidden, self.out_features,
                            activation=act, weight_std=self.W_std, bias_std=self.b_std)

    # ------------------------------------------------------------------ kernels

    def _split(self, u: object, name: str) -> tuple[Tensor, Tensor]:
        if not isinstance(u, Tensor) or u.dim() != 2 or u.shape[1] <= self.x_features:
            shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise UsageError(
                f"{name} must be u = [x, z] of shape [N, d_x + d_z] with d_x = "
                f"{self.x_features} and d_z >= 1 (HyperNetwork.join(x, z)), got {shape}")
        if u.shape[0] == 0:
            raise UsageError(f"{name} is empty")
        return u[:, :self.x_features], u[:, self.x_features:]

    def _meta_kernels(self, z1: Tensor, z2: Tensor | None,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``S``, ``T`` between the examples and the diagonals ``S(z1, z1)``, ``S(z2, z2)``,
        computed once per distinct task embedding (a task set has few)."""
        arch = self.meta_network()
        t1, inv1 = torch.unique(z1, dim=0, return_inverse=True)
        if z2 is None:
            k = arch.kernel(t1, dtype=dtype)
            s, t = k["nngp"][inv1][:, inv1], k["ntk"][inv1][:, inv1]
            d1 = k["nngp"].diagonal()[inv1]
            return s, t, d1, d1
        t2, inv2 = torch.unique(z2, dim=0, return_inverse=True)
        k = arch.kernel(t1, t2, dtype=dtype)
        d1 = arch.kernel(t1, dtype=dtype)["nngp"].diagonal()[inv1]
        d2 = arch.kernel(t2, dtype=dtype)["nngp"].diagonal()[inv2]
        return k["nngp"][inv1][:, inv2], k["ntk"][inv1][:, inv2], d1, d2

    def kernel(self, u1: Tensor, u2: Tensor | None = None, *,
               dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
        """The hyperkernel: the infinite-width (meta and primary) NNGP and NTK ``[N1, N2]``
        of one output of the hypernetwork between ``u1 = [x1, z1]`` and ``u2 = [x2, z2]``
        (``None``: ``u1``), by the recursion of the module docstring; the NTK is with respect
        to the meta-network's parameters, the only ones a :class:`~telescope.models.
        HyperNetwork` has."""
        x1, z1 = self._split(u1, "u1")
        if u2 is u1:
            u2 = None
        x2 = z2 = None
        if u2 is not None:
            x2, z2 = self._split(u2, "u2")
            if u2.shape[1] != u1.shape[1]:
                raise UsageError(f"u1 and u2 must have the same width, got {u1.shape[1]} and "
                                 f"{u2.shape[1]}")
        s, t, s1, s2 = self._meta_kernels(z1, z2, dtype)
        state = input_covariances(x1, x2, "flat", dtype)
        w_var, b_var = self.W_std**2, self.b_std**2
        for layer in range(len(self.primary_hidden) + 1):
            if layer > 0:
                out = self.activation.apply(state)
                assert isinstance(out, Covariances)
                state = out
            state = _generated_dense(state, s, t, s1, s2, w_var, b_var)
        return {"nngp": state.nngp, "ntk": state.ntk}

    def factors(self, u1: Tensor, u2: Tensor | None = None, *,
                dtype: torch.dtype = torch.float64) -> dict[str, dict[str, Tensor]]:
        """The two networks' own infinite-width kernels on the examples' parts:
        ``{"meta": meta_network().kernel(z1, z2), "primary": primary_network().kernel(x1,
        x2)}``, each ``{"nngp", "ntk"}`` ``[N1, N2]``."""
        x1, z1 = self._split(u1, "u1")
        x2 = z2 = None
        if u2 is not None and u2 is not u1:
            x2, z2 = self._split(u2, "u2")
        return {"meta": self.meta_network().kernel(z1, z2, dtype=dtype),
                "primary": self.primary_network().kernel(x1, x2, dtype=dtype)}

    def hadamard(self, u1: Tensor, u2: Tensor | None = None, *,
                 dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
        """The plain Hadamard product of the two networks' own kernels,
        ``Sigma^g(z, z') Sigma^f(x, x')`` and ``Theta^g(z, z') Theta^f(x, x')``: the hyperkernel
        exactly for a linear primary or for pairs with ``S = 1`` (module docstring), an
        approximation otherwise."""
        k = self.factors(u1, u2, dtype=dtype)
        return {name: k["meta"][name] * k["primary"][name] for name in ("nngp", "ntk")}


def _generated_dense(state: Covariances, s: Tensor, t: Tensor, s1: Tensor, s2: Tensor,
                     w_var: float, b_var: float) -> Covariances:
    """A primary layer whose weights and biases the meta-network writes: ``pre = w_var K +
    b_var``, ``K' = S pre``, ``Theta' = S w_var Theta + T pre`` (and each batch's own
    variances times ``S(z, z)``)."""
    pre = w_var * state.nngp + b_var
    var1 = s1 * (w_var * state.var1 + b_var)
    var2 = var1 if state.symmetric else s2 * (w_var * state.var2 + b_var)
    return state.replace(nngp=s * pre, ntk=s * (w_var * state.ntk) + t * pre, var1=var1,
                         var2=var2, gaussian=True, fresh=True)
