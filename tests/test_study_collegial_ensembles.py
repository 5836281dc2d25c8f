"""The ``collegial-ensembles`` study: sweep and presets, a tiny run against a plain
re-implementation (per-example Jacobians, gradient descent in parameter space), the headline and
figures, the full preset with tiny overrides and the CLI end to end. Its two pieces of math are
library functions tested with their modules: ``kernel_descent`` in tests/test_regression.py,
``normalized_variance`` in tests/test_metrics.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from _oracles import oracle_jacobian

from telescope.cli import main
from telescope.studies import collegial_ensembles as ce
from telescope.studies import get_study, make_config
from telescope.studies._binary import load_binary_task
from telescope.train import Progress, log_spaced_steps

TINY = {"widths": "4,16", "budget_width": "16", "data.n_train": "24", "data.n_test": "30",
        "kernel_points": "8", "kernel_draws": "3", "steps": "12", "evals": "3", "seeds": "1"}


def _config(preset: str = "quick", **extra: str):
    return make_config(get_study("collegial-ensembles"), preset, {**TINY, **extra})


def test_points_and_presets():
    study = get_study("collegial_ensembles")
    quick = make_config(study, "quick", {})
    pts = ce.points(quick)
    assert len(pts) == 6 * quick.seeds
    assert pts[0] == {"width": 4, "seed": 0}
    d = 40  # MNIST-1D
    assert ce.budget(quick, d) == 40 * 128 + 128 * 128 + 128
    assert [ce.members(quick, d, w) for w in quick.widths] == [120, 55, 24, 9, 3, 1]
    full = make_config(study, "full", {})
    assert full.device == "auto" and full.seeds == 5 and full.depth == 3
    assert ce.members(full, d, 512) == 1 and ce.members(full, d, 4) > 1000
    with pytest.raises(ValueError, match="every width must be <= budget_width"):
        make_config(study, "quick", {"widths": "8,256"})
    with pytest.raises(ValueError, match="widths must not repeat"):
        make_config(study, "quick", {"widths": "8,8"})
    with pytest.raises(ValueError, match=r"kernel_points \(300\) must be <= data.n_train"):
        make_config(study, "quick", {"kernel_points": "300"})
    with pytest.raises(ValueError, match="kernel_draws must be >= 2"):
        make_config(study, "quick", {"kernel_draws": "1"})


# --------------------------------------------------------------------------- a tiny run


def _run(config):
    rows = []
    for point in ce.points(config):
        rows += ce.run_point(config, point, Progress())
    return pd.DataFrame(rows)


def _replay(config, width: int, seed: int) -> pd.DataFrame:
    """The training part by hand: the same initialization, gradient descent in a plain loop,
    and the linearization trained by gradient descent in parameter space with per-example
    Jacobians from plain autograd loops (``_oracles.oracle_jacobian``)."""
    data = load_binary_task(config.data, dtype=torch.float64)
    x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test
    m = ce.members(config, x.shape[1], width)
    model = ce._build(config, x.shape[1], width, m, ce._init_seed(seed, 0, 0),
                      torch.device("cpu"))
    with torch.no_grad():
        f0, f0t = model(x), model(xt)
    j, jt = oracle_jacobian(model, x)[:, 0], oracle_jacobian(model, xt)[:, 0]  # [N, P]
    psi = torch.zeros(j.shape[1], dtype=torch.float64)
    params = list(model.parameters())
    rows, lr, n = [], config.lr, x.shape[0]
    eval_at = log_spaced_steps(config.steps, config.evals, zero=True)
    for step in range(config.steps + 1):
        if step in eval_at:
            with torch.no_grad():
                f = model(xt)
            lin = f0t + (jt @ psi).unsqueeze(1)
            rows.append({"step": step, "test_error": float(((f > 0) != (yt > 0)).double().mean()),
                         "kernel_test_error": float(((lin > 0) != (yt > 0)).double().mean()),
                         "gap": float((f - lin).norm() / (lin - f0t).norm()) if step else math.nan})
        r = (f0 + (j @ psi).unsqueeze(1) - y).squeeze(1)
        psi = psi - (lr / n) * (j.T @ r)
        loss = 0.5 * ((model(x) - y) ** 2).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, gr in zip(params, grads, strict=True):
                p -= lr * gr
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tiny_run():
    config = _config()
    return config, _run(config)


def test_runs_tiny_and_matches_a_plain_replay(tiny_run):
    config, df = tiny_run
    kern, train = df[df["kind"] == "kernel"], df[df["kind"] == "train"]
    assert len(kern) == 2 and len(train) == 2 * len(log_spaced_steps(12, 3, zero=True))
    ens = kern.set_index("width")
    assert int(ens.loc[4, "members"]) == ce.members(config, 40, 4) > 1
    assert int(ens.loc[16, "members"]) == 1
    assert (kern["n_params"] <= 1.5 * kern["budget"]).all()
    # with more members the kernel over initializations varies less than one member's
    assert ens.loc[4, "var_ensemble"] < ens.loc[4, "var_member"]
    assert np.isfinite(kern[["law_ratio", "bias_ensemble", "dist_wide",
                             "infinite_test_error"]].to_numpy()).all()
    assert train[train["step"] == 0]["gap"].isna().all()
    assert (train[train["step"] > 0]["gap"] > 0).all()
    for width in (4, 16):
        ref = _replay(config, width, 0)
        got = train[train["width"] == width].set_index("step").loc[ref["step"]]
        for col in ("test_error", "kernel_test_error", "gap"):
            np.testing.assert_allclose(got[col].to_numpy(), ref[col].to_numpy(), rtol=1e-6,
                                       atol=1e-9, err_msg=f"width {width} {col}")


def test_headline_and_figures(tiny_run, tmp_path):
    config, df = tiny_run
    df = pd.concat([df, df.assign(seed=1)], ignore_index=True)   # two seeds for the spreads
    h = ce.headline(df, config)
    assert h["parameter budget"] == ce.budget(config, 40) and h["seeds"] == 2
    assert h["members by width"] == f"w 4: m {ce.members(config, 40, 4)}, w 16: m 1"
    kern = df[df["kind"] == "kernel"].set_index("width")
    assert h["NTK variance, widest (width 16, m 1)"] == pytest.approx(
        float(kern.loc[16, "var_ensemble"].mean()))
    assert h["step T of the training numbers below"] == 12
    assert h["seeds where the best width has the lower test error"] in ("0 of 2", "2 of 2") or (
        h["width with the lowest test error"] == 16)
    assert len(h["answer"]) > 120
    names = [p.name for p in ce.figures(df, config, tmp_path)]
    assert names == ["collegial_ensembles_kernel.png", "collegial_ensembles_training.png"]
    assert all((tmp_path / n).with_suffix(".svg").stat().st_size > 0 for n in names)
    # a partial run: kernels only, no training rows
    assert "answer" not in ce.headline(df[df["kind"] == "kernel"], config)
    ce.figures(df[df["kind"] == "kernel"], config, tmp_path)


def test_mean_normalization_runs_with_a_scaled_learning_rate():
    config = _config(normalization="mean", widths="4")
    df = _run(config)
    kern = df[df["kind"] == "kernel"].iloc[0]
    # on a member's scale the mean kernel does not depend on the normalization
    assert 0 < kern["bias_ensemble"] < 1
    assert df[(df["kind"] == "train") & (df["step"] == 12)]["gap"].iloc[0] < 0.5


def test_full_preset_runs_with_tiny_overrides():
    config = _config("full", device="cpu", depth="3")
    rows = ce.run_point(config, ce.points(config)[0], Progress())
    assert rows[0]["kind"] == "kernel" and rows[-1]["step"] == 12


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "ce"
    args = ["study", "collegial-ensembles", "--preset", "quick", "--out", str(out),
            "--no-progress", "--set", *[f"{k}={v}" for k, v in TINY.items()]]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["width"]) == {4, 16}
    assert (out / "collegial_ensembles_kernel.png").stat().st_size > 0
    assert "variance ratio widest / lowest" in (out / "report.html").read_text()
