"""Nonlinearities of :mod:`telescope.infinite`: elementwise maps and their Gaussian expectations.

Every layer here is an :class:`~telescope.infinite._layer.ElementwiseLayer`: for
``(u, v) ~ N(0, [[k11, k12], [k12, k22]])`` it computes ``E[phi(u) phi(v)]`` (the next NNGP) and
``E[phi'(u) phi'(v)]`` (the factor on the NTK), elementwise over broadcastable tensors. The
closed forms are those of neural-tangents' ``stax`` (Novak et al. 2020), with its conventions
where they change numbers: angles are taken as ``atan2(sqrt(max(k11 k22 - k12^2, 0)), k12)``,
so the cosine is clipped to ``[-1, 1]`` and the diagonal ``k12 == k11 == k22`` gives an angle of
exactly 0; ``atan2(0, 0)`` (a zero-variance input) is read as ``pi / 2``.

* :class:`Relu`, :class:`LeakyRelu`, :class:`Abs`, :class:`ABRelu`: arc-cosine kernels
  (Cho & Saul 2009);
* :class:`Erf`: Williams (1997);
* :class:`Gelu`: Tsuchida, Pearce, van der Heide, Roosta & Gallagher (2021);
* :class:`Sin`, :class:`Cos`: the characteristic function of the Gaussian;
* :class:`Elementwise`: any elementwise torch function by 2-D Gauss-Hermite quadrature
  (neural-tangents' ``ElementwiseNumerical``; Han et al. 2022), and :class:`Tanh` through it.

Zero variances give finite numbers (the square roots are clamped at 0 and have zero gradient
there, as neural-tangents' ``_sqrt``), never NaN.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from telescope.errors import UsageError, check_positive_int, warn
from telescope.infinite._layer import ElementwiseLayer, Shape

__all__ = ["ABRelu", "Relu", "LeakyRelu", "Abs", "Erf", "Gelu", "Sin", "Cos", "Elementwise",
           "Tanh"]

_PI = math.pi
_MAX_DEG = 256  # numpy's hermgauss is accurate up to here (it overflows by deg 400)
_TINY = 1e-30  # below this a square root's argument counts as 0 (neural-tangents' _sqrt)


def _real(value: object, name: str) -> float:
    """A finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise UsageError(f"{name} must be finite, got {value}")
    return value


class _SafeSqrt(torch.autograd.Function):
    """``sqrt(max(x, 0))`` whose gradient is 0 (not infinite) where ``x <= 1e-30``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        root = torch.sqrt(torch.clamp(x, min=0.0))
        ctx.save_for_backward(x, root)
        return root

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, root = ctx.saved_tensors
        live = x > _TINY
        return torch.where(live, grad / (2.0 * torch.where(live, root, 1.0)), 0.0)


def _sqrt(x: Tensor) -> Tensor:
    return _SafeSqrt.apply(x)


def _angle(sine: Tensor, cosine: Tensor) -> Tensor:
    """``atan2(sine, cosine)`` with ``atan2(0, 0) = pi / 2`` (evaluated as ``atan2(1, 0)``,
    which also keeps the gradient finite there)."""
    origin = (sine == 0) & (cosine == 0)
    return torch.atan2(torch.where(origin, 1.0, sine), torch.where(origin, 0.0, cosine))


def _broadcast(k12: Tensor, k11: Tensor, k22: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    k12, k11, k22 = torch.broadcast_tensors(torch.as_tensor(k12), torch.as_tensor(k11),
                                            torch.as_tensor(k22))
    return k12, k11, k22


# --------------------------------------------------------------------------- rectifiers


class ABRelu(ElementwiseLayer):
    r"""``phi(x) = a min(x, 0) + b max(x, 0)`` (neural-tangents' ``stax.ABRelu``).

    With ``s = sqrt(k11 k22 - k12^2)`` and the angle ``theta = atan2(s, k12)`` between the two
    inputs (``cos(theta) = k12 / sqrt(k11 k22)``), the arc-cosine kernels of Cho & Saul (2009),
    "Kernel methods for deep learning" (generalized to two slopes as in Tsuchida, Roosta &
    Gallagher 2018, "Invariance of weight distributions in rectified MLPs"):

    ``E[phi'(u) phi'(v)] = (a^2 + b^2) / 2 - (a - b)^2 theta / (2 pi)``,

    ``E[phi(u) phi(v)] = (a - b)^2 s / (2 pi) + E[phi'(u) phi'(v)] k12``.

    On the diagonal ``k12 == k11 == k22`` these are exactly ``(a^2 + b^2) / 2`` times ``k11``
    and ``1``. A zero-variance input (``theta`` read as ``pi / 2``) behaves as if
    ``phi'(0) = (a + b) / 2``.
    """

    def __init__(self, a: float, b: float) -> None:
        self.a = _real(a, "a")
        self.b = _real(b, "b")

    @property
    def odd(self) -> bool:
        return self.a == self.b  # linear

    def __repr__(self) -> str:
        return f"ABRelu(a={self.a}, b={self.b})"

    def function(self, x: Tensor) -> Tensor:
        return self.a * torch.clamp(x, max=0.0) + self.b * torch.clamp(x, min=0.0)

    def expectations(self, k12: Tensor, k11: Tensor, k22: Tensor, *,
                     derivative: bool = True) -> tuple[Tensor, Tensor | None]:
        jump = (self.a - self.b) ** 2 / (2 * _PI)
        mean_square = (self.a**2 + self.b**2) / 2
        k12, k11, k22 = (torch.as_tensor(k) for k in (k12, k11, k22))
        if not torch.is_grad_enabled() or not any(k.requires_grad for k in (k12, k11, k22)):
            return self._fast(k12, k11, k22, jump, mean_square, derivative)
        k12, k11, k22 = _broadcast(k12, k11, k22)
        s = _sqrt(k11 * k22 - k12 * k12)
        theta = _angle(s, k12)
        dot = mean_square - jump * theta
        return jump * s + dot * k12, (dot if derivative else None)

    @staticmethod
    def _fast(k12: Tensor, k11: Tensor, k22: Tensor, jump: float, mean_square: float,
              derivative: bool) -> tuple[Tensor, Tensor | None]:
        """The same numbers with a third of the full-size temporaries (in place; no graph)."""
        # not addcmul: a fused multiply-add leaves the rounding residual of k^2 - k^2 on the
        # diagonal, where the angle must be exactly 0
        s = (k11 * k22).sub_(k12 * k12).clamp_(min=0.0).sqrt_()
        theta = torch.atan2(s, k12)
        if bool((k11 <= 0).any()) or bool((k22 <= 0).any()):   # atan2(0, 0) reads as pi / 2
            theta = torch.where((s == 0) & (k12 == 0), _PI / 2, theta)
        dot = theta.mul_(-jump).add_(mean_square)          # theta is not needed any more
        nngp = torch.addcmul(s.mul_(jump), dot, k12)
        return nngp, (dot if derivative else None)


class Relu(ABRelu):
    r"""``phi(x) = max(x, 0)``: :class:`ABRelu` with ``a = 0``, ``b = 1``.

    The arc-cosine kernels of degree 1 and 0 (Cho & Saul 2009, "Kernel methods for deep
    learning"), ``theta = arccos(k12 / sqrt(k11 k22))``:

    ``E[phi(u) phi(v)] = sqrt(k11 k22) (sin(theta) + (pi - theta) cos(theta)) / (2 pi)``,

    ``E[phi'(u) phi'(v)] = (pi - theta) / (2 pi)``.
    """

    def __init__(self) -> None:
        super().__init__(0.0, 1.0)

    def __repr__(self) -> str:
        return "Relu()"

    def function(self, x: Tensor) -> Tensor:
        return torch.relu(x)


class LeakyRelu(ABRelu):
    """``phi(x) = alpha min(x, 0) + max(x, 0)``: :class:`ABRelu` with ``a = alpha``, ``b = 1``
    (arc-cosine kernels, Cho & Saul 2009; Tsuchida, Roosta & Gallagher 2018)."""

    def __init__(self, alpha: float) -> None:
        super().__init__(_real(alpha, "alpha"), 1.0)

    def __repr__(self) -> str:
        return f"LeakyRelu({self.a})"

    def function(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.a)


class Abs(ABRelu):
    """``phi(x) = |x|``: :class:`ABRelu` with ``a = -1``, ``b = 1``, so
    ``E[phi(u) phi(v)] = (2 / pi) (s + (pi / 2 - theta) k12)`` and
    ``E[phi'(u) phi'(v)] = 1 - 2 theta / pi`` (Cho & Saul 2009)."""

    def __init__(self) -> None:
        super().__init__(-1.0, 1.0)

    def __repr__(self) -> str:
        return "Abs()"

    def function(self, x: Tensor) -> Tensor:
        return torch.abs(x)


# --------------------------------------------------------------------------- smooth closed forms


class Erf(ElementwiseLayer):
    r"""``phi(x) = a erf(b x) + c`` (neural-tangents' ``stax.Erf``).

    Williams (1997), "Computing with infinite networks": with ``d_i = 1 + 2 b^2 k_ii``,

    ``E[phi(u) phi(v)] = a^2 (2 / pi) arcsin(2 b^2 k12 / sqrt(d_1 d_2)) + c^2``,

    ``E[phi'(u) phi'(v)] = a^2 b^2 (4 / pi) / sqrt(d_1 d_2 - 4 b^4 k12^2)``

    (the arcsine is evaluated as ``atan2(2 b^2 k12, sqrt(d_1 d_2 - 4 b^4 k12^2))``).
    """

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> None:
        self.a = _real(a, "a")
        self.b = _real(b, "b")
        self.c = _real(c, "c")

    @property
    def odd(self) -> bool:
        return self.c == 0

    def __repr__(self) -> str:
        return f"Erf(a={self.a}, b={self.b}, c={self.c})"

    def function(self, x: Tensor) -> Tensor:
        return self.a * torch.erf(self.b * x) + self.c

    def expectations(self, k12: Tensor, k11: Tensor, k22: Tensor, *,
                     derivative: bool = True) -> tuple[Tensor, Tensor | None]:
        k12, k11, k22 = _broadcast(k12, k11, k22)
        b2 = self.b**2
        cross = 2 * b2 * k12
        root = _sqrt((1 + 2 * b2 * k11) * (1 + 2 * b2 * k22) - cross * cross)
        nngp = self.a**2 * (2 / _PI) * torch.atan2(cross, root) + self.c**2
        if not derivative:
            return nngp, None
        return nngp, self.a**2 * b2 * (4 / _PI) / root


class Gelu(ElementwiseLayer):
    r"""``phi(x) = x Phi(x)`` (exact GELU, Hendrycks & Gimpel 2016; neural-tangents'
    ``stax.Gelu``).

    Tsuchida, Pearce, van der Heide, Roosta & Gallagher (2021), "Avoiding kernel fixed points:
    computing with ELU and GELU infinite networks": with ``p = k11 k22``,
    ``q = (1 + k11)(1 + k22)``, ``delta = sqrt(q - k12^2)`` and
    ``theta = arcsin(k12 / sqrt(q)) = atan2(k12, delta)``,

    ``E[phi(u) phi(v)] = k12 / 4 + (k12 theta + (k12^2 + p delta^2) / (q delta)) / (2 pi)``,

    ``E[phi'(u) phi'(v)] = 1 / 4 + theta / (2 pi)
    + k12 (1 / delta^2 + (1 - p) / q + 1) / (2 pi delta)``

    (the second differentiates the first in ``k12``, Price's theorem). ``approximate=True``
    makes only the finite network use the tanh approximation (``F.gelu(x,
    approximate="tanh")``); the kernel stays that of the exact GELU, as in neural-tangents.
    """

    def __init__(self, approximate: bool = False) -> None:
        if not isinstance(approximate, bool):
            raise UsageError(f"approximate must be a bool, got {type(approximate).__name__}")
        self.approximate = approximate

    def __repr__(self) -> str:
        return "Gelu(approximate=True)" if self.approximate else "Gelu()"

    def function(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh" if self.approximate else "none")

    def expectations(self, k12: Tensor, k11: Tensor, k22: Tensor, *,
                     derivative: bool = True) -> tuple[Tensor, Tensor | None]:
        k12, k11, k22 = _broadcast(k12, k11, k22)
        p = k11 * k22
        q = (1 + k11) * (1 + k22)
        delta2 = q - k12 * k12
        delta = _sqrt(delta2)
        theta = torch.atan2(k12, delta)
        nngp = k12 / 4 + (k12 * theta + (k12 * k12 + p * delta2) / (q * delta)) / (2 * _PI)
        if not derivative:
            return nngp, None
        dot = 0.25 + theta / (2 * _PI) + k12 * (1 / delta2 + (1 - p) / q + 1) / (2 * _PI * delta)
        return nngp, dot


class Sin(ElementwiseLayer):
    r"""``phi(x) = a sin(b x + c)`` (neural-tangents' ``stax.Sin``).

    From the Gaussian characteristic function ``E[exp(i t w)] = exp(-t^2 Var(w) / 2)``
    applied to ``sin(x) sin(y) = (cos(x - y) - cos(x + y)) / 2`` (e.g. Pearce, Tsuchida,
    Zaki, Brintrup & Neely 2020, "Expressive priors in Bayesian neural networks: kernel
    combinations and periodic functions"): with ``e_pm = exp(-b^2 (k11 + k22 +- 2 k12) / 2)``,

    ``E[phi(u) phi(v)] = a^2 (e_- - cos(2 c) e_+) / 2``,

    ``E[phi'(u) phi'(v)] = a^2 b^2 (e_- + cos(2 c) e_+) / 2``.
    """

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> None:
        self.a = _real(a, "a")
        self.b = _real(b, "b")
        self.c = _real(c, "c")

    def _phase(self) -> float:
        """The phase of the sine (``c``; ``c + pi / 2`` for :class:`Cos`)."""
        return self.c

    @property
    def odd(self) -> bool:
        return self._phase() == 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(a={self.a}, b={self.b}, c={self.c})"

    def function(self, x: Tensor) -> Tensor:
        return self.a * torch.sin(self.b * x + self.c)

    def expectations(self, k12: Tensor, k11: Tensor, k22: Tensor, *,
                     derivative: bool = True) -> tuple[Tensor, Tensor | None]:
        k12, k11, k22 = _broadcast(k12, k11, k22)
        b2 = self.b**2
        half_sum = -0.5 * (k11 + k22)
        e_minus = torch.exp(b2 * (half_sum + k12))
        e_plus = torch.exp(b2 * (half_sum - k12)) * math.cos(2 * self._phase())
        half_a2 = self.a**2 / 2
        nngp = half_a2 * (e_minus - e_plus)
        if not derivative:
            return nngp, None
        return nngp, half_a2 * b2 * (e_minus + e_plus)


class Cos(Sin):
    """``phi(x) = a cos(b x + c)``: :class:`Sin` with phase ``c + pi / 2`` (as neural-tangents'
    ``stax.Cos``), so ``E[phi(u) phi(v)] = a^2 (e_- + cos(2 c) e_+) / 2``."""

    def _phase(self) -> float:
        return self.c + _PI / 2

    def function(self, x: Tensor) -> Tensor:
        return self.a * torch.cos(self.b * x + self.c)


# --------------------------------------------------------------------------- quadrature


def _with_autograd_derivative(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``(fn(x), fn'(x))`` of an elementwise ``fn``, the derivative by autograd (both stay
    differentiable in ``x`` when ``x`` carries a graph)."""
    keep_graph = x.requires_grad
    with torch.inference_mode(False), torch.enable_grad():
        point = x if keep_graph else x.detach().clone().requires_grad_(True)
        y = fn(point)
        if not isinstance(y, Tensor) or not y.requires_grad:  # constant in x
            return y, torch.zeros_like(x)
        (grad,) = torch.autograd.grad(y.sum(), point, create_graph=keep_graph, allow_unused=True)
    if not keep_graph:
        y = y.detach()
    return y, (torch.zeros_like(x) if grad is None else grad)


class Elementwise(ElementwiseLayer):
    r"""Any elementwise torch function ``fn`` by 2-D Gauss-Hermite quadrature
    (neural-tangents' ``stax.ElementwiseNumerical``; Han, Zandieh, Lee, Novak, Xiao & Karbasi
    2022, "Fast neural kernel embeddings for general activations").

    With the ``deg`` Gauss-Hermite nodes ``x_i`` and weights ``w_i`` (weight ``exp(-x^2)``)
    and the Cholesky factorization ``u = sqrt(k11) z1``, ``v = (k12 / k11) u + sqrt(k22 -
    k12^2 / k11) z2`` of the pair,

    ``E[f(u) f(v)] ~ (1 / pi) sum_ij w_i w_j f(sqrt(2 k11) x_i) f((k12 / k11) sqrt(2 k11) x_i
    + sqrt(2 (k22 - k12^2 / k11)) x_j)``,

    for ``f = fn`` (the NNGP) and ``f = fn'`` (the NTK factor): ``fn_derivative`` if given,
    else autograd of ``fn`` at the nodes (so ``fn`` must be differentiable by torch and map a
    tensor to one of the same shape). These are neural-tangents' numbers for the same ``fn``
    and ``deg`` (to rounding).

    Accuracy: the rule is exact for polynomials of degree ``< 2 deg`` in each variable, and
    for smooth ``fn`` its error falls exponentially with ``deg``, but how fast depends on how
    sharp ``fn(sqrt(2 k) x)`` is, i.e. on the variance ``k``; the error is largest near the
    diagonal (``k12 ~ sqrt(k11 k22)``) and larger for the NTK factor than for the NNGP.
    Measured against a brute-force integral (relative to ``sqrt(E[f(u)^2] E[f(v)^2])``) at
    ``deg=25``: ``sin``, ``softplus``: below 1e-9 for variances up to 3 (``sin`` 3e-4,
    ``softplus`` 8e-4 at variance 10); ``tanh`` (``erf`` alike): NNGP / NTK factor
    5e-7 / 6e-6 at variance 0.5, 5e-5 / 5e-4 at variance 1, 4e-3 / 5e-2 at variance 3 and
    5e-2 / 5e-1 at variance 10. ``deg=50`` gains two to four digits below variance 3.
    Functions with kinks (ReLU, abs) converge only algebraically (1e-2 at ``deg=25``; an odd
    ``deg`` puts a node on the kink at 0, where autograd's one-sided derivative is taken):
    use the closed forms for those. Time grows as ``deg^2``; memory as ``deg`` times the
    covariance tensor (one outer node at a time), which :meth:`max_pair_entries` declares.

    Never silently off: every call estimates the rule's error on the diagonal, where it is
    largest, at the variances it meets (1-D: ``E[f(u)^2]`` and ``E[f'(u)^2]`` with ``deg`` and
    ``2 deg`` nodes, a cost of ``deg`` per variance) and warns, naming a ``deg`` that meets it,
    when the relative difference exceeds ``tolerance`` (``1e-4``).

    A zero-variance input is handled exactly (``u = 0``; neural-tangents returns NaN there),
    and the diagonal ``k12 == k11 == k22`` gives ``v = u`` exactly. ``odd=True`` declares ``fn``
    odd (see :class:`~telescope.infinite._layer.ElementwiseLayer`).
    """

    fn: Callable[[Tensor], Tensor]
    fn_derivative: Callable[[Tensor], Tensor] | None
    deg: int
    tolerance: float
    _nodes: Tensor
    _weights: Tensor
    _odd: bool

    def __init__(self, fn: Callable[[Tensor], Tensor], deg: int = 25,
                 fn_derivative: Callable[[Tensor], Tensor] | None = None, *,
                 odd: bool = False, tolerance: float = 1e-4) -> None:
        if not callable(fn):
            raise UsageError(f"fn must be a callable Tensor -> Tensor, got {type(fn).__name__}")
        if fn_derivative is not None and not callable(fn_derivative):
            raise UsageError("fn_derivative must be None or a callable Tensor -> Tensor, got "
                             f"{type(fn_derivative).__name__}")
        if not isinstance(odd, bool):
            raise UsageError(f"odd must be a bool, got {type(odd).__name__}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) \
                or not tolerance > 0:
            raise UsageError(f"tolerance must be a positive number, got {tolerance!r}")
        self.tolerance = float(tolerance)
        self.fn = fn
        self.deg = check_positive_int(deg, "deg")
        if self.deg > _MAX_DEG:
            raise UsageError(f"deg must be <= {_MAX_DEG} (numpy's Gauss-Hermite nodes overflow "
                             f"beyond), got {deg}")
        self.fn_derivative = fn_derivative
        self._odd = odd
        nodes, weights = np.polynomial.hermite.hermgauss(self.deg)
        self._nodes = torch.from_numpy(nodes)
        self._weights = torch.from_numpy(weights)

    @property
    def odd(self) -> bool:
        return self._odd

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", repr(self.fn))
        return f"Elementwise({name}, deg={self.deg})"

    def function(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def max_pair_entries(self, shape: Shape) -> int:
        # about five [deg, ...] temporaries per outer node, against the six tensors per entry
        # the block size allows for
        return super().max_pair_entries(shape) * (1 + (5 * self.deg) // 6)

    def _values(self, x: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
        """``(fn(x), fn'(x) or None)``, checked to be elementwise."""
        dy: Tensor | None = None
        if derivative and self.fn_derivative is None:
            y, dy = _with_autograd_derivative(self.fn, x)
        else:
            y = self.fn(x)
            if derivative and self.fn_derivative is not None:
                dy = self.fn_derivative(x)
        for out in (y, dy) if derivative else (y,):
            if not isinstance(out, Tensor) or out.shape != x.shape:
                raise UsageError(f"{self!r}: fn (and fn_derivative) must map a tensor to one of "
                                 "the same shape (an elementwise function)")
        return y, dy

    def _diagonal_error(self, variances: Tensor, deg: int) -> float:
        """Relative difference of the 1-D rules with ``deg`` and ``2 deg`` nodes for
        ``E[f(u)^2]`` and ``E[f'(u)^2]``, ``u ~ N(0, k)``, worst over ``variances``."""
        k = variances.reshape(-1, 1)
        values = []
        for d in (deg, min(2 * deg, _MAX_DEG)):
            x, w = (torch.from_numpy(a).to(k) for a in np.polynomial.hermite.hermgauss(d))
            f, df = self._values(_sqrt(2 * k) * x, True)
            assert df is not None
            values.append(torch.stack([(w * f * f).sum(1), (w * df * df).sum(1)]) / _PI**0.5)
        low, high = values
        return float(((low - high).abs() / high.abs().clamp_min(1e-300)).max())

    def _check_accuracy(self, k11: Tensor, k22: Tensor) -> None:
        variances = torch.unique(torch.cat([k11.detach().reshape(-1), k22.detach().reshape(-1)]))
        error = self._diagonal_error(variances, self.deg)
        if error <= self.tolerance or self.deg > _MAX_DEG // 2:
            return
        enough = self.deg
        while enough <= _MAX_DEG // 2 and self._diagonal_error(variances, enough) > self.tolerance:
            enough *= 2
        fix = (f"pass deg={enough} (cost grows as deg^2)" if enough <= _MAX_DEG // 2 else
               f"even deg={_MAX_DEG} is not enough at these variances: scale the inputs or W_std "
               "down")
        warn(f"{self!r}: the Gauss-Hermite rule is off by about {error:.1e} (relative, on the "
             f"diagonal) at pre-activation variances up to {float(variances.max()):.3g}, above "
             f"tolerance={self.tolerance:g}; {fix}, or accept the error with a larger "
             "tolerance")

    def expectations(self, k12: Tensor, k11: Tensor, k22: Tensor, *,
                     derivative: bool = True) -> tuple[Tensor, Tensor | None]:
        if derivative:
            self._check_accuracy(torch.as_tensor(k11), torch.as_tensor(k22))
        k12, k11, k22 = _broadcast(k12, k11, k22)
        nodes = self._nodes.to(dtype=k12.dtype, device=k12.device)
        weights = self._weights.to(dtype=k12.dtype, device=k12.device)
        live = k11 > 0
        safe11 = torch.where(live, k11, 1.0)
        slope = torch.where(live, k12 / safe11, 0.0)  # v = slope * u + rest
        residual = torch.where(live, (k11 * k22 - k12 * k12) / safe11, k22)
        scale_u = _sqrt(2 * k11)
        rest = _sqrt(2 * residual) * nodes.reshape((-1,) + (1,) * k12.dim())  # [deg, ...]
        nngp = torch.zeros_like(k12)
        dot = torch.zeros_like(k12) if derivative else None
        for i in range(self.deg):
            u = scale_u * nodes[i]
            fu, dfu = self._values(u, derivative)
            fv, dfv = self._values(slope * u + rest, derivative)
            nngp = nngp + weights[i] * fu * torch.tensordot(weights, fv, dims=1)
            if dot is not None:
                assert dfu is not None and dfv is not None
                dot = dot + weights[i] * dfu * torch.tensordot(weights, dfv, dims=1)
        return nngp / _PI, (None if dot is None else dot / _PI)


def _tanh_derivative(x: Tensor) -> Tensor:
    t = torch.tanh(x)
    return 1 - t * t


class Tanh(Elementwise):
    """``phi(x) = tanh(x)``. Its kernels have no closed form: they are computed by the
    Gauss-Hermite quadrature of :class:`Elementwise` with ``deg`` nodes per dimension and the
    exact derivative ``1 - tanh^2`` (Han et al. 2022; the numbers of neural-tangents'
    ``ElementwiseNumerical(jnp.tanh, deg)``).

    Accuracy at the default ``deg=25`` (relative, worst case near the diagonal; see
    :class:`Elementwise`): NNGP / NTK factor 5e-7 / 6e-6 for pre-activation variances up to
    0.5, 5e-5 / 5e-4 up to 1, 4e-3 / 5e-2 at 3. For larger variances raise ``deg`` (``deg=50``:
    1e-7 / 3e-6 at variance 1, 1e-4 / 3e-3 at 3), at ``deg^2`` cost.
    """

    def __init__(self, deg: int = 25, tolerance: float = 1e-4) -> None:
        super().__init__(torch.tanh, deg, _tanh_derivative, odd=True, tolerance=tolerance)

    def __repr__(self) -> str:
        return "Tanh()" if self.deg == 25 else f"Tanh(deg={self.deg})"
