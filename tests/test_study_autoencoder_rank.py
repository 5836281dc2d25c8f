"""The ``autoencoder-rank`` study: sweep, presets and config checks; one point against a plain
re-implementation (explicit matrices, hand-written gradient descent with the per-factor
rates); the greedy order on a small run; the analysis and headline on a synthetic table; the
CLI end to end."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from telescope.cli import main
from telescope.data import low_rank_data
from telescope.studies import autoencoder_rank as ar
from telescope.studies import get_study, make_config
from telescope.train import Progress, log_spaced_steps

TINY = {"seeds": "1", "steps": "60", "evals": "6", "depths": "0,2", "nonlinear.steps": "30",
        "data.n_train": "40", "data.d": "8", "code_dim": "6", "lr": "1.0"}


def _config(preset: str = "quick", **extra: str):
    return make_config(get_study("autoencoder-rank"), preset, {**TINY, **extra})


def test_points_presets_and_checks():
    study = get_study("autoencoder_rank")
    quick = make_config(study, "quick", {})
    pts = ar.points(quick)
    lin = [p for p in pts if p["case"] == "linear"]
    # per profile and seed: plain once at depth 0, then every method at depths 1, 2, 4, 8
    assert len(lin) == 2 * (1 + 4 * 4) * quick.seeds
    assert [p["method"] for p in lin if p["depth"] == 0] == ["plain"] * 2 * quick.seeds
    assert len(pts) - len(lin) == (1 + 2) * quick.seeds
    assert len({tuple(sorted(p.items())) for p in pts}) == len(pts)
    full = make_config(study, "full", {})
    assert full.steps > quick.steps and full.seeds >= quick.seeds
    assert set(full.methods) >= {"default", "orthogonal+lr", "orthogonal", "gaussian"}
    assert set(quick.methods) == {"default", "gaussian", "orthogonal", "orthogonal+lr"}
    only = make_config(study, "quick", {"nonlinear.depths": "", "seeds": "1",
                                        "profiles": "geometric", "depths": "2",
                                        "methods": "gaussian+lr"})
    assert ar.points(only) == [{"case": "linear", "profile": "geometric",
                                "method": "gaussian+lr", "depth": 2, "seed": 0}]
    for key, value, match in (("methods", "orthogonal+adam", "not a method"),
                              ("methods", "xavier", "not a method"),
                              ("profiles", "cubic", "profiles"),
                              ("depths", "2,2", "repeat"),
                              ("code_dim", "2", "code_dim"),
                              ("rank_rtol", "1", "rank_rtol"),
                              ("nonlinear.profile", "steep", "nonlinear.profile")):
        with pytest.raises(ValueError, match=match):
            make_config(study, "quick", {key: value})


def _replay(config, point) -> list[dict]:
    """The point by hand: the same data and initial weights, then full-batch gradient descent
    on explicit matrices, each factor at ``lr / (L s^(2(L-1)))`` for ``+lr``."""
    d, depth = config.data, point["depth"]
    ds = low_rank_data(d.n_train, 0, d.d, d.rank, profile=point["profile"],
                       condition=d.condition, seed=point["seed"], dtype=torch.float32)
    init, adjust = ar._parse_method(point["method"])
    model = ar.LinearBottleneckAutoencoder(d.d, config.code_dim, depth, init=init,
                                           io_scale=config.io_scale,
                                           generator=torch.Generator().manual_seed(
                                               point["seed"]))
    x = ds.x_train
    mats = [model.encoder[0].weight.detach().clone()]
    mats += [lin.weight.detach().clone() for lin in model.linear]
    mats.append(model.decoder[0].weight.detach().clone())
    mats = [m.requires_grad_(True) for m in mats]
    scale = 1.0 / math.sqrt(3.0) if init == "default" else 1.0
    lr_factor = config.lr / (depth * scale ** (2 * (depth - 1))) if adjust and depth else config.lr
    rates = [config.lr] + [lr_factor] * depth + [config.lr]
    v = ds.meta["components"]
    measured = set(log_spaced_steps(config.steps, config.evals, zero=True))
    rows = []
    for step in range(config.steps + 1):
        codes = x @ mats[0].T
        for w in mats[1:-1]:
            codes = codes @ w.T
        x_hat = codes @ mats[-1].T
        loss = ((x_hat - x) ** 2).mean()
        if step in measured:
            xv = (x @ v.float()).double().numpy()
            hv = (x_hat @ v.float()).detach().double().numpy()
            gain, *_ = np.linalg.lstsq(xv, hv, rcond=None)      # xv @ gain ~ hv
            z = codes.detach().double().numpy()
            s = np.linalg.svd(z - z.mean(0), compute_uv=False)
            rows.append({"step": step, "gains": np.diag(gain),
                         "rank": int((np.linalg.svd(gain, compute_uv=False) > 0.5).sum()),
                         "s": s})
        grads = torch.autograd.grad(loss, mats)
        with torch.no_grad():
            for m, g, rate in zip(mats, grads, rates, strict=True):
                m -= rate * g
    return rows


@pytest.mark.parametrize("method, depth", [("orthogonal+lr", 2), ("default", 2),
                                           ("plain", 0)])
def test_run_point_against_replay(method, depth):
    config = _config()
    point = {"case": "linear", "profile": "geometric", "method": method, "depth": depth,
             "seed": 0}
    rows = ar.run_point(config, point, Progress())
    replay = _replay(config, point)
    assert [r["step"] for r in rows] == [r["step"] for r in replay]
    for got, want in zip(rows, replay, strict=True):
        assert got["case"] == "linear" and got["method"] == method
        gains = [got[f"gain_{k}"] for k in range(1, 5)]
        np.testing.assert_allclose(gains, want["gains"], rtol=2e-3, atol=1e-5)
        assert got["learned_rank"] == want["rank"]
        sv = [got[f"code_sv_{i}"] for i in range(1, config.code_dim + 1)]
        np.testing.assert_allclose(sv[:4], want["s"][:4], rtol=2e-3)
        assert got["code_numerical_rank"] == int((want["s"] > 0.05 * want["s"][0]).sum())
    assert not math.isnan(rows[-1]["seconds"]) and math.isnan(rows[0]["seconds"])
    assert not rows[-1]["diverged"] and rows[-1]["step"] == config.steps
    assert all(r["pca_distance"] >= 0 for r in rows)


def test_greedy_order_and_closed_form_on_a_small_run():
    """C1 on a run small enough for a test: the four modes of a geometric prior are learned at
    increasing steps, and at the end the map is the rank-r projection (pca_distance ~ 0)."""
    config = _config(steps="1500", evals="30", lr="2", **{"data.d": "12", "code_dim": "8"})
    point = {"case": "linear", "profile": "geometric", "method": "orthogonal+lr", "depth": 2,
             "seed": 0}
    runs = ar.mode_steps(pd.DataFrame(ar.run_point(config, point, Progress())), config)
    (run,) = runs.to_dict("records")
    steps = [run[f"t_{k}"] for k in range(1, 5)]
    assert not any(math.isnan(s) for s in steps)
    assert steps == sorted(steps) and len(set(steps)) == 4 and run["strict_order"]
    assert run["final_learned_rank"] == 4 and run["final_pca_distance"] < 1e-3
    assert run["final_code_rank"] == 4


def test_nonlinear_point_runs():
    config = _config()
    point = {"case": "nonlinear", "profile": "geometric", "method": "orthogonal+lr",
             "depth": 4, "seed": 0}
    rows = ar.run_point(config, point, Progress())
    assert len(rows) == len(log_spaced_steps(30, 6, zero=True))
    assert all(math.isnan(r["pca_distance"]) for r in rows)
    assert {"code_effective_rank", "gain_4", "learned_rank"} <= set(rows[-1])


def _synthetic(config) -> pd.DataFrame:
    """Runs with known learning steps: gains switch from 0 to 1 at the given steps."""
    grid = [0, 1, 10, 100, 1000]
    learn = {("geometric", "plain", 0): (1, 10, 100, 1000),
             ("geometric", "default", 2): (10, 100, 1000, None),
             ("geometric", "orthogonal+lr", 2): (1, 10, 100, 1000),
             ("flat", "plain", 0): (1, 1, 1, 1),
             ("flat", "default", 2): (10, 10, 10, 10),
             ("flat", "orthogonal+lr", 2): (1, 1, 1, 1),
             ("geometric", "gaussian", 2): (1, 1, 1, 1)}
    rows = []
    for seed in (0, 1):
        for (profile, method, depth), ts in learn.items():
            diverged = method == "gaussian"      # its last rows are garbage: never counted
            if seed == 1 and method == "default" and profile == "geometric":
                ts = (10, 100, None, None)
            for step in grid:
                gains = [1.0 if t is not None and step >= t else 0.0 for t in ts]
                rank = sum(g > 0.5 for g in gains)
                rows.append({"case": "linear", "profile": profile, "method": method,
                             "depth": depth, "seed": seed, "step": step,
                             **{f"gain_{k + 1}": g for k, g in enumerate(gains)},
                             "learned_rank": rank, "code_numerical_rank": max(rank, 1),
                             "code_effective_rank": float(max(rank, 1)),
                             "pca_distance": 0.5 * (4 - rank) + 1e-6 + 9 * diverged,
                             "diverged": diverged,
                             **{f"code_sv_{i}": 1.0 / i for i in range(1, 7)}})
    return pd.DataFrame(rows)


def test_mode_steps_and_headline_on_synthetic_frame(tmp_path):
    config = _config(steps="1000")
    df = _synthetic(config)
    runs = ar.mode_steps(df, config)
    g = runs[(runs["method"] == "default") & (runs["profile"] == "geometric")]
    assert g["t_1"].tolist() == [10.0, 10.0] and math.isnan(g["t_4"].iloc[0])
    assert g["final_learned_rank"].tolist() == [3, 2]
    assert runs["in_order"].all()
    assert not runs.loc[runs["profile"] == "flat", "strict_order"].any()
    h = ar.headline(df, config)
    assert h["true latent rank"] == 4
    assert h["geometric/default: final learned rank by depth"] == "L=0: 4, L=2: 2-3"
    assert h["geometric/default: runs (L > 0) reaching rank 4"] == "0 of 2"
    assert h["geometric/orthogonal+lr: runs (L > 0) reaching rank 4"] == "2 of 2"
    assert h["geometric/default: step the learned rank reaches 4, L=2 -> L=2"] == (
        "never -> never")
    assert h["geometric/orthogonal+lr: step the learned rank reaches 4, L=2 -> L=2"] == (
        "1000 -> 1000")
    assert h["flat/default: step the learned rank reaches 4, L=2 -> L=2"] == "10 -> 10"
    assert h["geometric/orthogonal+lr: mode steps t_1..t_4, L=2 | L=2"] == (
        "1, 10, 100, 1000 | 1, 10, 100, 1000")
    # seed 1 never learns mode 3: the median of (1000, never) is never
    assert h["geometric/default: mode steps t_1..t_4, L=2 | L=2"] == (
        "10, 100, never, never | 10, 100, never, never")
    assert "flat/default: mode steps t_1..t_4, L=2 | L=2" not in h
    assert h["geometric/gaussian: final learned rank by depth"] == "L=0: 4, L=2: - (2 diverged)"
    assert h["geometric/gaussian: runs (L > 0) reaching rank 4"] == "0 of 2"
    assert h["geometric/gaussian: diverged runs"] == 2
    assert h["runs (decaying priors, >= 2 modes learned) learning modes in order of s_k"] == (
        "6 of 6")
    assert h["geometric/orthogonal+lr: runs (L > 0) converged to the rank-4 projection"] == (
        "2 of 2")
    assert h["geometric/orthogonal+lr: pca_distance at L=2 (median)"] == pytest.approx(1e-6)
    assert h["geometric/default: runs (L > 0) converged to the rank-4 projection"] == "0 of 2"
    assert h["geometric/gaussian: runs (L > 0) converged to the rank-4 projection"] == "0 of 2"
    assert "geometric/gaussian: pca_distance at L=2 (median)" not in h
    assert h["seeds"] == 2 and "0 of 2 runs" in h["answer"] and "(2 diverged)" in h["answer"]
    paths = ar.figures(df, config, tmp_path)
    assert [p.name for p in paths] == ["autoencoder_rank_staircase.png",
                                       "autoencoder_rank_depth.png"]
    assert all(p.stat().st_size > 0 and p.with_suffix(".svg").exists() for p in paths)


def test_full_preset_runs_with_tiny_overrides():
    config = _config("full", **{"seeds": "1", "steps": "5", "nonlinear.steps": "5",
                                "data.rank": "4", "depths": "0,16"})
    pts = ar.points(config)
    rows = ar.run_point(config, next(p for p in pts if p["depth"] == 16), Progress())
    assert rows[-1]["step"] == 5 and len({k for r in rows for k in r}) == len(rows[0])


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "ar"
    args = ["study", "autoencoder-rank", "--preset", "quick", "--out", str(out),
            "--no-progress", "--set", *[f"{k}={v}" for k, v in TINY.items()],
            "profiles=geometric", "nonlinear.depths=0,2"]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["case"]) == {"linear", "nonlinear"}
    for name in ("staircase", "depth", "nonlinear"):
        assert (out / f"autoencoder_rank_{name}.png").stat().st_size > 0
    assert "final learned rank by depth" in (out / "report.html").read_text()
