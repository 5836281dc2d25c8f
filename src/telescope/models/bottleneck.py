"""Wide networks with one narrow bottleneck, and the infinite-width dynamics of the linear ones.

Littwin, Saremi, Zhai, Thilak, Goh, Susskind & Yang (2021), "Implicit Acceleration and Feature
Learning in Infinitely Wide Neural Networks with Bottlenecks" (arXiv:2107.00364) study a network
``F = f o g`` whose hidden layers are all wide (width ``n -> infinity``) except one, the
bottleneck, of finite width ``k``: ``g`` maps the input to ``z = g(x) in R^k`` and ``f`` maps ``z``
to the output. :class:`BottleneckMLP` is that network as an MLP in NTK parametrization
(:class:`~telescope.models.NTKLinear` layers)::

    x -> [NTKLinear(width), act] x (depth_before + 1) -> NTKLinear(k) = z        (g, "lower")
    z -> [NTKLinear(width), act] x (depth_after + 1)  -> NTKLinear(out) = F(x)   (f, "upper")

(``depth_before`` extra hidden layers below the first, ``depth_after`` above; ``depth_before =
depth_after = 0`` is the paper's setting of a one-hidden-layer ``f`` on a one-hidden-layer
``g``). The bottleneck ``z`` is the linear readout of ``g``, with no nonlinearity of its own, and
can be read through the hook point ``hook_bottleneck``. ``bottleneck=None`` gives the same
network with the bottleneck as wide as the other hidden layers ("no bottleneck").

Why a finite bottleneck is not a kernel method
----------------------------------------------
As ``n -> infinity`` with ``k`` fixed, ``g`` and ``f`` are each an infinitely wide network, so each
is a kernel machine with its own fixed NTK: ``z_t(x)`` moves by kernel gradient descent with
``Theta_g(x, x') I_k`` and the function ``f_t`` (on ``R^k``) with ``Theta_f(z, z')``. But ``f`` is
evaluated at the moving points ``z_t(x)``, so the NTK of the composition,

.. math::

    \\Theta_t(x, x') = \\Theta_f\\big(z_t(x), z_t(x')\\big)
        + \\nabla_z f_t(z_t(x))^\\top\\, \\Theta_g(x, x')\\, \\nabla_z f_t(z_t(x')),

changes by ``O(1)`` during training (data-dependent feature learning in the bottleneck), and the
network is *not* kernel regression with a fixed kernel; only ``k -> infinity`` recovers the NTK
limit. (``telescope.infinite`` describes networks whose every width is infinite, so it gives the
``k -> infinity`` comparison, not the bottleneck network's limit.)

Deep linear networks: the closed form
-------------------------------------
With ``activation="identity"`` (and ``weight_std = 1``, no biases) ``g(x) = A x`` and
``f(z) = B z`` are linear, ``A = W_{L1} ... W_1 / sqrt(d n^{L1 - 1})`` (``k x d``) and
``B = U_{L2} ... U_1 / sqrt(k n^{L2 - 1})`` (``O x k``), with ``L1 = depth_before + 2`` and
``L2 = depth_after + 2`` weight matrices below and above the bottleneck (:meth:`BottleneckMLP.
linear_factors`). As ``n -> infinity`` every Gram matrix of a partial product of the ``W``'s is a
multiple of the identity that does not move, and gradient flow ``d theta/dt = -lr grad L`` on
``L = (1/2N) sum_i ||F(x_i) - y_i||^2`` becomes the ODE (:func:`deep_linear_bottleneck_flow`)

.. math::

    \\frac{dA}{dt} = -\\mathrm{lr}\\,\\frac{L_1}{d}\\, B^\\top G, \\qquad
    \\frac{dB}{dt} = -\\mathrm{lr}\\,\\frac{L_2}{k}\\, G A^\\top, \\qquad
    G = \\frac{1}{N} (X A^\\top B^\\top - Y)^\\top X ,

with ``A_0`` i.i.d. ``N(0, 1/d)`` and ``B_0`` i.i.d. ``N(0, 1/k)`` at infinite width
(:func:`sample_linear_factors`): the infinitely wide deep linear network with a bottleneck is a
two-layer linear network of width ``k`` whose two layers learn at the rates ``L1/d`` and
``L2/k``. Its NTK ``x^T [(L2/k) A^T A] x' I_O + (L1/d) x^T x' B B^T`` starts at (in expectation)
the infinite network's ``(L1 + L2) x^T x' / d`` and grows along the directions being learned,
so the bottleneck network speeds up as it learns (the "implicit acceleration" of Arora, Cohen &
Hazan, 2018, "On the Optimization of Deep Networks: Implicit Acceleration by
Overparameterization"); as ``k -> infinity`` the change of the kernel vanishes and the ODE
becomes linear regression with the fixed kernel ``(L1 + L2) x^T x' / d``.

The simplified model (``d = k = O = 1``, whitened data, ``F = b a x``, target ``y = w x`` plus
noise independent of ``x``) is solvable: ``u = ab`` obeys

.. math::

    \\frac{du}{dt} = \\mathrm{lr}\\, R(u)\\, (w - u), \\qquad
    R(u) = L_1 b^2 + L_2 a^2 = \\sqrt{(L_1 L_2 c)^2 + 4 L_1 L_2 u^2},

where ``c = b^2/L_2 - a^2/L_1`` is conserved, and (:func:`scalar_bottleneck_time`)

.. math::

    \\mathrm{lr}\\, t(u) = \\frac{1}{R(w)} \\left[\\ln\\frac{\\beta^2 w s + \\alpha^2 + R(w) R(s)}
        {|w - s|}\\right]_{s = u_0}^{s = u}, \\qquad \\alpha = L_1 L_2 |c|,\\ \\beta^2 = 4 L_1 L_2 .

The rate ``R(u)`` starts near the infinite network's ``L1 + L2`` (``a, b ~ N(0, 1)``) and ends at
``R(w) >= 2 sqrt(L1 L2) |w|``: the larger the target, the larger the acceleration
(:func:`scalar_bottleneck_trajectory` inverts ``t(u)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from telescope.errors import UsageError
from telescope.models.hooks import HookPoint
from telescope.models.mlp import Erf, NTKLinear

__all__ = ["BottleneckMLP", "LinearFlow", "deep_linear_bottleneck_flow", "sample_linear_factors",
           "scalar_bottleneck_time", "scalar_bottleneck_trajectory"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "erf": Erf, "identity": nn.Identity}


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class BottleneckMLP(nn.Module):
    """A wide MLP in NTK parametrization with one bottleneck layer of width ``bottleneck``.

    ``x -> (width, act) x (depth_before + 1) -> bottleneck (linear) -> (width, act) x
    (depth_after + 1) -> out_features`` (see the module docstring; Littwin et al. 2021).

    Parameters
    ----------
    in_features, out_features
        Input and output sizes.
    width
        Width ``n`` of every wide hidden layer.
    bottleneck
        Width ``k`` of the bottleneck; ``None``: ``width`` (the same network without a
        bottleneck).
    depth_before, depth_after
        Extra wide hidden layers below / above the bottleneck (``0``: one wide hidden layer on
        each side).
    activation
        ``"relu"``, ``"tanh"``, ``"erf"`` or ``"identity"`` (a deep linear network).
    weight_std
        ``W_std`` of the layers fed by the activation; ``None``: ``sqrt(2)`` for ReLU (keeps the
        second moment of the pre-activations), ``1`` otherwise. The two layers fed by a linear
        input (the input ``x`` and the bottleneck ``z``) always use ``W_std = 1``.
    bias_std
        ``b_std`` of every layer (``0``: no biases).

    Attributes
    ----------
    lower, upper
        ``nn.Sequential`` of ``g`` (input to bottleneck) and ``f`` (bottleneck to output).
    hook_bottleneck
        :class:`~telescope.models.hooks.HookPoint` on ``z = g(x)`` ``[N, k]``.
    """

    def __init__(self, in_features: int, width: int, bottleneck: int | None, out_features: int,
                 *, depth_before: int = 0, depth_after: int = 0, activation: str = "relu",
                 weight_std: float | None = None, bias_std: float = 0.0) -> None:
        super().__init__()
        self.in_features = _check_int(in_features, "in_features", 1)
        self.width = _check_int(width, "width", 1)
        self.out_features = _check_int(out_features, "out_features", 1)
        self.bottleneck = self.width if bottleneck is None else _check_int(
            bottleneck, "bottleneck", 1)
        self.depth_before = _check_int(depth_before, "depth_before", 0)
        self.depth_after = _check_int(depth_after, "depth_after", 0)
        if activation not in _ACTIVATIONS:
            raise UsageError(f"activation must be one of {sorted(_ACTIVATIONS)}, "
                             f"got {activation!r}")
        self.activation = activation
        if weight_std is None:
            weight_std = math.sqrt(2.0) if activation == "relu" else 1.0
        if not (isinstance(weight_std, (int, float)) and math.isfinite(weight_std)
                and weight_std > 0):
            raise UsageError(f"weight_std must be a finite number > 0, got {weight_std!r}")
        if not (isinstance(bias_std, (int, float)) and math.isfinite(bias_std) and bias_std >= 0):
            raise UsageError(f"bias_std must be a finite number >= 0, got {bias_std!r}")
        self.weight_std, self.bias_std = float(weight_std), float(bias_std)

        def dense(n_in: int, n_out: int, std: float) -> NTKLinear:
            return NTKLinear(n_in, n_out, weight_std=std, bias_std=self.bias_std,
                             bias=self.bias_std > 0)

        def stack(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
            layers: list[nn.Module] = [dense(n_in, self.width, 1.0), _ACTIVATIONS[activation]()]
            for _ in range(hidden):
                layers += [dense(self.width, self.width, self.weight_std),
                           _ACTIVATIONS[activation]()]
            layers.append(dense(self.width, n_out, self.weight_std))
            return nn.Sequential(*layers)

        self.lower = stack(self.in_features, self.depth_before, self.bottleneck)
        self.hook_bottleneck = HookPoint()
        self.upper = stack(self.bottleneck, self.depth_after, self.out_features)

    @property
    def lower_layers(self) -> int:
        """``L1``: the weight matrices from the input to the bottleneck (``depth_before + 2``)."""
        return self.depth_before + 2

    @property
    def upper_layers(self) -> int:
        """``L2``: the weight matrices from the bottleneck to the output (``depth_after + 2``)."""
        return self.depth_after + 2

    def features(self, x: Tensor) -> Tensor:
        """The bottleneck representation ``z = g(x)`` ``[N, k]``."""
        return self.hook_bottleneck(self.lower(x.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.upper(self.features(x))

    def linear_factors(self) -> tuple[Tensor, Tensor]:
        """The end-to-end matrices ``(A [k, d], B [O, k])`` of a deep linear network, ``F(x) =
        B A x``: each the product of its side's weight matrices times their NTK scales
        ``W_std / sqrt(n_in)``, detached.

        Raises
        ------
        UsageError
            If the network is not linear (``activation != "identity"``) or has biases.
        """
        if self.activation != "identity" or self.bias_std > 0:
            raise UsageError("linear_factors needs a deep linear network: build BottleneckMLP "
                             "with activation='identity' and bias_std=0 (it is "
                             f"activation={self.activation!r}, bias_std={self.bias_std})")

        def product(seq: nn.Sequential) -> Tensor:
            m: Tensor | None = None
            for layer in seq:
                if isinstance(layer, NTKLinear):
                    w = layer.weight.detach() * layer.weight_scale
                    m = w if m is None else w @ m
            assert m is not None
            return m

        return product(self.lower), product(self.upper)


def sample_linear_factors(d: int, k: int, out: int = 1, *,
                          generator: torch.Generator | None = None,
                          dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """``(A_0, B_0)`` as an infinitely wide deep linear network with a bottleneck of width ``k``
    draws them: ``A_0 [k, d]`` i.i.d. ``N(0, 1/d)``, ``B_0 [out, k]`` i.i.d. ``N(0, 1/k)`` (the
    end-to-end products of ``W_std = 1`` NTK-parametrized layers, by the central limit theorem
    as the width grows)."""
    d, k, out = _check_int(d, "d", 1), _check_int(k, "k", 1), _check_int(out, "out", 1)
    a = torch.randn(k, d, generator=generator, dtype=dtype) / math.sqrt(d)
    b = torch.randn(out, k, generator=generator, dtype=dtype) / math.sqrt(k)
    return a, b


@dataclass(frozen=True)
class LinearFlow:
    """The solution of :func:`deep_linear_bottleneck_flow` at the requested times.

    Attributes
    ----------
    t
        Times ``[T]`` (float64; units of steps of size ``lr``, as in
        :func:`telescope.kernel_regression`).
    a, b
        ``A_t [T, k, d]`` and ``B_t [T, O, k]``.
    loss
        ``(1/2N) sum_i ||F_t(x_i) - y_i||^2`` on the training set ``[T]``.
    steps
        Runge-Kutta steps taken.
    """

    t: Tensor
    a: Tensor
    b: Tensor
    loss: Tensor
    steps: int

    def predict(self, x: Tensor) -> Tensor:
        """``F_t(x) = B_t A_t x`` at every time: ``[T, N, O]``."""
        x = x.reshape(x.shape[0], -1).to(self.a.dtype)
        return torch.einsum("nd,tkd,tok->tno", x, self.a, self.b)

    def ntk(self, x1: Tensor, x2: Tensor | None = None, *, lower_layers: int,
            upper_layers: int) -> Tensor:
        """The NTK of the infinitely wide network at every time, ``[T, N1, N2, O, O]``:
        ``Theta_t = (L2/k) x1^T A_t^T A_t x2 I_O + (L1/d) x1^T x2 B_t B_t^T``."""
        x1 = x1.reshape(x1.shape[0], -1).to(self.a.dtype)
        x2 = x1 if x2 is None else x2.reshape(x2.shape[0], -1).to(self.a.dtype)
        k, d = self.a.shape[1], self.a.shape[2]
        out = self.b.shape[1]
        za, zb = torch.einsum("nd,tkd->tnk", x1, self.a), torch.einsum("nd,tkd->tnk", x2, self.a)
        upper = (upper_layers / k) * torch.einsum("tnk,tmk->tnm", za, zb)
        lower = (lower_layers / d) * (x1 @ x2.T)
        bbt = torch.einsum("tok,tpk->top", self.b, self.b)
        eye = torch.eye(out, dtype=self.a.dtype)
        return (upper[:, :, :, None, None] * eye
                + lower[None, :, :, None, None] * bbt[:, None, None])


def _as_times(times: object) -> Tensor:
    t = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise UsageError(f"times must be a non-empty list of finite numbers >= 0, got {times!r}")
    if bool((t[1:] < t[:-1]).any()):
        raise UsageError(f"times must be sorted in increasing order, got {t.tolist()}")
    return t


def deep_linear_bottleneck_flow(
    x: Tensor, y: Tensor, a0: Tensor, b0: Tensor, times: Sequence[float] | Tensor, *,
    lower_layers: int, upper_layers: int, lr: float = 1.0, accuracy: float = 0.05,
) -> LinearFlow:
    """Gradient flow of an infinitely wide deep linear network with a bottleneck of width ``k``.

    Integrates (module docstring: the infinite-width reduction of the deep linear network with a
    bottleneck that Littwin et al. 2021 use to explain the acceleration, written out here)

    .. math::

        \\frac{dA}{dt} = -\\mathrm{lr}\\,\\frac{L_1}{d} B^\\top G, \\quad
        \\frac{dB}{dt} = -\\mathrm{lr}\\,\\frac{L_2}{k} G A^\\top, \\quad
        G = \\tfrac{1}{N} (X A^\\top B^\\top - Y)^\\top X ,

    gradient flow on ``(1/2N) sum_i ||B A x_i - y_i||^2`` of the network with ``L1`` weight
    matrices below the bottleneck and ``L2`` above (``W_std = 1``, no biases), in float64 by the
    classical fourth-order Runge-Kutta method. The step is ``accuracy / rate``, where ``rate =
    lr [lambda_max(X^T X / N) ((L2/k) ||A||_2^2 + (L1/d) ||B||_2^2) + sqrt(L1 L2 / (d k))
    ||G||_F]`` bounds the Jacobian of the right-hand side (the first term: the fastest mode of the
    current NTK; the second: the coupling of the two factors through the residual), re-evaluated
    at every step and shortened to land on each requested time.

    Parameters
    ----------
    x, y
        Training inputs ``[N, d]`` (flattened) and targets ``[N]`` or ``[N, O]``.
    a0, b0
        ``A_0 [k, d]`` and ``B_0 [O, k]`` (:func:`sample_linear_factors`, or a finite network's
        :meth:`BottleneckMLP.linear_factors`).
    times
        Sorted times ``>= 0`` in units of steps of size ``lr``.
    lower_layers, upper_layers
        ``L1, L2 >= 1`` (``BottleneckMLP.lower_layers`` / ``upper_layers``).
    lr
        Learning rate ``> 0`` (only ``lr * t`` matters).
    accuracy
        Step size relative to the fastest mode (``<= 0.5``); the local error of RK4 falls like
        its fifth power.

    Returns
    -------
    LinearFlow
        ``A_t``, ``B_t`` and the training loss at ``times``.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise UsageError("x and y must be torch tensors")
    xs = x.reshape(x.shape[0], -1).to(torch.float64)
    ys = y.to(torch.float64)
    ys = ys[:, None] if ys.dim() == 1 else ys
    if ys.dim() != 2 or ys.shape[0] != xs.shape[0]:
        raise UsageError(f"y must be [N] or [N, O] with the N = {xs.shape[0]} rows of x, "
                         f"got shape {tuple(y.shape)}")
    n, d = xs.shape
    a, b = a0.detach().to(torch.float64).clone(), b0.detach().to(torch.float64).clone()
    if a.dim() != 2 or a.shape[1] != d:
        raise UsageError(f"a0 must be [k, d] with d = {d} (the inputs' size), got "
                         f"{tuple(a0.shape)}")
    k = a.shape[0]
    if b.dim() != 2 or b.shape != (ys.shape[1], k):
        raise UsageError(f"b0 must be [O, k] = [{ys.shape[1]}, {k}] (outputs of y, rows of a0), "
                         f"got {tuple(b0.shape)}")
    l1 = _check_int(lower_layers, "lower_layers", 1)
    l2 = _check_int(upper_layers, "upper_layers", 1)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UsageError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(accuracy, (int, float)) and 0 < accuracy <= 0.5):
        raise UsageError(f"accuracy must lie in (0, 0.5], got {accuracy!r}")
    t_out = _as_times(times)

    xtx = xs.T @ xs / n
    xty = xs.T @ ys / n                     # [d, O]
    lam = float(torch.linalg.eigvalsh(xtx)[-1])

    def deriv(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        g = b @ a @ xtx - xty.T             # [O, d]: (1/N) E^T X
        return -lr * (l1 / d) * (b.T @ g), -lr * (l2 / k) * (g @ a.T)

    def loss(a: Tensor, b: Tensor) -> float:
        return 0.5 * float(((xs @ (b @ a).T - ys) ** 2).sum()) / n

    def rate(a: Tensor, b: Tensor) -> float:
        sa = float(torch.linalg.matrix_norm(a, 2)) ** 2
        sb = float(torch.linalg.matrix_norm(b, 2)) ** 2
        g = float(torch.linalg.matrix_norm(b @ a @ xtx - xty.T))
        return lr * (lam * (l2 / k * sa + l1 / d * sb) + math.sqrt(l1 * l2 / (d * k)) * g)

    now, steps = 0.0, 0
    a_out, b_out, l_out = [], [], []
    for target in t_out.tolist():
        while now < target:
            r = rate(a, b)
            h = min(target - now, accuracy / r if r > 0 else target - now)
            k1 = deriv(a, b)
            k2 = deriv(a + 0.5 * h * k1[0], b + 0.5 * h * k1[1])
            k3 = deriv(a + 0.5 * h * k2[0], b + 0.5 * h * k2[1])
            k4 = deriv(a + h * k3[0], b + h * k3[1])
            a = a + (h / 6) * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
            b = b + (h / 6) * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
            now = target if target - now <= h else now + h
            steps += 1
            if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
                raise UsageError(f"deep_linear_bottleneck_flow diverged at t = {now:g}; lower "
                                 "accuracy (a smaller step)")
        a_out.append(a.clone())
        b_out.append(b.clone())
        l_out.append(loss(a, b))
    return LinearFlow(t=t_out, a=torch.stack(a_out), b=torch.stack(b_out),
                      loss=torch.tensor(l_out, dtype=torch.float64), steps=steps)


def _scalar_args(a0: float, b0: float, lower_layers: int, upper_layers: int
                 ) -> tuple[float, float, float]:
    """``(u0, alpha, beta^2)`` of the simplified model."""
    for name, v in (("a0", a0), ("b0", b0)):
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise UsageError(f"{name} must be a finite number, got {v!r}")
    l1 = _check_int(lower_layers, "lower_layers", 1)
    l2 = _check_int(upper_layers, "upper_layers", 1)
    c = b0 * b0 / l2 - a0 * a0 / l1
    return float(a0 * b0), float(l1 * l2 * abs(c)), float(4 * l1 * l2)


def _scalar_antiderivative(s: float, w: float, alpha: float, beta2: float) -> float:
    """``Phi(s)`` with ``dPhi/ds = 1 / ((w - s) R(s))``, ``R(s) = sqrt(alpha^2 + beta2 s^2)``."""
    rw = math.sqrt(alpha * alpha + beta2 * w * w)
    rs = math.sqrt(alpha * alpha + beta2 * s * s)
    return math.log((beta2 * w * s + alpha * alpha + rw * rs) / abs(w - s)) / rw


def scalar_bottleneck_time(u: float, *, a0: float, b0: float, target: float,
                           lower_layers: int, upper_layers: int, lr: float = 1.0) -> float:
    """The time at which ``u = ab`` of the simplified model reaches ``u`` (closed form).

    The model (module docstring): ``d = k = O = 1``, whitened data, ``F(x) = b a x`` with
    ``da/dt = -lr L1 b (ab - w)``, ``db/dt = -lr L2 a (ab - w)`` (gradient flow on
    ``(1/2)(ab - w)^2``, the loss up to a constant for ``E[x^2] = 1`` and targets ``w x`` plus
    independent noise). Then ``u`` moves monotonically from ``u0 = a0 b0`` towards ``w`` and

    .. math::

        \\mathrm{lr}\\, t(u) = \\Phi(u) - \\Phi(u_0),\\quad
        \\Phi(s) = \\frac{1}{R(w)} \\ln \\frac{\\beta^2 w s + \\alpha^2 + R(w) R(s)}{|w - s|},

    ``R(s) = sqrt(alpha^2 + beta^2 s^2)``, ``alpha = L1 L2 |b0^2/L2 - a0^2/L1|``, ``beta^2 = 4 L1
    L2``. Returns ``inf`` for ``u = w`` and raises for a ``u`` not between ``u0`` and ``w``.
    """
    u0, alpha, beta2 = _scalar_args(a0, b0, lower_layers, upper_layers)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UsageError(f"lr must be a finite number > 0, got {lr!r}")
    w = float(target)
    lo, hi = min(u0, w), max(u0, w)
    if not lo <= u <= hi:
        raise UsageError(f"u = {u:g} is never reached: u = ab moves from u0 = {u0:g} to the "
                         f"target {w:g}")
    if u == u0:
        return 0.0
    if u == w:
        return math.inf
    if alpha == 0.0 and u0 == 0.0:
        return math.inf                     # the saddle at a = b = 0 never moves
    if alpha == 0.0 and u0 * w < 0:
        raise UsageError("balanced factors (b0^2/L2 = a0^2/L1) with a0 b0 of the sign opposite "
                         "to the target stop at u = 0 and never reach it")
    return (_scalar_antiderivative(u, w, alpha, beta2)
            - _scalar_antiderivative(u0, w, alpha, beta2)) / lr


def scalar_bottleneck_trajectory(times: Sequence[float] | Tensor, *, a0: float, b0: float,
                                 target: float, lower_layers: int, upper_layers: int,
                                 lr: float = 1.0) -> Tensor:
    """``u(t) = a_t b_t`` of the simplified model at ``times`` (float64 ``[T]``): the closed form
    of :func:`scalar_bottleneck_time`, inverted by bisection (``t(u)`` is monotone), to about
    ``1e-12`` relative to ``|w - u0|``. The loss is ``(u(t) - w)^2 / 2`` (plus the noise
    floor)."""
    t = _as_times(times)
    u0, _, _ = _scalar_args(a0, b0, lower_layers, upper_layers)
    w = float(target)
    out = []
    for ti in t.tolist():
        lo, hi = u0, w                      # t(lo) <= ti < t(hi) = inf
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            tm = scalar_bottleneck_time(mid, a0=a0, b0=b0, target=w, lower_layers=lower_layers,
                                        upper_layers=upper_layers, lr=lr)
            if tm <= ti:
                lo = mid
            else:
                hi = mid
        out.append(0.5 * (lo + hi))
    return torch.tensor(out, dtype=torch.float64)
