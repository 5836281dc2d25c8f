"""Tests of the infinite-network predictions (gradient-descent ensembles, GP inference).

The oracles avoid the module's eigendecomposition path: a linear model in weight space whose
initial function is Gaussian, trained by gradient flow written as one matrix exponential
(scipy.linalg.expm) and averaged over the initialization in closed form; the dense formulas
written out with scipy.linalg.expm and explicit inverses; the gradient-flow ODE checked by
finite differences in t; hand-written linear solves; and neural-tangents' numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from telescope.errors import UsageError
from telescope.infinite.predictions import gp_inference, gradient_descent_mse_ensemble
from telescope.kernels.regression import kernel_regression

FIXTURE = Path(__file__).parent / "fixtures" / "neural_tangents" / "predict_ensemble.npz"
N_TRAIN, N_TEST = 6, 4


# ----------------------------------------------------------------------------- helpers


def _features(n_points: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_points, width)) / np.sqrt(width)


def _setup(seed: int = 0, outputs: int | None = 1):
    """Random feature maps for the NNGP (phi) and NTK (psi) on train + test points, their kernel
    blocks as torch dicts, and targets."""
    n_all = N_TRAIN + N_TEST
    phi = _features(n_all, n_all + 3, seed)
    psi = np.concatenate([phi, _features(n_all, n_all + 2, seed + 1)], axis=1)  # Theta >= K
    k_all, theta_all = phi @ phi.T, psi @ psi.T
    tr, te = slice(0, N_TRAIN), slice(N_TRAIN, n_all)

    def blocks(a: np.ndarray, b: np.ndarray) -> dict[str, torch.Tensor]:
        return {"nngp": torch.from_numpy(k_all[a, b].copy()),
                "ntk": torch.from_numpy(theta_all[a, b].copy())}

    rng = np.random.default_rng(seed + 2)
    y = rng.standard_normal((N_TRAIN,) if outputs is None else (N_TRAIN, outputs))
    return {"phi": phi, "psi": psi, "k": k_all, "theta": theta_all, "tr": tr, "te": te,
            "k_dd": blocks(tr, tr), "k_td": blocks(te, tr), "k_tt": blocks(te, te),
            "y": torch.from_numpy(y), "y_np": y.reshape(N_TRAIN, -1)}


def _weight_space(feat_train, feat_test, s_train, s_cross, s_test, y, t, lr):
    """Mean and covariance over f0 ~ N(0, [[s_test, s_cross], [s_cross^T, s_train]]) of
    f_t(x*) = f0(x*) + feat(x*) delta_t for the linear model f = f0 + feat . delta, delta_0 = 0,
    trained by gradient flow on (1/2n) sum_i (f(x_i) - y_i)^2. delta_t = B_t (y - f0(X)) with
    B_t the top-right block of expm(t [[-a G, a feat^T], [0, 0]]), a = lr/n, G = feat^T feat
    (t = inf: the minimum-norm solution, B = pinv(feat))."""
    n, p = feat_train.shape
    if np.isinf(t):
        b = np.linalg.pinv(feat_train)
    else:
        a = lr / n
        aug = np.zeros((p + n, p + n))
        aug[:p, :p] = -a * feat_train.T @ feat_train
        aug[:p, p:] = a * feat_train.T
        b = scipy.linalg.expm(t * aug)[:p, p:]
    c = feat_test @ b  # f*_t = f0(*) + c (y - f0(X))
    mean = c @ y
    cov = s_test - c @ s_cross.T - s_cross @ c.T + c @ s_train @ c.T
    return mean, cov


def _oracle(setup, get: str, t: float, lr: float, ridge: float):
    """The weight-space ensemble of the infinite network in mode ``get`` (neural-tangents' ridge:
    every training point gets its own trained feature of scale sqrt(ridge); for the NNGP mode
    that feature is randomly initialized too, so the train block of f0's covariance gains
    ridge * I)."""
    tr, te = setup["tr"], setup["te"]
    feats = setup["phi"] if get == "nngp" else setup["psi"]
    k = setup["k"]
    extra = np.sqrt(ridge) * np.eye(N_TRAIN)
    f_train = np.concatenate([feats[tr], extra], axis=1)
    f_test = np.concatenate([feats[te], np.zeros((N_TEST, N_TRAIN))], axis=1)
    s_train = k[tr, tr] + (ridge * np.eye(N_TRAIN) if get == "nngp" else 0.0)
    return _weight_space(f_train, f_test, s_train, k[te, tr], k[te, te], setup["y_np"], t, lr)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _run(setup, **kw):
    return gradient_descent_mse_ensemble(setup["k_dd"], setup["k_td"], setup["y"],
                                         k_test_test=setup["k_tt"], **kw)


# ----------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("ridge", [0.0, 0.3])
@pytest.mark.parametrize("t,lr", [(0.7, 1.0), (3.0, 0.5), (40.0, 2.0)])
def test_matches_weight_space_ensemble(get, ridge, t, lr):
    setup = _setup()
    out = _run(setup, t=t, lr=lr, ridge=ridge, get=get)[get]
    mean, cov = _oracle(setup, get, t, lr, ridge)
    np.testing.assert_allclose(_np(out["mean"]), mean, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(_np(out["cov"]), cov, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_converged_matches_minimum_norm_weight_space(get, ridge):
    setup = _setup(seed=3)
    out = _run(setup, t=None, ridge=ridge, get=get)[get]
    mean, cov = _oracle(setup, get, np.inf, 1.0, ridge)
    np.testing.assert_allclose(_np(out["mean"]), mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(_np(out["cov"]), cov, rtol=1e-8, atol=1e-10)


def test_dense_expm_formulas_with_time_axis():
    """The formulas of the docstring written out with dense matrices and scipy's expm."""
    setup = _setup(seed=5, outputs=2)
    lr, ridge, times = 0.8, 0.05, [0.0, 0.5, 2.0, 9.0]
    out = _run(setup, t=times, lr=lr, ridge=ridge)
    k, kt, kss = (_np(setup[b]["nngp"]) for b in ("k_dd", "k_td", "k_tt"))
    th, tht = (_np(setup[b]["ntk"]) for b in ("k_dd", "k_td"))
    y = setup["y_np"]
    eye = np.eye(N_TRAIN)
    assert out["ntk"]["mean"].shape == (len(times), N_TEST, 2)
    assert out["ntk"]["cov"].shape == (len(times), N_TEST, N_TEST)
    for i, t in enumerate(times):
        th_r = th + ridge * eye
        a = np.linalg.inv(th_r) @ (eye - scipy.linalg.expm(-lr * t * th_r / N_TRAIN))
        mean = tht @ a @ y
        cov = kss + tht @ a @ k @ a.T @ tht.T - (tht @ a @ kt.T + kt @ a.T @ tht.T)
        np.testing.assert_allclose(_np(out["ntk"]["mean"][i]), mean, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(_np(out["ntk"]["cov"][i]), cov, rtol=1e-9, atol=1e-11)

        k_r = k + ridge * eye
        k_inv = np.linalg.inv(k_r)
        mean = kt @ k_inv @ (eye - scipy.linalg.expm(-lr * t * k_r / N_TRAIN)) @ y
        cov = kss - kt @ k_inv @ (eye - scipy.linalg.expm(-2 * lr * t * k_r / N_TRAIN)) @ kt.T
        np.testing.assert_allclose(_np(out["nngp"]["mean"][i]), mean, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(_np(out["nngp"]["cov"][i]), cov, rtol=1e-9, atol=1e-11)


def test_time_zero_is_the_prior():
    """At t = 0 nothing has moved: the mean is 0 and, for both modes, the covariance is the
    prior NNGP K_** (NTK: K_** + 0 - 0; NNGP: K_** - K_* K^{-1} (I - I) K_*^T)."""
    setup = _setup()
    out = _run(setup, t=0.0, ridge=0.1)
    for g in ("nngp", "ntk"):
        torch.testing.assert_close(out[g]["mean"], torch.zeros(N_TEST, 1, dtype=torch.float64),
                                   rtol=0, atol=1e-14)
        torch.testing.assert_close(out[g]["cov"], setup["k_tt"]["nngp"], rtol=0, atol=1e-13)


@pytest.mark.parametrize("ridge", [0.0, 0.2])
def test_long_time_equals_converged(ridge):
    setup = _setup(seed=1)
    late = _run(setup, t=[1e8, float("inf")], ridge=ridge)
    done = _run(setup, t=None, ridge=ridge)
    for g in ("nngp", "ntk"):
        for i in range(2):
            torch.testing.assert_close(late[g]["mean"][i], done[g]["mean"], rtol=1e-9,
                                       atol=1e-10)
            torch.testing.assert_close(late[g]["cov"][i], done[g]["cov"], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_mean_solves_the_gradient_flow_ode(get):
    """Test rows followed by the training rows in k_test_train: by central differences in t,
    d mean(x)/dt = -(lr/n) Q(x, X) (mean(X) - y) with Q the training kernel of the mode."""
    setup = _setup(seed=2)
    lr, t, h = 1.3, 2.0, 1e-4
    q_td, q_dd = setup["k_td"][get], setup["k_dd"][get]
    both = {g: torch.cat([setup["k_td"][g], setup["k_dd"][g]]) for g in ("nngp", "ntk")}
    out = gradient_descent_mse_ensemble(setup["k_dd"], both, setup["y"], t=[t - h, t, t + h],
                                        lr=lr, get=get, compute_cov=False)[get]
    assert set(out) == {"mean"}
    mean = out["mean"]
    deriv = (mean[2] - mean[0]) / (2 * h)
    f_train = mean[1][N_TEST:]
    residual = f_train - setup["y"]
    expected = -(lr / N_TRAIN) * torch.cat([q_td, q_dd]) @ residual
    torch.testing.assert_close(deriv, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_covariance_is_symmetric_psd(ridge):
    setup = _setup(seed=4)
    out = _run(setup, t=[0.0, 0.3, 2.0, 30.0, float("inf")], ridge=ridge)
    for g in ("nngp", "ntk"):
        cov = out[g]["cov"]
        torch.testing.assert_close(cov, cov.transpose(-1, -2), rtol=0, atol=0)
        smallest = torch.linalg.eigvalsh(cov).min()
        assert smallest > -1e-10, (g, smallest)


def test_outputs_share_the_kernel():
    """Every output column evolves independently with the same kernel; 1-D targets give 1-D
    means."""
    setup = _setup(seed=6, outputs=3)
    out = _run(setup, t=[0.5, 3.0], ridge=0.05)
    for j in range(3):
        col = gradient_descent_mse_ensemble(setup["k_dd"], setup["k_td"], setup["y"][:, j],
                                            k_test_test=setup["k_tt"], t=[0.5, 3.0], ridge=0.05)
        for g in ("nngp", "ntk"):
            assert col[g]["mean"].shape == (2, N_TEST)
            torch.testing.assert_close(col[g]["mean"], out[g]["mean"][..., j], rtol=1e-12,
                                       atol=1e-14)
            torch.testing.assert_close(col[g]["cov"], out[g]["cov"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("t", [None, 0.7, [0.1, 5.0]])
def test_ntk_mean_is_kernel_regression(t):
    """The ensemble mean is telescope's kernel regression with the NTK (the same convention)."""
    setup = _setup(seed=7)
    out = _run(setup, t=t, lr=0.6, ridge=0.2, get="ntk", compute_cov=False)["ntk"]["mean"]
    ref = kernel_regression(setup["k_dd"]["ntk"], setup["k_td"]["ntk"], setup["y"], t=t,
                            lr=0.6, ridge=0.2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)


def test_singular_kernel_uses_pseudo_inverse():
    """Duplicate training points make K singular; t=None with ridge=0 projects on its range
    (the limit of gradient flow), which equals the weight-space minimum-norm solution."""
    setup = _setup(seed=8)
    idx = torch.tensor([0, 1, 2, 2, 3, 4])  # the third point twice, same target
    k_dd = {g: v[idx][:, idx] for g, v in setup["k_dd"].items()}
    k_td = {g: v[:, idx] for g, v in setup["k_td"].items()}
    y = setup["y"][idx]
    out = gradient_descent_mse_ensemble(k_dd, k_td, y, k_test_test=setup["k_tt"])
    rows = idx.numpy()
    for g, feats in (("nngp", setup["phi"]), ("ntk", setup["psi"])):
        k = setup["k"]
        te = setup["te"]
        mean, cov = _weight_space(feats[rows], feats[te], k[rows][:, rows], k[te][:, rows],
                                  k[te, te], y.numpy(), np.inf, 1.0)
        np.testing.assert_allclose(_np(out[g]["mean"]), mean, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(_np(out[g]["cov"]), cov, rtol=1e-7, atol=1e-9)


def test_dtype_follows_inputs():
    setup = _setup()
    f32 = {b: {g: v.float() for g, v in setup[b].items()} for b in ("k_dd", "k_td", "k_tt")}
    out = gradient_descent_mse_ensemble(f32["k_dd"], f32["k_td"], setup["y"].float(),
                                        k_test_test=f32["k_tt"], t=1.0)
    ref = _run(setup, t=1.0)
    for g in ("nngp", "ntk"):
        assert out[g]["mean"].dtype == torch.float32 and out[g]["cov"].dtype == torch.float32
        torch.testing.assert_close(out[g]["mean"].double(), ref[g]["mean"], rtol=1e-4,
                                   atol=1e-5)


# ----------------------------------------------------------------------------- GP inference


@pytest.mark.parametrize("noise", [0.0, 0.25])
def test_gp_inference_against_solve(noise):
    setup = _setup(seed=9, outputs=2)
    k, kt, kss = (setup[b]["nngp"] for b in ("k_dd", "k_td", "k_tt"))
    out = gp_inference(k, kt, setup["y"], k_test_test=kss, noise_variance=noise)
    kn = _np(k) + noise * np.eye(N_TRAIN)
    mean = _np(kt) @ np.linalg.solve(kn, setup["y_np"])
    cov = _np(kss) - _np(kt) @ np.linalg.solve(kn, _np(kt).T)
    np.testing.assert_allclose(_np(out["mean"]), mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(out["cov"]), cov, rtol=1e-10, atol=1e-12)
    # the converged NNGP ensemble with ridge = noise_variance is the same posterior
    ens = _run(setup, t=None, ridge=noise, get="nngp")["nngp"]
    torch.testing.assert_close(ens["mean"], out["mean"], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ens["cov"], out["cov"], rtol=1e-9, atol=1e-11)


def test_gp_inference_shapes_and_no_cov():
    setup = _setup(seed=10, outputs=None)
    out = gp_inference(setup["k_dd"]["nngp"], setup["k_td"]["nngp"], setup["y"])
    assert set(out) == {"mean"} and out["mean"].shape == (N_TEST,)


def test_gp_inference_singular_kernel_names_the_fix():
    x = torch.randn(5, 2, dtype=torch.float64)
    k = x @ x.T  # rank 2
    with pytest.raises(UsageError, match=r"not positive definite.*noise_variance > 0"):
        gp_inference(k, k[:2], torch.randn(5, dtype=torch.float64))
    out = gp_inference(k, k[:2], torch.randn(5, dtype=torch.float64), noise_variance=1e-3)
    assert torch.isfinite(out["mean"]).all()


def test_gp_inference_errors():
    k = torch.eye(3, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(UsageError, match=r"k_train_train\['nngp'\]"):
        gp_inference({"nngp": k, "ntk": k}, k, y)
    with pytest.raises(UsageError, match="columns"):
        gp_inference(k, torch.zeros(2, 4, dtype=torch.float64), y)
    with pytest.raises(UsageError, match="k_test_test"):
        gp_inference(k, k[:2], y, k_test_test=torch.eye(3, dtype=torch.float64))
    with pytest.raises(UsageError, match="noise_variance"):
        gp_inference(k, k[:2], y, noise_variance=-1.0)
    with pytest.raises(UsageError, match="y_train"):
        gp_inference(k, k[:2], torch.zeros(4))


# ----------------------------------------------------------------------------- errors


def test_ensemble_errors():
    setup = _setup()
    k_dd, k_td, y = setup["k_dd"], setup["k_td"], setup["y"]
    with pytest.raises(UsageError, match="k_test_test"):
        gradient_descent_mse_ensemble(k_dd, k_td, y)
    with pytest.raises(UsageError, match="get"):
        gradient_descent_mse_ensemble(k_dd, k_td, y, get="nngpp", compute_cov=False)
    with pytest.raises(UsageError, match=r"no 'nngp' kernel.*NTK covariance"):
        gradient_descent_mse_ensemble({"ntk": k_dd["ntk"]}, {"ntk": k_td["ntk"]}, y,
                                      k_test_test=setup["k_tt"], get="ntk")
    # the NTK mean alone needs no NNGP
    only = gradient_descent_mse_ensemble({"ntk": k_dd["ntk"]}, {"ntk": k_td["ntk"]}, y,
                                         get="ntk", compute_cov=False, t=1.0)
    assert set(only) == {"ntk"} and set(only["ntk"]) == {"mean"}
    with pytest.raises(UsageError, match="columns"):
        gradient_descent_mse_ensemble(k_dd, {g: v[:, :-1] for g, v in k_td.items()}, y,
                                      compute_cov=False)
    with pytest.raises(UsageError, match="y_train"):
        gradient_descent_mse_ensemble(k_dd, k_td, y[:-1], compute_cov=False)
    with pytest.raises(UsageError, match="t must be >= 0"):
        gradient_descent_mse_ensemble(k_dd, k_td, y, compute_cov=False, t=-1.0)
    with pytest.raises(UsageError, match="lr"):
        gradient_descent_mse_ensemble(k_dd, k_td, y, compute_cov=False, lr=0.0)
    with pytest.raises(UsageError, match="mapping"):
        gradient_descent_mse_ensemble(k_dd["nngp"], k_td, y, compute_cov=False)
    with pytest.raises(UsageError, match="k_test_test"):
        gradient_descent_mse_ensemble(k_dd, k_td, y, k_test_test={"nngp": torch.eye(2)})


# ----------------------------------------------------------------------------- neural-tangents


def test_matches_neural_tangents():
    """neural-tangents 0.6.5's gradient_descent_mse_ensemble and gp_inference on the fc_relu
    kernels (tests/fixtures/neural_tangents/README.md): one output, learning_rate=1, absolute
    diag_reg = ridge = noise_variance."""
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE} is missing (generated by tools/neural_tangents_refs.py)")
    ref = np.load(FIXTURE)
    blocks = {b: {g: torch.from_numpy(ref[f"k_{b}_{g}"]) for g in ("nngp", "ntk")}
              for b in ("train_train", "test_train", "test_test")}
    y = torch.from_numpy(ref["y_train"])
    lr = float(ref["learning_rate"])
    times = [None if np.isinf(t) else float(t) for t in ref["times"]]
    for di, diag_reg in enumerate(ref["diag_regs"]):
        for ti, t in enumerate(times):
            out = gradient_descent_mse_ensemble(
                blocks["train_train"], blocks["test_train"], y,
                k_test_test=blocks["test_test"], t=t, lr=lr, ridge=float(diag_reg))
            for g in ("nngp", "ntk"):
                np.testing.assert_allclose(_np(out[g]["mean"]), ref[f"mean_{g}_d{di}_t{ti}"],
                                           rtol=1e-10, atol=1e-12, err_msg=f"{g} d{di} t{ti}")
                np.testing.assert_allclose(_np(out[g]["cov"]), ref[f"cov_{g}_d{di}_t{ti}"],
                                           rtol=1e-10, atol=1e-12, err_msg=f"{g} d{di} t{ti}")
        # all times at once: the leading time axis
        out = gradient_descent_mse_ensemble(
            blocks["train_train"], blocks["test_train"], y, k_test_test=blocks["test_test"],
            t=ref["times"].tolist(), lr=lr, ridge=float(diag_reg))
        for ti in range(len(times)):
            np.testing.assert_allclose(_np(out["ntk"]["cov"][ti]), ref[f"cov_ntk_d{di}_t{ti}"],
                                       rtol=1e-10, atol=1e-12)
        gp = gp_inference(blocks["train_train"]["nngp"], blocks["test_train"]["nngp"], y,
                          k_test_test=blocks["test_test"]["nngp"],
                          noise_variance=float(diag_reg))
        np.testing.assert_allclose(_np(gp["mean"]), ref[f"gp_mean_d{di}"], rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(_np(gp["cov"]), ref[f"gp_cov_d{di}"], rtol=1e-10, atol=1e-12)
