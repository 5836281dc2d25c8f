"""Tests of the infinite-width NNGP/NTK against hand closed forms, Monte Carlo and wide networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from telescope.infinite import infinite_ntk

# ----------------------------------------------------------------------------- helpers


def _inputs(n: int = 5, d: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _relu_pair_by_hand(kxx: float, kxy: float, kyy: float) -> tuple[float, float]:
    """E[relu(u)relu(v)] and E[1(u>0)1(v>0)] for (u, v) ~ N(0, [[kxx, kxy], [kxy, kyy]])."""
    c = min(1.0, max(-1.0, kxy / math.sqrt(kxx * kyy)))
    t = math.acos(c)
    e_relu = math.sqrt(kxx * kyy) / (2 * math.pi) * (math.sin(t) + (math.pi - t) * c)
    e_step = (math.pi - t) / (2 * math.pi)
    return e_relu, e_step


def _mc_layer(
    k: np.ndarray, phi, dphi, samples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo E[phi(z) phi(z)^T] and E[phi'(z) phi'(z)^T] for z ~ N(0, k) (all points)."""
    evals, evecs = np.linalg.eigh(k)
    root = evecs * np.sqrt(np.clip(evals, 0, None))
    z = rng.standard_normal((samples, k.shape[0])) @ root.T
    a, da = phi(z), dphi(z)
    return a.T @ a / samples, da.T @ da / samples


def _erf(z: np.ndarray) -> np.ndarray:
    return torch.erf(torch.from_numpy(z)).numpy()


def _derf(z: np.ndarray) -> np.ndarray:
    return 2 / math.sqrt(math.pi) * np.exp(-(z**2))


# ----------------------------------------------------------------------------- (a) ReLU


def test_depth0_is_linear_kernel():
    x = _inputs(4, 6)
    out = infinite_ntk(x, depth=0, weight_std=1.5, bias_std=0.3)
    expected = 1.5**2 * x @ x.T / 6 + 0.3**2
    torch.testing.assert_close(out["nngp"], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["ntk"], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("w_std,b_std", [(1.0, 0.0), (1.4, 0.2)])
def test_relu_depth1_matches_hand_closed_form(w_std, b_std):
    x1 = _inputs(4, 3, seed=1)
    x2 = _inputs(3, 3, seed=2)
    out = infinite_ntk(x1, x2, depth=1, weight_std=w_std, bias_std=b_std)
    w2, b2 = w_std**2, b_std**2
    nngp = np.zeros((4, 3))
    ntk = np.zeros((4, 3))
    for i in range(4):
        for j in range(3):
            a, b = x1[i].numpy(), x2[j].numpy()
            kxx = w2 * a @ a / 3 + b2
            kyy = w2 * b @ b / 3 + b2
            kxy = w2 * a @ b / 3 + b2
            e_relu, e_step = _relu_pair_by_hand(kxx, kxy, kyy)
            nngp[i, j] = w2 * e_relu + b2
            ntk[i, j] = nngp[i, j] + w2 * e_step * kxy
    np.testing.assert_allclose(out["nngp"].numpy(), nngp, rtol=1e-10)
    np.testing.assert_allclose(out["ntk"].numpy(), ntk, rtol=1e-10)


def test_relu_depth2_matches_hand_recursion_including_diagonal():
    x = _inputs(3, 4, seed=3)
    out = infinite_ntk(x, depth=2, weight_std=1.2, bias_std=0.5)
    w2, b2 = 1.2**2, 0.5**2
    k = w2 * (x @ x.T).numpy() / 4 + b2
    th = k.copy()
    for _ in range(2):
        new_k = np.zeros_like(k)
        new_th = np.zeros_like(k)
        for i in range(3):
            for j in range(3):
                e_relu, e_step = _relu_pair_by_hand(k[i, i], k[i, j], k[j, j])
                new_k[i, j] = w2 * e_relu + b2
                new_th[i, j] = new_k[i, j] + w2 * e_step * th[i, j]
        k, th = new_k, new_th
    np.testing.assert_allclose(out["nngp"].numpy(), k, rtol=1e-7)
    np.testing.assert_allclose(out["ntk"].numpy(), th, rtol=1e-7)
    # On the diagonal the angle is 0: K^{l+1}(x,x) = w2 K^l(x,x)/2 + b2 exactly.
    kd = w2 * (x * x).sum(1).numpy() / 4 + b2
    thd = kd.copy()
    for _ in range(2):
        kd = w2 * kd / 2 + b2
        thd = kd + w2 * 0.5 * thd
    np.testing.assert_allclose(np.diag(out["nngp"].numpy()), kd, rtol=1e-12)
    np.testing.assert_allclose(np.diag(out["ntk"].numpy()), thd, rtol=1e-12)


def test_relu_depth1_monte_carlo():
    rng = np.random.default_rng(0)
    x = _inputs(4, 3, seed=4)
    w2, b2 = 1.3**2, 0.1**2
    out = infinite_ntk(x, depth=1, weight_std=1.3, bias_std=0.1)
    k1 = w2 * (x @ x.T).numpy() / 3 + b2
    e_phi, e_dphi = _mc_layer(
        k1, lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(float), 10**6, rng
    )
    # Monte-Carlo error is ~1e-3 of the kernel's scale: relative 1e-2 plus an absolute floor for
    # entries near zero.
    atol = 5e-3 * float(out["ntk"].abs().max())
    np.testing.assert_allclose(out["nngp"].numpy(), w2 * e_phi + b2, rtol=1e-2, atol=atol)
    np.testing.assert_allclose(
        out["ntk"].numpy(), w2 * e_phi + b2 + w2 * e_dphi * k1, rtol=1e-2, atol=atol
    )
    # The arc-cosine formula itself, for one correlated pair.
    kxx, kxy, kyy = 2.0, -0.7, 0.8
    z = rng.standard_normal((10**6, 2)) @ np.linalg.cholesky([[kxx, kxy], [kxy, kyy]]).T
    mc = np.mean(np.maximum(z[:, 0], 0) * np.maximum(z[:, 1], 0))
    assert _relu_pair_by_hand(kxx, kxy, kyy)[0] == pytest.approx(mc, rel=1e-2)


# Reference numbers printed by neural-tangents 0.6.5 (jax 0.4.30, float64) for
# stax.serial(*([Dense(512, W_std=1.5, b_std=0.3), Act()] * 2), Dense(1, W_std=1.5, b_std=0.3))
# kernel_fn(x1, x2, ("nngp", "ntk")) on the inputs below; only the numbers are used here.
_NT_X1 = [[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [-1.0, 1.0, 1.0]]
_NT_X2 = [[0.2, 0.3, -0.4], [2.0, 0.0, 0.0]]
_NT_REFERENCE = {
    "relu": {
        "nngp": [[0.7657715278310511, 3.090979342772145], [0.5158555913424332, 1.703202540887395],
                 [0.678198825871461, 1.4372813875286292]],
        "ntk": [[0.85488529366001, 5.870661317501343], [0.6728574197706566, 3.207552299830493],
                [0.8479816006465581, 1.3649616711162502]],
    },
    "erf": {
        "nngp": [[-0.08112215411293708, 0.5627791173573465],
                 [0.10309452526415681, 0.5762403597903154],
                 [0.054021940914155714, -0.31504009161536306]],
        "ntk": [[-0.5109028499132908, 1.5058762411365336],
                [0.03550836762291805, 1.5344014139635442],
                [-0.10381195763258208, -1.2504234877634257]],
    },
}


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_matches_neural_tangents_reference_numbers(activation):
    x1 = torch.tensor(_NT_X1, dtype=torch.float64)
    x2 = torch.tensor(_NT_X2, dtype=torch.float64)
    out = infinite_ntk(x1, x2, depth=2, activation=activation, weight_std=1.5, bias_std=0.3)
    for name in ("nngp", "ntk"):
        expected = torch.tensor(_NT_REFERENCE[activation][name], dtype=torch.float64)
        torch.testing.assert_close(out[name], expected, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- (b) erf


@pytest.mark.parametrize("depth", [1, 2])
def test_erf_monte_carlo(depth):
    rng = np.random.default_rng(depth)
    x = _inputs(4, 5, seed=5)
    w_std, b_std = 1.1, 0.4
    w2, b2 = w_std**2, b_std**2
    out = infinite_ntk(x, depth=depth, activation="erf", weight_std=w_std, bias_std=b_std)
    k = w2 * (x @ x.T).numpy() / 5 + b2
    th = k.copy()
    for _ in range(depth):
        e_phi, e_dphi = _mc_layer(k, _erf, _derf, 10**6, rng)
        k = w2 * e_phi + b2
        th = k + w2 * e_dphi * th
    atol = 5e-3 * float(out["ntk"].abs().max())
    np.testing.assert_allclose(out["nngp"].numpy(), k, rtol=1e-2, atol=atol)
    np.testing.assert_allclose(out["ntk"].numpy(), th, rtol=1e-2, atol=atol)


# ----------------------------------------------------------------------------- (c) structure


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_symmetric_psd_and_blocks(activation):
    x = _inputs(12, 7, seed=6)
    out = infinite_ntk(x, depth=3, activation=activation, weight_std=1.3, bias_std=0.2)
    for name in ("nngp", "ntk"):
        k = out[name]
        assert torch.equal(k, k.T)
        evals = torch.linalg.eigvalsh(k)
        assert evals.min() > -1e-10 * evals.max()
    cross = infinite_ntk(x[:5], x[5:], depth=3, activation=activation, weight_std=1.3,
                         bias_std=0.2)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(cross[name], out[name][:5, 5:], rtol=1e-10, atol=1e-12)


def test_flattens_inputs_and_keeps_dtype():
    x = _inputs(3, 12, seed=7)
    flat = infinite_ntk(x, depth=2)
    image = infinite_ntk(x.reshape(3, 3, 2, 2), depth=2)
    torch.testing.assert_close(image["ntk"], flat["ntk"])
    single = infinite_ntk(x.float(), depth=2)
    assert single["ntk"].dtype == torch.float32
    assert single["nngp"].shape == (3, 3)
    torch.testing.assert_close(single["ntk"], flat["ntk"].float(), rtol=1e-5, atol=1e-6)


def test_zero_input_without_bias_is_finite():
    x = torch.zeros(2, 3, dtype=torch.float64)
    x[1] = 1.0
    out = infinite_ntk(x, depth=2)
    assert torch.isfinite(out["ntk"]).all()  # no 0/0 in the arc-cosine recursion
    assert out["ntk"][0].abs().max() == 0
    # the zero input leaves the other point's kernel as it is on its own
    torch.testing.assert_close(out["ntk"][1, 1], infinite_ntk(x[1:], depth=2)["ntk"][0, 0])


# ----------------------------------------------------------------------------- (d) wide nets


def _empirical_ntk_ntk_param_mlp(
    x: torch.Tensor, width: int, depth: int, w_std: float, b_std: float, seed: int
) -> torch.Tensor:
    """Empirical NTK of an NTK-parametrized MLP, by a per-example autograd.grad loop."""
    g = torch.Generator().manual_seed(seed)
    sizes = [x.shape[1]] + [width] * depth + [1]
    params = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        # Sampled in float32 (4x faster for the 4096 x 4096 layer), used in float64.
        w = torch.randn(n_out, n_in, generator=g).double().requires_grad_()
        b = torch.randn(n_out, generator=g).double().requires_grad_()
        params += [w, b]

    def f(xi: torch.Tensor) -> torch.Tensor:
        h = xi
        for layer in range(len(sizes) - 1):
            w, b = params[2 * layer], params[2 * layer + 1]
            if layer > 0:
                h = torch.relu(h)
            h = w_std / math.sqrt(w.shape[1]) * (w @ h) + b_std * b
        return h[0]

    grads = [torch.autograd.grad(f(xi), params) for xi in x]
    # K[i, j] = sum_p <d f(x_i)/d p, d f(x_j)/d p>, contracted in column blocks copied into one
    # reused buffer (the 4096 x 4096 layer alone has 16.8M parameters: this reads every gradient
    # once and allocates nothing per block, which matters on a busy 2-core machine).
    n, chunk = x.shape[0], 1 << 17
    kernel = torch.zeros(n, n, dtype=torch.float64)
    block = torch.empty(n, chunk, dtype=torch.float64)
    for p in range(len(params)):
        flat = [gi[p].reshape(-1) for gi in grads]
        for start in range(0, flat[0].numel(), chunk):
            stop = min(start + chunk, flat[0].numel())
            for i in range(n):
                block[i, : stop - start] = flat[i][start:stop]
            used = block[:, : stop - start]
            kernel += used @ used.T
    return kernel


def test_wide_network_empirical_ntk_converges():
    x = _inputs(6, 5, seed=8)
    w_std, b_std, depth = 1.2, 0.3, 2
    target = infinite_ntk(x, depth=depth, weight_std=w_std, bias_std=b_std)["ntk"]

    def rel_err(width: int, seed: int) -> float:
        emp = _empirical_ntk_ntk_param_mlp(x, width, depth, w_std, b_std, seed)
        return float(torch.linalg.matrix_norm(emp - target) / torch.linalg.matrix_norm(target))

    # One intra-op thread: these ops are memory-bound, and with other processes on the 2 cores
    # thread barriers can make many small parallel ops 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Fluctuations are O(1/sqrt(width)): ~4x smaller at 4096 than at 256.
        wide = [rel_err(4096, s) for s in range(2)]
        narrow = [rel_err(256, s) for s in range(4)]
    finally:
        torch.set_num_threads(threads)
    assert max(wide) < 0.1
    assert np.mean(wide) < 0.6 * np.mean(narrow)


# ----------------------------------------------------------------------------- (e) errors


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(depth=-1), ValueError, "depth"),
        (dict(depth=1.5), TypeError, "depth"),
        (dict(depth=True), TypeError, "depth"),
        (dict(depth=1, activation="tanh"), ValueError, "activation"),
        (dict(depth=1, weight_std=-1.0), ValueError, "weight_std"),
        (dict(depth=1, bias_std=float("nan")), ValueError, "bias_std"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        infinite_ntk(_inputs(), **kwargs)


def test_bad_inputs():
    x = _inputs(4, 3)
    with pytest.raises(ValueError, match="same number of features"):
        infinite_ntk(x, _inputs(2, 4), depth=1)
    with pytest.raises(ValueError, match="feature dimension"):
        infinite_ntk(x[:, 0], depth=1)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        infinite_ntk(bad, depth=1)
    with pytest.raises(ValueError, match="x2 contains NaN"):
        infinite_ntk(x, bad, depth=1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        infinite_ntk(x.numpy(), depth=1)
    with pytest.raises(TypeError):
        infinite_ntk(x)  # depth is required
