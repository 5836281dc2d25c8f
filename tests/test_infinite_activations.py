"""Tests of telescope.infinite.activations against brute-force Gaussian integrals.

The oracle integrates ``E[f(u) g(v)]`` for ``(u, v) = A z``, ``z ~ N(0, I)``, with ``A`` the
symmetric square root of the covariance (an eigendecomposition, not the Cholesky factor the
quadrature layer uses), in polar coordinates of ``z``: Gauss-Legendre in the radius on
``[0, 12]`` and in the angle between the angles where ``u`` or ``v`` changes sign (so a kink of
a rectifier never falls inside a panel). The integrand functions are numpy / scipy versions of
the nonlinearities and their derivatives written out by hand, independent of the formulas and
of torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate
from scipy.special import erf

from telescope.errors import UsageError
from telescope.infinite.activations import (
    ABRelu,
    Abs,
    Cos,
    Elementwise,
    Erf,
    Gelu,
    LeakyRelu,
    Relu,
    Sin,
    Tanh,
)

# low-degree rules are tested on purpose here; the accuracy warning has its own test below
pytestmark = pytest.mark.filterwarnings("ignore:.*Gauss-Hermite rule is off:UserWarning")

FIXTURES = Path(__file__).parent / "fixtures" / "neural_tangents"


# --------------------------------------------------------------------------- the oracle


def gauss_expect(f, g, k11: float, k22: float, k12: float, n: int = 200) -> float:
    """``E[f(u) g(v)]`` for ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])`` (see the module
    docstring)."""
    lam, vec = np.linalg.eigh(np.array([[k11, k12], [k12, k22]], dtype=float))
    a = vec @ np.diag(np.sqrt(np.clip(lam, 0.0, None))) @ vec.T
    cuts = [0.0, 2 * np.pi]
    for row in a:
        if np.any(row != 0):  # row . (cos t, sin t) = 0
            t0 = np.arctan2(row[0], -row[1]) % np.pi
            cuts += [t0, t0 + np.pi]
    cuts = np.unique(cuts)
    x, w = np.polynomial.legendre.leggauss(n)
    r, wr = 6.0 * (x + 1), 6.0 * w
    radial = wr * r * np.exp(-r**2 / 2)
    total = 0.0
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        if hi - lo < 1e-14:
            continue
        t = lo + (x + 1) * (hi - lo) / 2
        z1, z2 = np.outer(r, np.cos(t)), np.outer(r, np.sin(t))
        vals = f(a[0, 0] * z1 + a[0, 1] * z2) * g(a[1, 0] * z1 + a[1, 1] * z2)
        total += radial @ vals @ (w * (hi - lo) / 2)
    return total / (2 * np.pi)


def gauss_1d(f, k: float) -> float:
    """``E[f(u)]`` for ``u ~ N(0, k)`` by adaptive quadrature split at 0."""
    s = math.sqrt(k)

    def h(z: float) -> float:
        return float(f(np.array(s * z))) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    return sum(integrate.quad(h, lo, hi, epsabs=1e-14, epsrel=1e-13, limit=200)[0]
               for lo, hi in ((-14.0, 0.0), (0.0, 14.0)))


def _phi(x):
    return 0.5 * (1 + erf(x / math.sqrt(2)))


def _density(x):
    return np.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _abrelu(a: float, b: float):
    return (lambda x: np.where(x > 0, b * x, a * x),
            lambda x: np.where(x > 0, b, a) * np.ones_like(x))


# name -> (layer, phi, phi') with phi, phi' in numpy
CLOSED = {
    "relu": (Relu(), *_abrelu(0.0, 1.0)),
    "leaky_relu": (LeakyRelu(0.1), *_abrelu(0.1, 1.0)),
    "abrelu": (ABRelu(-0.4, 1.3), *_abrelu(-0.4, 1.3)),
    "abs": (Abs(), np.abs, np.sign),
    "erf": (Erf(), erf, lambda x: 2 / math.sqrt(math.pi) * np.exp(-x * x)),
    "erf_abc": (Erf(1.3, 0.7, 0.2), lambda x: 1.3 * erf(0.7 * x) + 0.2,
                lambda x: 1.3 * 0.7 * 2 / math.sqrt(math.pi) * np.exp(-0.49 * x * x)),
    "gelu": (Gelu(), lambda x: x * _phi(x), lambda x: _phi(x) + x * _density(x)),
    "sin": (Sin(), np.sin, np.cos),
    "sin_abc": (Sin(1.2, 0.8, 0.4), lambda x: 1.2 * np.sin(0.8 * x + 0.4),
                lambda x: 1.2 * 0.8 * np.cos(0.8 * x + 0.4)),
    "cos_abc": (Cos(0.9, 1.1, 0.3), lambda x: 0.9 * np.cos(1.1 * x + 0.3),
                lambda x: -0.9 * 1.1 * np.sin(1.1 * x + 0.3)),
}

# (k11, k22, k12): generic, negative, unequal scales, nearly collinear, nearly anti-collinear,
# uncorrelated, large variances
TRIPLES = [(1.0, 1.0, 0.3), (2.5, 0.4, -0.7), (0.3, 4.0, 1.0), (1.7, 1.7, 1.69),
           (3.0, 0.5, -1.2247), (0.8, 2.0, 0.0), (10.0, 7.0, 5.0)]


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _evaluate(layer, triples, derivative: bool = True):
    k11, k22, k12 = (_t([t[i] for t in triples]) for i in range(3))
    nngp, dot = layer.expectations(k12, k11, k22, derivative=derivative)
    return nngp.numpy(), (None if dot is None else dot.numpy())


def _check_against_oracle(layer, f, df, triples, tol: float) -> None:
    nngp, dot = _evaluate(layer, triples)
    for i, (k11, k22, k12) in enumerate(triples):
        for got, g in ((nngp[i], f), (dot[i], df)):
            want = gauss_expect(g, g, k11, k22, k12)
            scale = math.sqrt(gauss_expect(g, g, k11, k11, k11) * gauss_expect(g, g, k22, k22, k22))
            assert abs(got - want) <= tol * scale, (layer, (k11, k22, k12), got, want)


def test_oracle_itself() -> None:
    # Isserlis: E[uv] = k12, E[u^2 v^2] = k11 k22 + 2 k12^2; and a scipy dblquad over the
    # Cholesky-whitened variables for a nonlinear, kinked integrand
    for k11, k22, k12 in TRIPLES:
        assert gauss_expect(lambda x: x, lambda x: x, k11, k22, k12) == pytest.approx(k12,
                                                                                      abs=1e-12)
        assert gauss_expect(np.square, np.square, k11, k22, k12) == pytest.approx(
            k11 * k22 + 2 * k12**2, rel=1e-12)
    k11, k22, k12 = 2.5, 0.4, -0.7
    chol = np.linalg.cholesky([[k11, k12], [k12, k22]])

    def integrand(z2: float, z1: float) -> float:
        u, v = chol[0, 0] * z1, chol[1, 0] * z1 + chol[1, 1] * z2
        return max(u, 0.0) * np.tanh(v) * math.exp(-(z1 * z1 + z2 * z2) / 2) / (2 * math.pi)

    want = sum(integrate.dblquad(integrand, lo, hi, -10, 10, epsabs=1e-12, epsrel=1e-10)[0]
               for lo, hi in ((-10, 0), (0, 10)))
    got = gauss_expect(lambda x: np.maximum(x, 0), np.tanh, k11, k22, k12)
    assert got == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_closed_forms_match_brute_force(name: str) -> None:
    layer, f, df = CLOSED[name]
    _check_against_oracle(layer, f, df, TRIPLES, 1e-9)


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_price_theorem(name: str) -> None:
    # d E[phi(u) phi(v)] / d k12 = E[phi'(u) phi'(v)]: the two closed forms are consistent
    layer = CLOSED[name][0]
    k11, k22, k12 = (_t([t[i] for t in TRIPLES]) for i in range(3))
    k12.requires_grad_(True)
    nngp, dot = layer.expectations(k12, k11, k22)
    (grad,) = torch.autograd.grad(nngp.sum(), k12)
    torch.testing.assert_close(grad, dot.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_diagonal(name: str) -> None:
    layer, f, df = CLOSED[name]
    ks = [1e-3, 0.1, 1 / 3, 1.0, 2.7, 7.7]
    nngp, dot = _evaluate(layer, [(k, k, k) for k in ks])
    for k, got_n, got_d in zip(ks, nngp, dot, strict=True):
        assert got_n == pytest.approx(gauss_1d(lambda x: f(x) ** 2, k), rel=1e-10, abs=1e-15)
        assert got_d == pytest.approx(gauss_1d(lambda x: df(x) ** 2, k), rel=1e-10, abs=1e-15)


@pytest.mark.parametrize("layer", [Relu(), LeakyRelu(0.1), ABRelu(-0.4, 1.3), Abs()],
                         ids=repr)
def test_rectifier_diagonal_is_exact(layer) -> None:
    # cosine exactly 1: no sqrt(rounding error) of the angle leaks in
    k = _t([1e-3, 0.1, 1 / 3, 1.0, 2.7, 7.7, 1e6])
    nngp, dot = layer.expectations(k, k.clone(), k.clone())
    half = (layer.a**2 + layer.b**2) / 2
    assert torch.equal(dot, torch.full_like(k, half))
    assert torch.equal(nngp, half * k)


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_zero_variance(name: str) -> None:
    layer, f, df = CLOSED[name]
    k22 = 1.3
    # one input has zero variance: u = 0, E[phi(0) phi(v)] = phi(0) E[phi(v)]
    nngp, dot = layer.expectations(_t([0.0, 0.0]), _t([0.0, 0.0]), _t([k22, 0.0]))
    assert torch.isfinite(nngp).all() and torch.isfinite(dot).all()
    f0 = float(f(np.array(0.0)))
    assert nngp[0].item() == pytest.approx(f0 * gauss_1d(f, k22), rel=1e-10, abs=1e-14)
    assert nngp[1].item() == pytest.approx(f0 * f0, abs=1e-14)
    if isinstance(layer, ABRelu):  # phi'(0) read as the mean slope (a + b) / 2
        df0 = (layer.a + layer.b) / 2
    else:
        df0 = float(df(np.array(0.0)))
    assert dot[0].item() == pytest.approx(df0 * gauss_1d(df, k22), rel=1e-10, abs=1e-14)
    assert dot[1].item() == pytest.approx(df0 * df0, abs=1e-14)
    if isinstance(layer, Relu):
        assert nngp.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_gradients_finite_at_degenerate_inputs(name: str) -> None:
    layer = CLOSED[name][0]
    k11 = _t([0.0, 0.0, 1.5, 2.0]).requires_grad_(True)
    k22 = _t([0.0, 1.3, 1.5, 0.0]).requires_grad_(True)
    k12 = _t([0.0, 0.0, 1.5, 0.0]).requires_grad_(True)
    nngp, dot = layer.expectations(k12, k11, k22)
    grads = torch.autograd.grad((nngp + dot).sum(), (k12, k11, k22))
    assert all(torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------- quadrature

QUAD = {
    "tanh": (torch.tanh, np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "softplus": (F.softplus, lambda x: np.logaddexp(0.0, x), lambda x: 1 / (1 + np.exp(-x))),
    "erf": (torch.erf, erf, lambda x: 2 / math.sqrt(math.pi) * np.exp(-x * x)),
}
# variances up to 1 and correlations up to 0.9, where deg=25 is documented to be within 1e-4
MODERATE = [(1.0, 1.0, 0.3), (0.8, 0.5, -0.3), (0.3, 0.9, 0.45), (0.6, 0.6, 0.0),
            (1.0, 0.7, 0.75)]


@pytest.mark.parametrize("name", sorted(QUAD))
def test_quadrature_matches_brute_force(name: str) -> None:
    fn, f, df = QUAD[name]
    _check_against_oracle(Elementwise(fn), f, df, MODERATE, 1e-4)


def test_tanh_layer_matches_brute_force() -> None:
    _check_against_oracle(Tanh(), *QUAD["tanh"][1:], MODERATE, 1e-4)


def test_quadrature_converges_with_degree() -> None:
    f, df = QUAD["tanh"][1:]
    k11, k22, k12 = 3.0, 2.0, 2.2
    want = gauss_expect(df, df, k11, k22, k12)
    errors = []
    for deg in (10, 25, 50, 100):
        _, dot = Tanh(deg).expectations(_t(k12), _t(k11), _t(k22))
        errors.append(abs(dot.item() - want))
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-4 * want


def test_quadrature_sin_matches_closed_form() -> None:
    triples = [t for t in TRIPLES if max(t[:2]) <= 4.0]
    for quad, closed in ((Elementwise(torch.sin), Sin()),
                         (Elementwise(lambda x: 1.2 * torch.sin(0.8 * x + 0.4)),
                          Sin(1.2, 0.8, 0.4))):
        got_n, got_d = _evaluate(quad, triples)
        want_n, want_d = _evaluate(closed, triples)
        np.testing.assert_allclose(got_n, want_n, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(got_d, want_d, rtol=1e-11, atol=1e-13)


def test_quadrature_derivative_sources_agree() -> None:
    # autograd's derivative, the explicit one, and a deliberately different one (used if given)
    auto = Elementwise(torch.tanh)
    nngp_a, dot_a = _evaluate(auto, TRIPLES)
    nngp_t, dot_t = _evaluate(Tanh(), TRIPLES)
    np.testing.assert_allclose(nngp_a, nngp_t, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(dot_a, dot_t, rtol=1e-13, atol=1e-15)
    doubled = Elementwise(torch.tanh, fn_derivative=lambda x: 2 * (1 - torch.tanh(x) ** 2))
    nngp_d, dot_d = _evaluate(doubled, TRIPLES)
    np.testing.assert_allclose(nngp_d, nngp_t, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(dot_d, 4 * dot_t, rtol=1e-13, atol=1e-15)
    # no autograd context needed (inference mode, no_grad)
    with torch.inference_mode():
        nngp_i, dot_i = _evaluate(auto, TRIPLES)
    with torch.no_grad():
        _, dot_g = _evaluate(auto, TRIPLES)
    np.testing.assert_allclose(dot_i, dot_t, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(dot_g, dot_t, rtol=1e-13, atol=1e-15)


def test_quadrature_is_differentiable() -> None:
    # with inputs that carry a graph the autograd derivative keeps it: the gradient of the
    # quadrature NTK factor of sin matches that of the closed form
    k11, k22, k12 = (_t([t[i] for t in MODERATE]) for i in range(3))
    grads = []
    for layer in (Elementwise(torch.sin), Sin()):
        x = k12.clone().requires_grad_(True)
        _, dot = layer.expectations(x, k11, k22)
        grads.append(torch.autograd.grad(dot.sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_quadrature_diagonal_and_zero_variance() -> None:
    layer = Elementwise(torch.tanh)
    # 6.475423220626758 and 5.719583008990312: k - k * k / k != 0 in float64
    k = _t([1e-3, 0.1, 1 / 3, 1.0, 2.7, 6.475423220626758, 5.719583008990312])
    nngp, dot = layer.expectations(k, k.clone(), k.clone())
    # v = u exactly on the diagonal: the 2-D rule collapses to the 1-D rule of the same degree
    x, w = np.polynomial.hermite.hermgauss(25)
    for i, kk in enumerate(k.tolist()):
        u = np.sqrt(2 * kk) * x
        assert nngp[i].item() == pytest.approx(w @ np.tanh(u) ** 2 / math.sqrt(math.pi),
                                               rel=1e-13)
        assert dot[i].item() == pytest.approx(w @ (1 - np.tanh(u) ** 2) ** 2 / math.sqrt(math.pi),
                                              rel=1e-13)
    # zero variances: finite, and u = 0 exactly
    soft = Elementwise(F.softplus)
    nngp, dot = soft.expectations(_t([0.0, 0.0, 0.0]), _t([0.0, 0.0, 0.9]), _t([1.3, 0.0, 0.0]))
    assert torch.isfinite(nngp).all() and torch.isfinite(dot).all()
    f0, df0 = math.log(2.0), 0.5
    assert nngp[0].item() == pytest.approx(f0 * gauss_1d(QUAD["softplus"][1], 1.3), rel=1e-8)
    assert dot[0].item() == pytest.approx(df0 * gauss_1d(QUAD["softplus"][2], 1.3), rel=1e-8)
    assert nngp[1].item() == pytest.approx(f0 * f0, rel=1e-13)
    assert dot[1].item() == pytest.approx(df0 * df0, rel=1e-13)
    assert nngp[2].item() == pytest.approx(f0 * gauss_1d(QUAD["softplus"][1], 0.9), rel=1e-8)


# --------------------------------------------------------------------------- shapes, maps, args

ALL_LAYERS = [c[0] for c in CLOSED.values()] + [Elementwise(torch.tanh, deg=7), Tanh(8)]


@pytest.mark.parametrize("layer", ALL_LAYERS, ids=repr)
def test_broadcasting(layer) -> None:
    n1, n2, s = 3, 2, 4
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(n1, s, 5, generator=gen, dtype=torch.float64)
    x2 = torch.randn(n2, s, 5, generator=gen, dtype=torch.float64)
    k12 = torch.einsum("ipf,jqf->ijpq", x1, x2) / 5  # [n1, n2, s, s]
    v1 = (x1**2).sum(-1) / 5
    v2 = (x2**2).sum(-1) / 5
    k11 = v1[:, None, :, None]  # [n1, 1, s, 1]
    k22 = v2[None, :, None, :]  # [1, n2, 1, s]
    nngp, dot = layer.expectations(k12, k11, k22)
    assert nngp.shape == dot.shape == (n1, n2, s, s)
    assert nngp.dtype == torch.float64
    for i, j, p, q in [(0, 0, 0, 0), (2, 1, 3, 0), (1, 0, 2, 3), (2, 0, 1, 1)]:
        e_n, e_d = layer.expectations(k12[i, j, p, q], v1[i, p], v2[j, q])
        assert nngp[i, j, p, q].item() == pytest.approx(e_n.item(), rel=1e-14, abs=1e-15)
        assert dot[i, j, p, q].item() == pytest.approx(e_d.item(), rel=1e-14, abs=1e-15)
    own, none = layer.expectations(k12, k11, k22, derivative=False)
    assert none is None
    torch.testing.assert_close(own, nngp, rtol=1e-15, atol=0)
    # a scalar k12 still comes out at the broadcast shape
    const, _ = layer.expectations(torch.zeros((), dtype=torch.float64), k11, k22)
    assert const.shape == (n1, n2, s, s)


def test_function_matches_torch() -> None:
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    cases = [
        (Relu(), torch.relu(x)),
        (LeakyRelu(0.1), F.leaky_relu(x, 0.1)),
        (ABRelu(-0.4, 1.3), torch.where(x > 0, 1.3 * x, -0.4 * x)),
        (Abs(), torch.abs(x)),
        (Erf(), torch.erf(x)),
        (Erf(1.3, 0.7, 0.2), 1.3 * torch.erf(0.7 * x) + 0.2),
        (Gelu(), F.gelu(x, approximate="none")),
        (Gelu(approximate=True), F.gelu(x, approximate="tanh")),
        (Sin(), torch.sin(x)),
        (Sin(1.2, 0.8, 0.4), 1.2 * torch.sin(0.8 * x + 0.4)),
        (Cos(0.9, 1.1, 0.3), 0.9 * torch.cos(1.1 * x + 0.3)),
        (Tanh(), torch.tanh(x)),
        (Elementwise(F.softplus), F.softplus(x)),
    ]
    for layer, want in cases:
        torch.testing.assert_close(layer.function(x), want, rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(layer.build(None)(x), want, rtol=1e-15, atol=1e-15)
    assert not torch.equal(Gelu().function(x), Gelu(approximate=True).function(x))


def test_odd_declarations() -> None:
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    declared = {Erf(): True, Erf(c=0.1): False, Erf(2.0, 0.5): True, Sin(): True,
                Sin(c=0.3): False, Cos(): False, Relu(): False, Abs(): False,
                ABRelu(0.7, 0.7): True, Gelu(): False, Tanh(): True,
                Elementwise(torch.sin, odd=True): True, Elementwise(torch.sin): False}
    for layer, odd in declared.items():
        assert layer.odd is odd, layer
        if odd:
            torch.testing.assert_close(layer.function(-x), -layer.function(x))


@pytest.mark.parametrize("make", [
    lambda: Elementwise(torch.tanh, deg=0),
    lambda: Elementwise(torch.tanh, deg=2.5),
    lambda: Elementwise(torch.tanh, deg=True),
    lambda: Elementwise(torch.tanh, deg="25"),
    lambda: Elementwise(3.0),
    lambda: Elementwise(torch.tanh, fn_derivative="cos"),
    lambda: Elementwise(torch.tanh, odd="yes"),
    lambda: Tanh(deg=-1),
    lambda: ABRelu("a", 1.0),
    lambda: ABRelu(0.0, float("inf")),
    lambda: LeakyRelu(None),
    lambda: Erf(a=float("nan")),
    lambda: Erf(b=True),
    lambda: Sin(b=float("inf")),
    lambda: Cos(c="0"),
    lambda: Gelu(approximate="tanh"),
])
def test_bad_arguments(make) -> None:
    with pytest.raises(UsageError):
        make()


def test_non_elementwise_fn_is_refused() -> None:
    k = _t([1.0, 0.5])
    with pytest.raises(UsageError, match="elementwise"):
        Elementwise(lambda x: x.sum(0)).expectations(0.5 * k, k, k)
    with pytest.raises(UsageError, match="elementwise"):
        Elementwise(torch.sin, fn_derivative=lambda x: x[:1]).expectations(0.5 * k, k, k)


def test_quadrature_declares_its_memory() -> None:
    from telescope.infinite._state import Geometry

    shape = Geometry("channels_first", (4, 4))
    assert Elementwise(torch.tanh).max_pair_entries(shape) > 10 * Relu().max_pair_entries(shape)


# --------------------------------------------------------------------------- neural-tangents

NT_CASES = {
    "fc_relu": Relu, "fc_relu_self": Relu, "fc_erf": Erf, "fc_gelu": Gelu, "fc_sin": Sin,
    "fc_abs": Abs, "fc_leaky_relu": lambda: LeakyRelu(0.1),
    "fc_abrelu": lambda: ABRelu(-0.4, 1.2),
    "fc_elementwise_tanh": lambda: Elementwise(torch.tanh, deg=25),
    "fc_elementwise_softplus": lambda: Elementwise(F.softplus, deg=25),
    "fc_elementwise_sin": lambda: Elementwise(torch.sin, deg=25),
}


@pytest.mark.parametrize("case", sorted(NT_CASES))
def test_matches_neural_tangents(case: str) -> None:
    path = FIXTURES / f"{case}.npz"
    if not path.exists():
        pytest.skip(f"no fixture {path.name}")
    from telescope.infinite.combinators import serial
    from telescope.infinite.layers import Dense

    act = NT_CASES[case]()
    arch = serial(Dense(128, 1.5, 0.1), act, Dense(128, 1.5, 0.1), act, Dense(1, 1.5, 0.1))
    ref = np.load(path)
    x2 = torch.from_numpy(ref["x2"]) if "x2" in ref else None
    out = arch.kernel(torch.from_numpy(ref["x1"]), x2)
    # neural-tangents' self-kernel diagonal carries sqrt(rounding) in its angle (~1e-8); ours
    # is exact there
    for key in ("nngp", "ntk"):
        np.testing.assert_allclose(out[key].numpy(), ref[key], rtol=2e-8, atol=0)


def test_quadrature_accuracy_warning():
    """Elementwise warns exactly when its rule is off by more than `tolerance` at the variances
    it meets, and names a deg that is enough (checked: that deg is then quiet)."""
    import warnings

    small, large = torch.tensor(0.3, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tanh().expectations(0.5 * small, small, small)        # accurate: no warning
    with pytest.warns(UserWarning, match=r"pass deg=(\d+)") as caught:
        Tanh().expectations(0.5 * large, large, large)
    enough = int(__import__("re").search(r"deg=(\d+) \(", str(caught[0].message)).group(1))
    assert enough > 25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tanh(deg=enough).expectations(0.5 * large, large, large)
    with pytest.raises(UsageError, match="deg must be <="):
        Tanh(deg=1000)
