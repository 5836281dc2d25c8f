"""Tests of kernel_regression against direct solves, ODE integration and gradient descent, and of
kernel_descent against a linear model trained by ``telescope.train.fit`` and gradient flow."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from telescope.kernels.regression import KernelRegressor, kernel_descent, kernel_regression
from telescope.train import fit


def _features(n: int, m: int, p: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, p, generator=g, dtype=torch.float64),
            torch.randn(m, p, generator=g, dtype=torch.float64))


def _problem(n: int = 8, m: int = 5, p: int = 20, outputs: int | None = None, seed: int = 0):
    """Kernels from explicit features, targets and initial outputs."""
    phi, phi_test = _features(n, m, p, seed)
    g = torch.Generator().manual_seed(seed + 100)
    shape = (n,) if outputs is None else (n, outputs)
    y = torch.randn(*shape, generator=g, dtype=torch.float64)
    f0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    f0_test = torch.randn(m, *shape[1:], generator=g, dtype=torch.float64)
    return phi @ phi.T, phi_test @ phi.T, y, f0, f0_test


# ----------------------------------------------------------------------------- (a) converged


def test_converged_full_rank_equals_solve():
    k, ks, y, f0, f0_test = _problem()
    pred, train = kernel_regression(k, ks, y, f0_train=f0, f0_test=f0_test, return_train=True)
    expected = f0_test + ks @ torch.linalg.solve(k, y - f0)
    torch.testing.assert_close(pred, expected, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(train, y, rtol=1e-8, atol=1e-8)  # interpolates


def test_converged_rank_deficient_is_min_norm_interpolant():
    # p < n: K has rank 4; the converged flow is the pseudo-inverse solution, which for a linear
    # model is the minimum-norm least-squares weights.
    phi, phi_test = _features(9, 3, 4, seed=1)
    y = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pred, train = kernel_regression(phi @ phi.T, phi_test @ phi.T, y, return_train=True)
    w = torch.linalg.lstsq(phi, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    torch.testing.assert_close(pred, phi_test @ w, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(train, phi @ w, rtol=1e-8, atol=1e-8)
    k_pinv = torch.linalg.pinv(phi @ phi.T, hermitian=True)
    torch.testing.assert_close(pred, phi_test @ phi.T @ k_pinv @ y, rtol=1e-7, atol=1e-7)


# ----------------------------------------------------------------------------- (b) finite t


@pytest.mark.parametrize("ridge", [0.0, 0.7])
def test_finite_time_matches_matrix_exponential(ridge):
    k, ks, y, f0, f0_test = _problem(n=7, m=4, p=5, outputs=2, seed=3)  # rank-deficient K
    n, lr, t = 7, 0.3, 4.0
    pred, train = kernel_regression(k, ks, y, f0_train=f0, f0_test=f0_test, t=t, lr=lr,
                                    ridge=ridge, return_train=True)
    # Dual ODE: alpha' = -(lr/n)[(K + ridge I) alpha - r], alpha(0) = 0, f = f0 + K alpha.
    # Augmented linear system z = [alpha; 1] so that z(t) = expm(t A) z(0).
    r = (y - f0).numpy()
    a_mat = -(lr / n) * (k.numpy() + ridge * np.eye(n))
    big = np.zeros((n + 1, n + 1))
    alphas = []
    for col in range(r.shape[1]):
        big[:n, :n] = a_mat
        big[:n, n] = (lr / n) * r[:, col]
        z = scipy.linalg.expm(t * big) @ np.r_[np.zeros(n), 1.0]
        alphas.append(z[:n])
    alpha = np.stack(alphas, 1)
    np.testing.assert_allclose(pred.numpy(), f0_test.numpy() + ks.numpy() @ alpha, rtol=1e-8,
                               atol=1e-10)
    np.testing.assert_allclose(train.numpy(), f0.numpy() + k.numpy() @ alpha, rtol=1e-8,
                               atol=1e-10)


def test_finite_time_matches_euler_integration_of_function_ode():
    k, ks, y, f0, f0_test = _problem(n=6, m=3, p=10, seed=4)
    n, lr, ridge, t_end, steps = 6, 0.5, 0.2, 3.0, 20000
    # Function-space ODE on train and test jointly:
    #   df/dt = -(lr/n) [K (f - y) + ridge (f - f0)] on train, df*/dt = -(lr/n) K* (f - y) - ...
    # integrated through the dual variable to keep the test oracle simple and explicit:
    f, fs, alpha = f0.clone(), f0_test.clone(), torch.zeros(n, dtype=torch.float64)
    dt = t_end / steps
    for _ in range(steps):
        d_alpha = -(lr / n) * (f - y + ridge * alpha)
        alpha = alpha + dt * d_alpha
        f = f + dt * (k @ d_alpha)
        fs = fs + dt * (ks @ d_alpha)
    # Check the function-space form of the ODE really holds for this trajectory's end point.
    torch.testing.assert_close(f, f0 + k @ alpha, rtol=1e-10, atol=1e-10)
    pred, train = kernel_regression(k, ks, y, f0_train=f0, f0_test=f0_test, t=t_end, lr=lr,
                                    ridge=ridge, return_train=True)
    torch.testing.assert_close(pred, fs, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(train, f, rtol=1e-3, atol=1e-4)


def test_function_space_ode_holds():
    # d f/dt = -(lr/n)[K (f - y) + ridge (f - f0)] on train, by central differences in t.
    k, ks, y, f0, _ = _problem(n=6, m=3, p=10, seed=5)
    lr, ridge, t, h = 0.8, 0.3, 2.0, 1e-4
    reg = KernelRegressor(k, y, f0_train=f0, lr=lr, ridge=ridge)
    f_m, f_t, f_p = reg.predict_train([t - h, t, t + h])
    deriv = (f_p - f_m) / (2 * h)
    torch.testing.assert_close(deriv, -(lr / 6) * (k @ (f_t - y) + ridge * (f_t - f0)),
                               rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- (c) real GD


def test_gradient_descent_on_linear_model_parameters():
    # f(x) = <w, phi(x)>, loss 0.5 * mean (f - y)^2 + (ridge / 2n) ||w - w0||^2, gradient
    # descent with a small step on w itself.
    n, m, p = 10, 4, 6
    phi, phi_test = _features(n, m, p, seed=6)
    y = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    w0 = torch.randn(p, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    lr, steps = 5e-3, 2000
    for ridge in (0.0, 0.5):
        w = w0.clone().requires_grad_()
        for _ in range(steps):
            loss = 0.5 * ((phi @ w - y) ** 2).mean() + ridge / (2 * n) * ((w - w0) ** 2).sum()
            (grad,) = torch.autograd.grad(loss, w)
            with torch.no_grad():
                w -= lr * grad
        pred, train = kernel_regression(
            phi @ phi.T, phi_test @ phi.T, y, f0_train=phi @ w0, f0_test=phi_test @ w0,
            t=steps * lr, lr=1.0, ridge=ridge, return_train=True,
        )
        # Same flow expressed as t = steps with lr = lr.
        same = kernel_regression(phi @ phi.T, phi_test @ phi.T, y, f0_train=phi @ w0,
                                 f0_test=phi_test @ w0, t=steps, lr=lr, ridge=ridge)
        torch.testing.assert_close(same, pred, rtol=1e-10, atol=1e-10)
        with torch.no_grad():
            torch.testing.assert_close(pred, phi_test @ w, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(train, phi @ w, rtol=1e-3, atol=1e-3)
            # and it is far from both the start and the converged solution at this time
            assert (phi_test @ w - phi_test @ w0).abs().max() > 0.1
            converged = kernel_regression(phi @ phi.T, phi_test @ phi.T, y, f0_train=phi @ w0,
                                          f0_test=phi_test @ w0, ridge=ridge)
            assert (phi_test @ w - converged).abs().max() > 0.1


# ----------------------------------------------------------------------------- (d), (e)


def test_t_zero_returns_f0():
    k, ks, y, f0, f0_test = _problem(outputs=3)
    pred, train = kernel_regression(k, ks, y, f0_train=f0, f0_test=f0_test, t=0.0, ridge=0.1,
                                    return_train=True)
    torch.testing.assert_close(pred, f0_test, rtol=0, atol=1e-12)
    torch.testing.assert_close(train, f0, rtol=0, atol=1e-12)
    zero = kernel_regression(k, ks, y, t=0)
    assert torch.equal(zero, torch.zeros(5, 3, dtype=torch.float64))


def test_ridge_converged_matches_closed_form():
    k, ks, y, f0, f0_test = _problem(n=8, p=3, outputs=2)  # rank 3: ridge makes it invertible
    lam = 0.37
    pred = kernel_regression(k, ks, y, f0_train=f0, f0_test=f0_test, ridge=lam)
    expected = f0_test + ks @ torch.linalg.solve(k + lam * torch.eye(8, dtype=k.dtype), y - f0)
    torch.testing.assert_close(pred, expected, rtol=1e-9, atol=1e-9)
    # t = inf is the same as t = None, and a large t approaches it.
    torch.testing.assert_close(kernel_regression(k, ks, y, f0_train=f0, f0_test=f0_test,
                                                 ridge=lam, t=float("inf")), pred)
    late = kernel_regression(k, ks, y, f0_train=f0, f0_test=f0_test, ridge=lam, t=1e6)
    torch.testing.assert_close(late, pred, rtol=1e-8, atol=1e-8)


def test_small_ridge_approaches_pseudo_inverse():
    k, ks, y, *_ = _problem(n=8, p=3)
    interp = kernel_regression(k, ks, y)
    tiny = kernel_regression(k, ks, y, ridge=1e-8)
    torch.testing.assert_close(tiny, interp, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- (f) shapes


def test_multi_output_and_time_vector():
    k, ks, y, f0, f0_test = _problem(outputs=3)
    times = [0.0, 0.5, 2.0, float("inf")]
    many, many_train = kernel_regression(k, ks, y, f0_train=f0, f0_test=f0_test, t=times,
                                         lr=0.7, return_train=True)
    assert many.shape == (4, 5, 3) and many_train.shape == (4, 8, 3)
    for i, t in enumerate(times):
        one = kernel_regression(k, ks, y, f0_train=f0, f0_test=f0_test, t=t, lr=0.7)
        assert one.shape == (5, 3)
        torch.testing.assert_close(many[i], one, rtol=1e-12, atol=1e-12)
        # every output column is an independent scalar regression
        for o in range(3):
            col = kernel_regression(k, ks, y[:, o], f0_train=f0[:, o], f0_test=f0_test[:, o],
                                    t=t, lr=0.7)
            assert col.shape == (5,)
            torch.testing.assert_close(one[:, o], col, rtol=1e-12, atol=1e-12)
    as_tensor = kernel_regression(k, ks, y, f0_train=f0, f0_test=f0_test,
                                  t=torch.tensor([0.5, 2.0]), lr=0.7)
    torch.testing.assert_close(as_tensor, many[1:3], rtol=1e-12, atol=1e-12)
    scalar_vec = kernel_regression(k, ks, y[:, 0], t=[1.0])
    assert scalar_vec.shape == (1, 5)


def test_regressor_reuse_and_dtype():
    k, ks, y, f0, f0_test = _problem()
    reg = KernelRegressor(k.float(), y.float(), f0_train=f0.float())
    out = reg.predict(ks.float(), [1.0, 3.0], f0_test=f0_test.float())
    assert out.dtype == torch.float32 and out.shape == (2, 5)
    ref = kernel_regression(k, ks, y, f0_train=f0, f0_test=f0_test, t=[1.0, 3.0])
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4)
    alpha = reg.coefficients(3.0)
    torch.testing.assert_close((ks @ alpha.squeeze(1)).float() + f0_test.float(), out[1],
                               rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- (g) errors


def test_bad_inputs_raise_useful_errors():
    k, ks, y, f0, f0_test = _problem()
    with pytest.raises(ValueError, match=r"k_test_train has 7 columns.*k_train_train has 8"):
        kernel_regression(k, ks[:, :7], y)
    with pytest.raises(ValueError, match="square"):
        kernel_regression(k[:, :7], ks[:, :7], y)
    with pytest.raises(ValueError, match=r"y_train has 7 rows.*n = 8"):
        kernel_regression(k, ks, y[:7])
    with pytest.raises(ValueError, match="f0_train must have the shape of y_train"):
        kernel_regression(k, ks, y, f0_train=f0[:6])
    with pytest.raises(ValueError, match=r"f0_test has 4 rows.*m .* = 5"):
        kernel_regression(k, ks, y, f0_test=f0_test[:4])
    with pytest.raises(ValueError, match="f0_test must have shape"):
        kernel_regression(k, ks, y, f0_test=f0_test[:, None])
    with pytest.raises(ValueError, match="f0_test has 2 output"):
        kernel_regression(k, ks, y[:, None].repeat(1, 3), f0_test=torch.zeros(5, 2))
    bad = k.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="k_train_train contains NaN"):
        kernel_regression(bad, ks, y)
    with pytest.raises(ValueError, match="y_train contains NaN"):
        kernel_regression(k, ks, torch.full_like(y, float("nan")))
    with pytest.raises(ValueError, match="t must be >= 0"):
        kernel_regression(k, ks, y, t=-1.0)
    with pytest.raises(ValueError, match="t contains NaN"):
        kernel_regression(k, ks, y, t=[1.0, float("nan")])
    with pytest.raises(ValueError, match="ridge"):
        kernel_regression(k, ks, y, ridge=-0.1)
    with pytest.raises(ValueError, match="lr"):
        kernel_regression(k, ks, y, lr=0.0)
    with pytest.raises(ValueError, match="2-D"):
        kernel_regression(k, ks[0], y)


def test_indefinite_kernel_warns():
    k = torch.diag(torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="positive semi-definite"):
        kernel_regression(k, torch.ones(2, 3, dtype=torch.float64), torch.ones(3))


# ----------------------------------------------------------------------------- (h) discrete steps


def test_kernel_descent_is_gradient_descent_of_a_linear_model():
    """A linear model ``f = phi(x) w`` has the NTK ``phi phi^T``; ``fit`` with SGD on ``0.5
    MSE`` moves it exactly as :func:`kernel_descent` says (test and train), and for a small
    learning rate both approach gradient flow (:func:`kernel_regression` at ``lr * t``)."""
    g = torch.Generator().manual_seed(0)
    phi, phi_test = torch.randn(20, 7, generator=g, dtype=torch.float64), torch.randn(
        9, 7, generator=g, dtype=torch.float64)
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(7, 1, bias=False).double()
    with torch.no_grad():
        f0, f0_test = model(phi), model(phi_test)
    k, k_test = phi @ phi.T, phi_test @ phi.T
    lr, steps = 0.7, [0, 1, 5, 30]
    want, want_train = kernel_descent(k, k_test, y, f0_train=f0, f0_test=f0_test, steps=steps,
                                      lr=lr, return_train=True)
    assert want.shape == (4, 9, 1) and want_train.shape == (4, 20, 1)
    got, got_train = {}, {}

    class Record:
        def measure(self, state):
            with torch.no_grad():
                got[state.step] = state.model(phi_test).clone()
                got_train[state.step] = state.model(phi).clone()

    fit(model, torch.optim.SGD(model.parameters(), lr=lr), phi, y, steps=30,
        loss=lambda o, t: 0.5 * F.mse_loss(o, t), eval_at=steps, callbacks=[Record()])
    for i, s in enumerate(steps):
        torch.testing.assert_close(want[i], got[s], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(want_train[i], got_train[s], rtol=1e-10, atol=1e-12)
    # the gradient-flow limit: a 100 times smaller step, 100 times as many steps
    small = kernel_descent(k, k_test, y, f0_train=f0, f0_test=f0_test, steps=3000, lr=lr / 100)
    flow = kernel_regression(k, k_test, y, f0_train=f0, f0_test=f0_test, t=30.0, lr=lr)
    torch.testing.assert_close(small, flow, rtol=0, atol=2e-3 * float(flow.abs().max()))
    assert float((want[3] - flow).abs().max()) > 10 * float((small - flow).abs().max())


def test_kernel_descent_shapes_steps_and_outputs():
    k, ks, y, f0, f0_test = _problem(outputs=3)
    many, many_train = kernel_descent(k, ks, y, f0_train=f0, f0_test=f0_test, steps=[4, 0, 2, 4],
                                      lr=0.3, return_train=True)
    assert many.shape == (4, 5, 3) and many_train.shape == (4, 8, 3)
    torch.testing.assert_close(many[1], f0_test, rtol=0, atol=0)      # step 0: the start
    torch.testing.assert_close(many_train[1], f0, rtol=0, atol=0)
    assert torch.equal(many[0], many[3])                                # in the order given
    for i, s in enumerate([4, 0, 2, 4]):
        one = kernel_descent(k, ks, y, f0_train=f0, f0_test=f0_test, steps=s, lr=0.3)
        assert one.shape == (5, 3)
        assert torch.equal(one, many[i])
        # every output column is an independent scalar problem
        for o in range(3):
            col = kernel_descent(k, ks, y[:, o], f0_train=f0[:, o], f0_test=f0_test[:, o],
                                 steps=s, lr=0.3)
            assert col.shape == (5,)
            torch.testing.assert_close(one[:, o], col, rtol=1e-12, atol=1e-12)
    # one step by hand, from f = 0 by default
    step1 = kernel_descent(k, ks, y, steps=1, lr=0.3)
    torch.testing.assert_close(step1, (0.3 / 8) * ks @ y, rtol=1e-12, atol=1e-12)
    as_tensor = kernel_descent(k, ks, y, f0_train=f0, f0_test=f0_test, steps=torch.tensor([2, 4]),
                               lr=0.3)
    assert torch.equal(as_tensor, many[2:4])
    assert torch.equal(kernel_descent(k, ks, y, steps=np.int64(2), lr=0.3),
                       kernel_descent(k, ks, y, steps=2, lr=0.3))
    low = kernel_descent(k.float(), ks.float(), y.float(), steps=[1, 3], lr=0.3)
    assert low.dtype == torch.float32 and low.shape == (2, 5, 3)


def test_kernel_descent_bad_inputs_raise_useful_errors():
    k, ks, y, f0, f0_test = _problem()
    with pytest.raises(ValueError, match=r"k_test_train has 7 columns.*k_train_train has 8"):
        kernel_descent(k, ks[:, :7], y, steps=1)
    with pytest.raises(ValueError, match="square"):
        kernel_descent(k[:, :7], ks[:, :7], y, steps=1)
    with pytest.raises(ValueError, match=r"y_train has 7 rows.*n = 8"):
        kernel_descent(k, ks, y[:7], steps=1)
    with pytest.raises(ValueError, match="f0_train has 6 rows"):
        kernel_descent(k, ks, y, f0_train=f0[:6], steps=1)
    with pytest.raises(ValueError, match=r"f0_test has 4 rows.*m .* = 5"):
        kernel_descent(k, ks, y, f0_test=f0_test[:4], steps=1)
    with pytest.raises(ValueError, match="f0_test must have shape"):
        kernel_descent(k, ks, y, f0_test=f0_test[:, None], steps=1)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        kernel_descent(k, ks, y, steps=[3, -1])
    for bad in (2.0, [1, 2.5], True, torch.tensor([1.0]), "3"):
        with pytest.raises(ValueError, match="steps must be an int"):
            kernel_descent(k, ks, y, steps=bad)
    with pytest.raises(ValueError, match="steps is empty"):
        kernel_descent(k, ks, y, steps=[])
    with pytest.raises(ValueError, match="lr"):
        kernel_descent(k, ks, y, steps=1, lr=0.0)
    bad = k.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="k_train_train contains NaN"):
        kernel_descent(bad, ks, y, steps=1)

