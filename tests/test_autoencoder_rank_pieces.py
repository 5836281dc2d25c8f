"""The library pieces of the ``autoencoder-rank`` study, each against an independent oracle:

- :func:`telescope.data.low_rank_data` / :func:`singular_value_profile`: NumPy's SVD of the
  data against the requested profile (written with ``np.geomspace`` / ``np.linspace``);
- :class:`telescope.models.LinearBottleneckAutoencoder`: its initializations, hook points and
  end-to-end matrix; the learning-rate adjustment against the gradient of the loss as a
  function of the product ``P`` itself; a trained linear autoencoder against the closed form
  (the top-``k`` principal projection, Baldi & Hornik 1989);
- :class:`telescope.lens.CodeRank`: NumPy's SVD of codes computed from the weights by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from telescope.data import low_rank_data, singular_value_profile
from telescope.errors import UsageError
from telescope.lens import CodeRank, code_ranks, code_spectrum
from telescope.models import LinearBottleneckAutoencoder
from telescope.models.hooks import run_with_cache
from telescope.train import fit

# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("rank, kappa", [(4, 8.0), (6, 30.0), (2, 1.5)])
def test_profiles_match_closed_forms(rank, kappa):
    np.testing.assert_allclose(singular_value_profile(rank, "geometric", condition=kappa),
                               np.geomspace(1.0, 1.0 / kappa, rank), rtol=1e-12)
    np.testing.assert_allclose(singular_value_profile(rank, "linear", condition=kappa),
                               np.linspace(1.0, 1.0 / kappa, rank), rtol=1e-12)
    power = singular_value_profile(rank, "power", condition=kappa).numpy()
    k = np.arange(1, rank + 1)
    slope = np.polyfit(np.log(k), np.log(power), 1)[0]   # a straight line in log-log
    assert slope == pytest.approx(-math.log(kappa) / math.log(rank), rel=1e-10)
    assert power[0] == pytest.approx(1.0) and power[-1] == pytest.approx(1.0 / kappa)
    np.testing.assert_array_equal(singular_value_profile(rank, "flat", condition=kappa),
                                  np.ones(rank))


@pytest.mark.parametrize("profile", ["geometric", "linear", "power", "flat"])
def test_low_rank_data_has_the_requested_singular_values(profile):
    n, d, r = 40, 9, 4
    ds = low_rank_data(n, 7, d, r, profile=profile, condition=5.0, seed=3,
                       dtype=torch.float64)
    x = ds.x_train.numpy()
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    want = singular_value_profile(r, profile, condition=5.0).numpy()
    np.testing.assert_allclose(s[:r] / math.sqrt(n), want, rtol=1e-10)
    assert s[r:].max() < 1e-10 * s[0]                           # exactly rank r
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-12)  # centered
    v = ds.meta["components"].numpy()
    np.testing.assert_allclose(v.T @ v, np.eye(r), atol=1e-12)
    # the data's principal subspace is span(V): same projector
    np.testing.assert_allclose(vt[:r].T @ vt[:r], v @ v.T, atol=1e-9)
    z = ds.meta["latents_train"].numpy()
    np.testing.assert_allclose(z.T @ z / n, np.eye(r), atol=1e-12)
    assert torch.equal(ds.x_train, ds.y_train) and ds.x_test.shape == (7, d)
    assert ds.y_train.data_ptr() != ds.x_train.data_ptr()
    if profile != "flat":
        # distinct singular values: each right singular vector is a column of V (up to sign)
        np.testing.assert_allclose(np.abs(np.sum(vt[:r].T * v, axis=0)), 1.0, atol=1e-9)


def test_low_rank_data_test_set_and_noise_and_seeds():
    s = [2.0, 1.0, 0.5]
    ds = low_rank_data(10, 20000, 6, None, singular_values=[0.5, 2.0, 1.0], seed=1,
                       dtype=torch.float64)
    np.testing.assert_array_equal(ds.meta["singular_values"], s)
    v = ds.meta["components"].numpy()
    cov = ds.x_test.numpy().T @ ds.x_test.numpy() / 20000
    np.testing.assert_allclose(cov, v @ np.diag(np.square(s)) @ v.T, atol=0.08)
    same = low_rank_data(10, 5, 6, None, singular_values=s, seed=1, dtype=torch.float64)
    assert torch.equal(same.x_train, ds.x_train)
    other = low_rank_data(10, 5, 6, None, singular_values=s, seed=2, dtype=torch.float64)
    assert not torch.allclose(other.x_train, ds.x_train)
    noisy = low_rank_data(10, 5, 6, None, singular_values=s, seed=1, noise=0.1,
                          dtype=torch.float64)
    resid = (noisy.x_train - ds.x_train).numpy()
    assert 0.05 < resid.std() < 0.2
    assert np.linalg.svd(noisy.x_train.numpy(), compute_uv=False)[3] > 1e-3   # full rank now


def test_low_rank_data_errors():
    with pytest.raises(UsageError, match="must be > the rank"):
        low_rank_data(4, 0, 8, 4)
    with pytest.raises(UsageError, match="must be >= the rank"):
        low_rank_data(20, 0, 3, 4)
    with pytest.raises(UsageError, match="profile"):
        low_rank_data(20, 0, 8, 4, profile="cubic")
    with pytest.raises(UsageError, match="condition"):
        singular_value_profile(4, condition=0.5)
    with pytest.raises(UsageError, match="disagrees"):
        low_rank_data(20, 0, 8, 3, singular_values=[1.0, 0.5])
    with pytest.raises(UsageError, match="singular_values"):
        low_rank_data(20, 0, 8, None, singular_values=[1.0, -0.5])


# --------------------------------------------------------------------------- model


def _model(depth=3, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return LinearBottleneckAutoencoder(6, 5, depth, **kw).double()


def test_model_is_the_product_of_its_matrices():
    model = _model(3, init="gaussian", io_scale=0.7)
    x = torch.randn(11, 6, dtype=torch.float64)
    e = model.encoder[0].weight.detach().numpy()
    ws = [lin.weight.detach().numpy() for lin in model.linear]
    dmat = model.decoder[0].weight.detach().numpy()
    codes = x.numpy() @ e.T @ ws[0].T @ ws[1].T @ ws[2].T
    out, cache = run_with_cache(model, x)
    np.testing.assert_allclose(cache["hook_code"].numpy(), codes, rtol=1e-12)
    np.testing.assert_allclose(cache["hook_encoded"].numpy(), x.numpy() @ e.T, rtol=1e-12)
    np.testing.assert_allclose(out.detach().numpy(), codes @ dmat.T, rtol=1e-12)
    m = model.end_to_end().detach().numpy()
    np.testing.assert_allclose(m, dmat @ ws[2] @ ws[1] @ ws[0] @ e, rtol=1e-12)
    np.testing.assert_allclose(model.encode(x).detach().numpy(), codes, rtol=1e-12)
    plain = _model(0)
    _, cache = run_with_cache(plain, x)
    assert torch.equal(cache["hook_code"], cache["hook_encoded"])
    assert torch.equal(plain.linear_product(), torch.eye(5, dtype=torch.float64))


def test_initializations():
    for s in (1.0, 0.6):
        model = _model(4, init="orthogonal", init_scale=s)
        for lin in model.linear:
            w = lin.weight.detach()
            # built in float32, then cast: orthogonal to float32 precision
            torch.testing.assert_close(w @ w.T, s * s * torch.eye(5, dtype=torch.float64),
                                       atol=1e-6, rtol=0)
        p = model.linear_product().detach()
        torch.testing.assert_close(p @ p.T, s ** 8 * torch.eye(5, dtype=torch.float64),
                                   atol=1e-6, rtol=0)
    wide = LinearBottleneckAutoencoder(4, 128, 2, init="gaussian", init_scale=0.5,
                                       generator=torch.Generator().manual_seed(1))
    w = torch.cat([lin.weight.detach().flatten() for lin in wide.linear])
    assert float(w.var()) == pytest.approx(0.25 / 128, rel=0.05)      # 32768 draws
    assert abs(float(w.mean())) < 3 * 0.5 / math.sqrt(128 * 32768)
    default = LinearBottleneckAutoencoder(4, 128, 2, init="default",
                                          generator=torch.Generator().manual_seed(1))
    w = torch.cat([lin.weight.detach().flatten() for lin in default.linear])
    assert float(w.abs().max()) <= 1 / math.sqrt(128)                # U(-1/sqrt(c), 1/sqrt(c))
    assert float(w.var()) == pytest.approx(1 / (3 * 128), rel=0.05)
    assert default.factor_scale == pytest.approx(1 / math.sqrt(3))
    e = wide.encoder[0].weight.detach()
    assert float(e.std()) == pytest.approx(1 / math.sqrt(4), rel=0.05)  # io_scale 1, fan_in 4


def test_encoder_and_decoder_do_not_depend_on_depth_or_init():
    """For one generator seed the encoder and decoder are drawn first: a paired comparison."""
    ref = _model(0, io_scale=0.1)
    for depth, init in ((2, "gaussian"), (5, "orthogonal"), (1, "default")):
        other = _model(depth, init=init, io_scale=0.1)
        assert torch.equal(other.encoder[0].weight, ref.encoder[0].weight)
        assert torch.equal(other.decoder[0].weight, ref.decoder[0].weight)


def test_nonlinear_model():
    model = LinearBottleneckAutoencoder(6, 5, 2, nonlinear=True, hidden=(7, 3),
                                        activation="tanh",
                                        generator=torch.Generator().manual_seed(0))
    x = torch.randn(9, 6)
    out, cache = run_with_cache(model, x)
    assert out.shape == (9, 6) and cache["hook_code"].shape == (9, 5)
    assert [m.out_features for m in model.encoder if isinstance(m, torch.nn.Linear)] == [7, 3, 5]
    assert [m.out_features for m in model.decoder if isinstance(m, torch.nn.Linear)] == [3, 7, 6]
    torch.testing.assert_close(model.decode(model.encode(x)), out)
    with pytest.raises(UsageError, match="nonlinear=True"):
        model.end_to_end()


@pytest.mark.parametrize("kwargs, match", [
    ({"init": "xavier"}, "init must be one of"),
    ({"init_scale": 0.0}, "init_scale"),
    ({"io_scale": math.inf}, "io_scale"),
    ({"activation": "softplus"}, "activation"),
    ({"nonlinear": True, "hidden": ()}, "hidden"),
])
def test_model_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        LinearBottleneckAutoencoder(6, 5, 2, **kwargs)
    with pytest.raises(UsageError, match="depth"):
        LinearBottleneckAutoencoder(6, 5, -1)


def _product_step(model, x, lr, adjust):
    """``(P after one SGD step - P before, the gradient of the loss with respect to P)``."""
    p0 = model.linear_product().detach().clone()
    leaf = p0.clone().requires_grad_(True)
    e, d = model.encoder[0].weight.detach(), model.decoder[0].weight.detach()
    F.mse_loss(x @ e.T @ leaf.T @ d.T, x).backward()
    opt = torch.optim.SGD(model.param_groups(lr, adjust_lr=adjust))
    opt.zero_grad()
    F.mse_loss(model(x), x).backward()
    opt.step()
    return model.linear_product().detach() - p0, leaf.grad


@pytest.mark.parametrize("depth, scale", [(1, 1.0), (4, 1.0), (6, 0.8)])
def test_adjusted_learning_rate_moves_the_product_like_one_matrix(depth, scale):
    """At an orthogonal init, each factor at ``lr / (L s^(2(L-1)))`` moves ``P`` by ``-lr G``
    to first order (``G = dloss/dP``); without the adjustment by ``-L s^(2(L-1)) lr G``."""
    x = torch.randn(30, 6, dtype=torch.float64)
    lr = 1e-4
    delta, g = _product_step(_model(depth, init="orthogonal", init_scale=scale), x, lr, True)
    assert float((delta + lr * g).norm() / (lr * g).norm()) < 1e-3
    delta, g = _product_step(_model(depth, init="orthogonal", init_scale=scale), x, lr, False)
    factor = depth * scale ** (2 * (depth - 1))
    assert float((delta + factor * lr * g).norm() / (factor * lr * g).norm()) < 1e-3
    groups = _model(depth, init="orthogonal", init_scale=scale).param_groups(0.3)
    assert [gr["lr"] for gr in groups] == pytest.approx([0.3, 0.3 / factor])


def test_adjustment_is_not_exact_for_gaussian_factors():
    """The identity needs orthogonal factors: Gaussian ones of the same scale miss it (so the
    test above can fail)."""
    x = torch.randn(30, 6, dtype=torch.float64)
    delta, g = _product_step(_model(4, init="gaussian"), x, 1e-4, True)
    assert float((delta + 1e-4 * g).norm() / (1e-4 * g).norm()) > 0.2


@pytest.mark.parametrize("code_dim", [2, 4])
def test_trained_linear_autoencoder_is_the_principal_projection(code_dim):
    """Gradient descent on a linear autoencoder with ``code_dim = k`` converges to the
    projection onto the top-``k`` principal directions (on the data's subspace)."""
    ds = low_rank_data(50, 0, 6, None, singular_values=[1.0, 0.8, 0.35, 0.3], seed=0,
                       dtype=torch.float64)
    model = LinearBottleneckAutoencoder(6, code_dim, 2, init="orthogonal", io_scale=0.5,
                                        generator=torch.Generator().manual_seed(0)).double()
    opt = torch.optim.SGD(model.param_groups(1.0))
    fit(model, opt, ds.x_train, ds.x_train, steps=2000)
    v = ds.meta["components"]
    u, _, _ = np.linalg.svd(ds.x_train.numpy().T, full_matrices=False)   # PCA by NumPy
    proj = u[:, :code_dim] @ u[:, :code_dim].T
    m = model.end_to_end().detach().numpy()
    np.testing.assert_allclose(m @ v.numpy(), proj @ v.numpy(), atol=1e-6)


# --------------------------------------------------------------------------- lens


def _numpy_ranks(z: np.ndarray, rtol: float, center: bool = True) -> dict:
    if center:
        z = z - z.mean(axis=0)
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return {"s": s, "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
            "numerical_rank": int(np.sum(s > rtol * s[0])),
            "stable_rank": float(np.sum(s ** 2) / s[0] ** 2)}


def test_code_rank_matches_numpy_svd():
    model = _model(2, init="gaussian", io_scale=1.0, bias=True)
    with torch.no_grad():
        model.encoder[0].bias.normal_()      # codes with a mean: centering matters
    x = torch.randn(13, 6, dtype=torch.float64)
    e, b = model.encoder[0].weight.detach().numpy(), model.encoder[0].bias.detach().numpy()
    w1, w2 = (lin.weight.detach().numpy() for lin in model.linear)
    z = (x.numpy() @ e.T + b) @ w1.T @ w2.T
    for center in (True, False):
        want = _numpy_ranks(z, 0.2, center)
        lens = CodeRank(model, x, rtol=0.2, center=center, n_values=3)
        got = lens.measure()
        np.testing.assert_allclose(lens.singular_values().numpy(), want["s"], rtol=1e-10)
        assert got["code_effective_rank"] == pytest.approx(want["effective_rank"], rel=1e-10)
        assert got["code_numerical_rank"] == want["numerical_rank"]
        assert got["code_stable_rank"] == pytest.approx(want["stable_rank"], rel=1e-10)
        assert [got[f"code_sv_{i}"] for i in (1, 2, 3)] == pytest.approx(list(want["s"][:3]))
        assert "code_sv_4" not in got and got["code_sv_max"] == pytest.approx(want["s"][0])
    centered = _numpy_ranks(z, 0.2, True)["s"]
    assert not np.allclose(centered, _numpy_ranks(z, 0.2, False)["s"])


def test_code_ranks_properties():
    eye = code_spectrum(torch.eye(5)[:, :3] * 2.0, center=False)
    r = code_ranks(eye)
    assert r["effective_rank"] == pytest.approx(3.0) and r["numerical_rank"] == 3
    assert r["stable_rank"] == pytest.approx(3.0)
    zero = code_ranks(torch.zeros(4))
    assert zero == {"effective_rank": 0.0, "numerical_rank": 0, "stable_rank": 0.0,
                    "sv_max": 0.0}
    s = torch.tensor([1.0, 0.5, 0.01])
    assert code_ranks(s, rtol=0.1)["numerical_rank"] == 2
    assert code_ranks(s, rtol=0.0, atol=0.6)["numerical_rank"] == 1
    with pytest.raises(UsageError, match="rtol"):
        code_ranks(s, rtol=1.0)
    with pytest.raises(UsageError, match="NaN"):
        code_spectrum(torch.tensor([[1.0, math.nan]]))


def test_code_rank_as_fit_callback_and_errors():
    ds = low_rank_data(40, 0, 6, 3, seed=0)
    model = LinearBottleneckAutoencoder(6, 5, 2, init="orthogonal", io_scale=0.1,
                                        generator=torch.Generator().manual_seed(0))
    lens = CodeRank(model, ds.x_train, rtol=0.05, prefix="z_")
    opt = torch.optim.SGD(model.param_groups(2.0))
    history = fit(model, opt, ds.x_train, ds.x_train, steps=20, eval_at=[0, 10, 20],
                  callbacks=[lens])
    assert [row["step"] for row in history.rows] == [0, 10, 20]
    assert all({"z_effective_rank", "z_numerical_rank", "z_sv_5"} <= set(row)
               for row in history.rows)
    assert [step for step, _ in lens.spectra] == [0, 10, 20]
    # the last measurement equals a fresh SVD of the trained model's codes
    final = model.encode(ds.x_train).detach().double().numpy()
    np.testing.assert_allclose(lens.spectra[-1][1].numpy(),
                               _numpy_ranks(final, 0.05)["s"], rtol=1e-5)
    with pytest.raises(UsageError, match="no hook point named 'hook_z'"):
        CodeRank(model, ds.x_train, hook="hook_z")
    with pytest.raises(UsageError, match="n_values"):
        CodeRank(model, ds.x_train, n_values=-1)
    with pytest.raises(UsageError, match="model"):
        CodeRank("model", ds.x_train)
