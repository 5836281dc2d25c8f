"""The ``transformer-dynamics`` study: sweep, the four experiments on tiny sizes, the full
preset with tiny overrides, the CLI end to end, and the headline on a synthetic table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from telescope.cli import main
from telescope.runs.executors import Progress
from telescope.studies import get_study, make_config
from telescope.studies import transformer_dynamics as td

TINY = {"seeds": "1", "data.n_train": "48", "data.n_test": "24",
        "entropy.steps": "6", "entropy.evals": "3", "entropy.d_model": "16",
        "entropy.batch_size": "16",
        "rank.steps": "6", "rank.evals": "3", "rank.d_model": "16",
        "slingshot.steps": "40", "slingshot.every": "5", "slingshot.p": "7",
        "slingshot.d_model": "16",
        "lazy.steps": "6", "lazy.evals": "3", "lazy.d_model": "16", "lazy.n_train": "24",
        "lazy.n_probe": "8"}

SCHEMA = set(td._TEXT) | set(td._INT) | set(td._FLOAT) | set(td._BOOL)


def _config(preset: str = "quick", **extra: str):
    return make_config(get_study("transformer-dynamics"), preset, {**TINY, **extra})


def test_points_and_presets():
    study = get_study("transformer_dynamics")
    quick = make_config(study, "quick", {})
    pts = td.points(quick)
    assert len(pts) == 2 * (2 + 2 + 2 + 4)
    assert {p["experiment"] for p in pts} == set(td.EXPERIMENTS)
    assert all(isinstance(p["setting"], float) for p in pts)
    full = make_config(study, "full", {})
    assert full.device == "auto" and full.seeds == 3
    assert full.slingshot.steps > quick.slingshot.steps
    assert len(td.points(full)) == 3 * (2 + 4 + 3 + 8)
    only = make_config(study, "quick", {"experiments": "lazy", "lazy.alphas": "1,8",
                                        "seeds": "1"})
    assert td.points(only) == [{"experiment": "lazy", "setting": a, "seed": 0} for a in (1., 8.)]
    with pytest.raises(ValueError, match="experiments"):
        make_config(study, "quick", {"experiments": "nope"})
    with pytest.raises(ValueError, match="alphas"):
        make_config(study, "quick", {"lazy.alphas": "0,1"})


def test_step_grid_and_loss_spikes():
    assert td.step_grid(100, 1) == [100]
    grid = td.step_grid(100, 5)
    assert grid[0] == 1 and grid[-1] == 100 and grid == sorted(set(grid))
    steps = list(range(10))
    losses = [1.0, 0.5, 0.1, 0.01, 0.5, 0.9, 0.05, 0.001, 0.0005, 0.02]
    spikes = td.loss_spikes(steps, losses, factor=10.0)
    # 0.5 > 10 * 0.01: a spike from step 4 to 6 peaking at 5; then 0.02 > 10 * 0.0005 at the end
    assert [(s["start"], s["peak"], s["end"]) for s in spikes] == [(4, 5, 6), (9, 9, 9)]
    assert spikes[0]["height"] == pytest.approx(90.0)
    assert td.loss_spikes([0, 1, 2], [1.0, 0.9, 0.8]) == []
    assert td.loss_spikes([0, 1], [1.0, math.nan])[0]["peak"] == 1


@pytest.mark.parametrize("experiment", td.EXPERIMENTS)
def test_each_experiment_runs_tiny(experiment):
    config = _config(experiments=experiment)
    pts = td.points(config)
    rows = []
    for point in pts:
        rows += [{**point, **r} for r in td.run_point(config, point, Progress())]
    df = pd.DataFrame(rows)
    assert SCHEMA <= set(df.columns)
    for r in rows:  # the same columns and types in every row
        assert set(r) == SCHEMA | {"experiment", "setting", "seed"}
        assert isinstance(r["step"], int) and isinstance(r["head"], int)
        assert isinstance(r["lens"], str) and isinstance(r["diverged"], bool)
    assert df["seconds"].notna().sum() == len(pts)
    if experiment == "entropy":
        ent = df[df["lens"] == "entropy"]
        assert sorted(ent["step"].unique()) == [0, *td.step_grid(6, 3)]
        # 2 layers x 4 heads per step, normalized entropies in [0, 1]
        assert len(ent) == 2 * 2 * 4 * (len(td.step_grid(6, 3)) + 1)
        assert ent["normalized_entropy"].between(0, 1 + 1e-9).all()
        assert set(ent["setting_name"]) == {"plain", "sigma-reparam"}
    elif experiment == "rank":
        rank = df[df["lens"] == "rank"]
        assert set(rank["kind"]) == {"weight", "qk", "vo"}
        assert (rank.loc[rank["kind"] != "weight", "head"] >= 0).all()
        assert (rank["rank"] >= 0).all() and (rank["rank"] <= 16).all()
        assert (df[df["lens"] == "train"]["train_loss"] > 0).all()
    elif experiment == "slingshot":
        train = df[df["lens"] == "train"]
        assert sorted(train["step"].unique()) == list(range(5, 45, 5))
        assert (train["norm"] > 0).all() and train["growth"].notna().sum() == 2 * 7
        assert set(df["lens"]) <= {"train", "cycle", "spike"}
    else:
        lazy = df[df["lens"] == "lazy"]
        assert len(lazy) == 4 * len(td.step_grid(6, 3))
        assert (lazy["gap_abs"] >= 0).all() and (lazy["param_distance"] > 0).all()
        # the gap shrinks with alpha (about 1 / alpha) at the same step
        end = lazy[lazy["step"] == 6].set_index("setting")["gap_abs"]
        assert end.loc[64.0] < end.loc[4.0] < end.loc[1.0]


def test_full_preset_runs_with_tiny_overrides():
    config = _config("full", **{"data.name": "digits-rows", "seeds": "1", "device": "cpu",
                                "slingshot.p": "7", "slingshot.d_model": "16",
                                "rank.n_heads": "2", "entropy.n_layers": "1"})
    assert config.slingshot.eps == (1e-8, 1e-6, 1e-4)
    for experiment in td.EXPERIMENTS:
        point = next(p for p in td.points(config) if p["experiment"] == experiment)
        rows = td.run_point(config, point, Progress())
        assert rows and all(set(r) == SCHEMA for r in rows)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "td"
    args = ["study", "transformer-dynamics", "--preset", "quick", "--out", str(out),
            "--no-progress", "--set", *[f"{k}={v}" for k, v in TINY.items()],
            "lazy.alphas=1,16", "rank.alphas=0.01,1"]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["experiment"]) == set(td.EXPERIMENTS)
    for name in td.EXPERIMENTS:
        assert (out / f"transformer_dynamics_{name}.png").stat().st_size > 0
        assert (out / f"transformer_dynamics_{name}.svg").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert "gap scaling exponent" in html and "final normalized entropy" in html


def _synthetic() -> pd.DataFrame:
    rows = []

    def add(experiment, setting, seed, name, step, lens, **kw):
        rows.append({"experiment": experiment, "setting": setting, "seed": seed,
                     **td._row(name, step, lens, **kw)})

    for seed in (0, 1):
        for setting, name, level in ((0.0, "plain", 0.1), (1.0, "sigma-reparam", 0.5)):
            for step in (1, 10):
                add("entropy", setting, seed, name, step, "train", train_loss=1.0 / step)
                for head, delta in enumerate((-0.05, 0.05)):
                    add("entropy", setting, seed, name, step, "entropy", layer="blocks.0.attn",
                        head=head, normalized_entropy=(level if step == 10 else 0.9) + delta)
        for setting in (0.01, 1.0):
            name = f"alpha={setting:g}"
            for step, r in ((1, 1), (5, 1), (20, 3), (100, 4)):
                r = r if setting < 1 else 12
                for head in (0, 1):
                    add("rank", setting, seed, name, step, "rank", matrix="blocks.0.attn.vo",
                        kind="vo", head=head, rank=r - head, stable_rank=1.5)
        for eps, n_cycles in ((1e-8, 2), (1e-4, 0)):
            name = f"eps={eps:g}"
            for step in (10, 20, 30):
                add("slingshot", eps, seed, name, step, "train", train_loss=0.1, norm=float(step))
            for k in range(n_cycles):
                add("slingshot", eps, seed, name, 10 * k + 15, "cycle", cycle_start=10 * k,
                    cycle_end=10 * k + 20, has_spike=k == 0)
                add("slingshot", eps, seed, name, 10 * k + 12, "spike", spike_height=50.0)
        for alpha in (1.0, 4.0, 16.0):
            for step in (10, 100):
                gap = 0.3 * step / alpha
                add("lazy", alpha, seed, f"alpha={alpha:g}", step, "lazy", gap_abs=gap,
                    gap_rel=gap / 0.5, output_scale=0.5)
    return pd.DataFrame(rows)


def test_headline_on_synthetic_frame(tmp_path):
    df = _synthetic()
    config = _config()
    h = td.headline(df, config)
    assert h["entropy: final normalized entropy, mean over heads (plain)"] == pytest.approx(0.1)
    assert h["entropy: final normalized entropy, lowest head (plain)"] == pytest.approx(0.05)
    assert h["entropy: final normalized entropy, mean over heads (sigma-reparam)"] == (
        pytest.approx(0.5))
    assert h["entropy: final train loss (plain)"] == pytest.approx(0.1)
    assert h["entropy: diverged runs (plain)"] == 0
    assert h["rank: final max rank, vo (alpha=0.01)"] == 4
    assert h["rank: final max rank, vo (alpha=1)"] == 12
    # mean over the two heads: 0.5, 0.5, 2.5, 3.5 at steps 1, 5, 20, 100
    assert h["rank: steps where vo rank increases (alpha=0.01)"] == [20, 100]
    assert h["rank: final mean rank, vo (alpha=0.01)"] == 3.5
    assert h["rank: steps where vo rank increases (alpha=1)"] == []
    assert h["slingshot: cycles per run (eps=1e-08)"] == 2
    assert h["slingshot: cycles per run (eps=0.0001)"] == 0
    assert h["slingshot: fraction of cycles with a loss spike (eps=1e-08)"] == 0.5
    assert h["slingshot: final last-layer norm (eps=1e-08)"] == 30
    assert h["lazy: step T of the gaps below"] == 100
    assert h["lazy: |h_T - h_lin| at T (alpha=4)"] == pytest.approx(7.5)
    assert h["lazy: gap scaling exponent in alpha (fit, theory -1)"] == pytest.approx(-1.0)
    assert h["lazy: gap scaling exponent, two largest alphas"] == pytest.approx(-1.0)
    assert h["seeds"] == 2
    # figures cope with the synthetic frame and with a single experiment
    paths = td.figures(df, config, tmp_path)
    assert [p.name for p in paths] == [f"transformer_dynamics_{e}.png" for e in td.EXPERIMENTS]
    only = df[df["experiment"] == "lazy"]
    assert [p.name for p in td.figures(only, config, tmp_path / "x")] == [
        "transformer_dynamics_lazy.png"]
    assert set(td.headline(only, config)) == {k for k in h if k.startswith("lazy")} | {"seeds"}
    assert np.isfinite(h["lazy: relative gap at T (alpha=16)"])
