"""Tests of telescope.models.bottleneck: the bottleneck MLP and the deep-linear closed forms.

Oracles: the infinite-width NTK of ``telescope.infinite`` (the no-bottleneck network's kernel and
its training dynamics at large width), wide deep linear networks trained with a small learning
rate (gradient flow) for the ODE and its NTK, scipy's ``solve_ivp`` for the integrator and for
the closed form of the scalar model, and the fixed-kernel flow for the ``k -> infinity`` limit.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import solve_ivp

from telescope import infinite as inf
from telescope.errors import UsageError
from telescope.kernels import kernel_regression, ntk
from telescope.models import (
    BottleneckMLP,
    NTKLinear,
    deep_linear_bottleneck_flow,
    sample_linear_factors,
    scalar_bottleneck_time,
    scalar_bottleneck_trajectory,
)
from telescope.models.hooks import run_with_cache
from telescope.train import fit


def half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(-1).mean()


class Recorder:
    """Training-set outputs at the measured steps (a fit callback)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.outputs = x, []

    def measure(self, state) -> None:
        with torch.no_grad():
            self.outputs.append(state.model(self.x).clone())


def train(model, x, y, lr, steps, eval_at):
    rec = Recorder(x)
    fit(model, torch.optim.SGD(model.parameters(), lr=lr), x, y, steps=steps, loss=half_mse,
        eval_at=eval_at, callbacks=[rec], progress=False)
    return rec.outputs


def relative_gaps(outputs, reference, y):
    scale = float((y - outputs[0]).norm())
    return [float((f - r).norm()) / scale for f, r in zip(outputs, reference, strict=True)]


def relu_arch(width: int, out: int = 1):
    """The no-bottleneck network with every hidden layer infinitely wide, written out."""
    s2 = math.sqrt(2.0)
    return inf.serial(inf.Dense(width), inf.Relu(), inf.Dense(width, s2), inf.Dense(width),
                      inf.Relu(), inf.Dense(out, s2))


# --------------------------------------------------------------------------- the model


def test_structure_and_hook_point():
    m = BottleneckMLP(5, 32, 3, 2, depth_before=1, depth_after=2)
    dense = [layer for layer in m.modules() if isinstance(layer, NTKLinear)]
    assert [(d.in_features, d.out_features) for d in dense] == [
        (5, 32), (32, 32), (32, 3), (3, 32), (32, 32), (32, 32), (32, 2)]
    assert [d.weight_std for d in dense] == pytest.approx(
        [1, math.sqrt(2), math.sqrt(2), 1, math.sqrt(2), math.sqrt(2), math.sqrt(2)])
    assert (m.lower_layers, m.upper_layers) == (3, 4)
    x = torch.randn(7, 5)
    out, cache = run_with_cache(m, x)
    assert out.shape == (7, 2)
    assert torch.allclose(cache["hook_bottleneck"], m.features(x))
    assert torch.allclose(m.upper(cache["hook_bottleneck"]), out)
    assert BottleneckMLP(5, 32, None, 1).bottleneck == 32
    assert all(d.bias is None for d in dense)


@pytest.mark.parametrize("kwargs, match", [
    ({"bottleneck": 0}, "bottleneck must be an integer >= 1"),
    ({"width": 2.5}, "width must be an integer"),
    ({"activation": "softplus"}, "activation must be one of"),
    ({"weight_std": -1.0}, "weight_std must be"),
    ({"bias_std": float("nan")}, "bias_std must be"),
    ({"depth_before": -1}, "depth_before must be an integer >= 0"),
])
def test_bad_arguments(kwargs, match):
    args = {"in_features": 3, "width": 8, "bottleneck": 2, "out_features": 1, **kwargs}
    with pytest.raises(UsageError, match=match):
        BottleneckMLP(args.pop("in_features"), args.pop("width"), args.pop("bottleneck"),
                      args.pop("out_features"), **args)


def test_linear_factors_reproduce_the_network_and_refuse_nonlinear():
    m = BottleneckMLP(4, 16, 2, 3, activation="identity", depth_before=1, depth_after=1).double()
    a, b = m.linear_factors()
    assert a.shape == (2, 4) and b.shape == (3, 2)
    x = torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(m(x), x @ a.T @ b.T, atol=1e-12)
    with pytest.raises(UsageError, match="activation='identity'"):
        BottleneckMLP(4, 16, 2, 1).linear_factors()
    with pytest.raises(UsageError, match="bias_std=0"):
        BottleneckMLP(4, 16, 2, 1, activation="identity", bias_std=0.1).linear_factors()


def test_wide_network_ntk_converges_to_the_infinite_ntk():
    """The no-bottleneck network's empirical NTK approaches the infinite description's, with
    fluctuations shrinking like width^-1/2; a narrow bottleneck stays far from it."""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dist = {}
    for width in (256, 1024):
        k_inf = relu_arch(width).kernel(x)["ntk"]
        torch.manual_seed(0)
        k = ntk(BottleneckMLP(6, width, None, 1).double(), x)
        dist[width] = float((k - k_inf).norm() / k_inf.norm())
    assert dist[1024] < 0.2
    assert dist[1024] < 0.7 * dist[256]
    torch.manual_seed(0)
    k2 = ntk(BottleneckMLP(6, 1024, 2, 1).double(), x)
    assert float((k2 - k_inf).norm() / k_inf.norm()) > 2 * dist[1024]


def test_wide_network_trains_like_the_infinite_ntk_and_a_bottleneck_does_not():
    """The comparison is fair: without a bottleneck a width-1024 network trained by gradient
    descent follows kernel gradient flow with the infinite NTK from its own f_0 (gap a few %);
    with a bottleneck of width 2 it leaves that prediction."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    y = torch.sign(x[:, :1] + 0.3 * x[:, 1:2])
    k_inf = relu_arch(1024).kernel(x)["ntk"]
    lr, eval_at = 0.5, [0, 10, 30, 60]
    gaps = {}
    for k in (None, 2):
        torch.manual_seed(0)
        model = BottleneckMLP(8, 1024, k, 1).double()
        outs = train(model, x, y, lr, 60, eval_at)
        pred = kernel_regression(k_inf, k_inf, y, f0_train=outs[0], f0_test=outs[0],
                                 t=[lr * s for s in eval_at])
        gaps[k] = max(relative_gaps(outs, pred, y))
    assert gaps[None] < 0.08
    assert gaps[2] > 0.15


# --------------------------------------------------------------------------- deep linear


def test_sample_linear_factors_variances():
    a, b = sample_linear_factors(50, 400, 30, generator=torch.Generator().manual_seed(0))
    assert a.shape == (400, 50) and b.shape == (30, 400)
    assert float(a.var()) == pytest.approx(1 / 50, rel=0.05)
    assert float(b.var()) == pytest.approx(1 / 400, rel=0.05)


def test_flow_matches_an_independent_integrator():
    """RK4 of the ODE against scipy's adaptive RK45 on the same right-hand side."""
    g = torch.Generator().manual_seed(3)
    n, d, k, o, l1, l2, lr = 10, 3, 2, 2, 2, 3, 0.7
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, o, generator=g, dtype=torch.float64) * 2
    a0, b0 = sample_linear_factors(d, k, o, generator=g)
    times = [0.0, 0.3, 1.0, 4.0, 10.0]
    flow = deep_linear_bottleneck_flow(x, y, a0, b0, times, lower_layers=l1, upper_layers=l2,
                                       lr=lr)
    xn, yn = x.numpy(), y.numpy()

    def rhs(_, s):
        a, b = s[:k * d].reshape(k, d), s[k * d:].reshape(o, k)
        g = (xn @ a.T @ b.T - yn).T @ xn / n
        return list((-lr * l1 / d * b.T @ g).ravel()) + list((-lr * l2 / k * g @ a.T).ravel())

    sol = solve_ivp(rhs, (0, times[-1]), list(a0.numpy().ravel()) + list(b0.numpy().ravel()),
                    t_eval=times, rtol=1e-10, atol=1e-12)
    for i in range(len(times)):
        a, b = sol.y[:k * d, i].reshape(k, d), sol.y[k * d:, i].reshape(o, k)
        assert flow.a[i].numpy() == pytest.approx(a, abs=1e-6)
        assert flow.b[i].numpy() == pytest.approx(b, abs=1e-6)
        loss = 0.5 * ((xn @ a.T @ b.T - yn) ** 2).sum() / n
        assert float(flow.loss[i]) == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("k, depth_before, width", [(1, 0, 4096), (3, 0, 4096), (2, 1, 1024)])
def test_flow_predicts_a_wide_deep_linear_network(k, depth_before, width):
    """The infinite-width ODE against a wide deep linear network trained by gradient descent
    with a small learning rate, from the network's own end-to-end factors: outputs within a
    few % of the initial residual, and the ODE's NTK against the network's empirical NTK."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = 3 * x[:, :2] @ torch.tensor([[1.0, 0.5], [-0.5, 1.0]], dtype=torch.float64)
    torch.manual_seed(0)
    m = BottleneckMLP(4, width, k, 2, activation="identity", depth_before=depth_before).double()
    a0, b0 = m.linear_factors()
    lr, eval_at = 0.01, [0, 25, 100, 400]
    flow = deep_linear_bottleneck_flow(x, y, a0, b0, [lr * s for s in eval_at],
                                       lower_layers=m.lower_layers, upper_layers=m.upper_layers)
    theory = flow.ntk(x, lower_layers=m.lower_layers, upper_layers=m.upper_layers)[0]
    empirical = ntk(m, x, output="full")
    tol = 0.02 if width >= 4096 else 0.06
    assert float((empirical - theory).norm() / theory.norm()) < tol
    outs = train(m, x, y, lr, eval_at[-1], eval_at)
    assert max(relative_gaps(outs, flow.predict(x), y)) < tol
    losses = [float(half_mse(f, y)) for f in outs]
    assert losses[-1] == pytest.approx(float(flow.loss[-1]), rel=0.1, abs=1e-3)


def test_flow_becomes_the_fixed_kernel_as_the_bottleneck_widens():
    """k -> infinity: the ODE from the infinite-width init tends to linear regression with the
    fixed kernel (L1 + L2) x^T x' / d; a narrow bottleneck and a large target accelerate."""
    g = torch.Generator().manual_seed(5)
    n, d, l1, l2 = 32, 8, 2, 2
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = 4 * (x @ (w / w.norm()))[:, None]
    times = [0.0, 2.0, 8.0, 20.0]
    kernel = (l1 + l2) * x @ x.T / d
    gap, loss = {}, {}
    for k in (1, 4096):
        a0, b0 = sample_linear_factors(d, k, generator=torch.Generator().manual_seed(k))
        flow = deep_linear_bottleneck_flow(x, y, a0, b0, times, lower_layers=l1,
                                           upper_layers=l2)
        f = flow.predict(x)
        ref = kernel_regression(kernel, kernel, y, f0_train=f[0], f0_test=f[0], t=times)
        gap[k] = max(float((f[i] - ref[i]).norm() / (y - f[0]).norm()) for i in range(4))
        loss[k] = (float(flow.loss[2]), float(half_mse(ref[2], y)))
    assert gap[4096] < 0.03
    assert gap[1] > 4 * gap[4096] and gap[1] > 0.08
    assert loss[1][0] < 0.5 * loss[1][1]      # the narrow bottleneck is ahead at t = 8


def test_flow_errors():
    x, y = torch.randn(5, 3), torch.randn(5)
    a0, b0 = sample_linear_factors(3, 2)
    with pytest.raises(UsageError, match="a0 must be"):
        deep_linear_bottleneck_flow(x, y, a0.T, b0, [1.0], lower_layers=2, upper_layers=2)
    with pytest.raises(UsageError, match="b0 must be"):
        deep_linear_bottleneck_flow(x, y, a0, b0.T, [1.0], lower_layers=2, upper_layers=2)
    with pytest.raises(UsageError, match="sorted"):
        deep_linear_bottleneck_flow(x, y, a0, b0, [2.0, 1.0], lower_layers=2, upper_layers=2)
    with pytest.raises(UsageError, match="lower_layers"):
        deep_linear_bottleneck_flow(x, y, a0, b0, [1.0], lower_layers=0, upper_layers=2)
    with pytest.raises(UsageError, match="y must be"):
        deep_linear_bottleneck_flow(x, y[:4], a0, b0, [1.0], lower_layers=2, upper_layers=2)


# --------------------------------------------------------------------------- the scalar model


@pytest.mark.parametrize("a0, b0, w", [(0.8, -1.3, 4.0), (1.0, 1.2, -3.0), (0.3, 0.5, 10.0),
                                       (math.sqrt(2), math.sqrt(3), 5.0), (1.1, 0.4, 0.2)])
def test_closed_form_matches_the_ode(a0, b0, w):
    l1, l2, lr = 2, 3, 0.7

    def rhs(_, s):
        e = s[0] * s[1] - w
        return [-lr * l1 * s[1] * e, -lr * l2 * s[0] * e]

    times = [0.0, 0.05, 0.2, 0.5, 1.0, 3.0]
    sol = solve_ivp(rhs, (0, 3), [a0, b0], t_eval=times, rtol=1e-11, atol=1e-12)
    u = scalar_bottleneck_trajectory(times, a0=a0, b0=b0, target=w, lower_layers=l1,
                                     upper_layers=l2, lr=lr)
    assert u.numpy() == pytest.approx(sol.y[0] * sol.y[1], abs=1e-8)
    mid = 0.5 * (a0 * b0 + w)
    t_mid = scalar_bottleneck_time(mid, a0=a0, b0=b0, target=w, lower_layers=l1,
                                   upper_layers=l2, lr=lr)
    back = scalar_bottleneck_trajectory([t_mid], a0=a0, b0=b0, target=w, lower_layers=l1,
                                        upper_layers=l2, lr=lr)
    assert float(back[0]) == pytest.approx(mid, abs=1e-9)


def test_closed_form_predicts_the_wide_scalar_network():
    """The simplified model as a real network: 1 -> 4096 -> 1 -> 4096 -> 1, linear, whitened
    inputs x = +-1, trained with a small learning rate."""
    x = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    torch.manual_seed(2)
    m = BottleneckMLP(1, 4096, 1, 1, activation="identity").double()
    a, b = (float(v) for v in m.linear_factors())
    lr, eval_at, w = 0.002, [0, 100, 300, 1000], 3.0
    outs = train(m, x, w * x, lr, eval_at[-1], eval_at)
    u = scalar_bottleneck_trajectory([lr * s for s in eval_at], a0=a, b0=b, target=w,
                                     lower_layers=2, upper_layers=2)
    measured = [float(f[0, 0]) for f in outs]
    assert measured == pytest.approx(u.tolist(), abs=0.03 * abs(w - a * b))


def test_closed_form_edge_cases():
    kw = {"a0": 1.0, "b0": 1.0, "target": 3.0, "lower_layers": 1, "upper_layers": 1}
    assert scalar_bottleneck_time(1.0, **kw) == 0.0
    assert scalar_bottleneck_time(3.0, **kw) == math.inf
    with pytest.raises(UsageError, match="never reached"):
        scalar_bottleneck_time(4.0, **kw)
    # balanced (c = 0) is Saxe et al.'s logistic: u(t) = w u0 / (u0 + (w - u0) e^{-2 w t})
    t = 0.3
    logistic = 3.0 / (1.0 + 2.0 * math.exp(-2 * 3.0 * t))
    assert float(scalar_bottleneck_trajectory([t], **kw)[0]) == pytest.approx(logistic, rel=1e-9)
    # a larger target is learned at a larger rate: relative progress at a fixed time
    big = dict(kw, target=30.0)
    rel = [(float(scalar_bottleneck_trajectory([0.05], **p)[0]) - 1.0) / (p["target"] - 1.0)
           for p in (kw, big)]
    assert rel[1] > 2 * rel[0]
    with pytest.raises(UsageError, match="a0 must be a finite number"):
        scalar_bottleneck_time(1.0, **dict(kw, a0=math.nan))
