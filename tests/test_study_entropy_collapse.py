"""The ``entropy-collapse`` study: sweep and presets, a tiny run against a plain
re-implementation, the full preset with tiny overrides, the CLI end to end, and the headline on
a synthetic table."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from _sequence_replay import (
    check_against_replay,
    check_rows,
    encoder,
    evaluate,
    run_all,
    sequences,
    tiny_config,
)

from telescope.cli import main
from telescope.models.hooks import capture
from telescope.studies import entropy_collapse as ec
from telescope.studies import get_study, make_config
from telescope.train import Progress, log_spaced_steps

TINY = {"seeds": "1", "data.n_train": "48", "data.n_test": "24", "steps": "6", "evals": "3",
        "d_model": "16", "batch_size": "16"}

SCHEMA = ec.COLUMNS.names


def _config(preset: str = "quick", **extra: str):
    return tiny_config("entropy-collapse", TINY, preset, **extra)


def test_points_and_presets():
    study = get_study("entropy_collapse")
    quick = make_config(study, "quick", {})
    pts = ec.points(quick)
    assert len(pts) == 2 * 2
    assert all(isinstance(p["setting"], float) for p in pts)
    assert {p["setting"] for p in pts} == {0.0, 1.0}
    full = make_config(study, "full", {})
    assert full.device == "auto" and full.seeds == 3
    assert full.steps > quick.steps
    assert len(ec.points(full)) == 3 * 2
    with pytest.raises(ValueError, match="sigma_reparam"):
        make_config(study, "quick", {"sigma_reparam": ""})
    with pytest.raises(ValueError, match="must be a multiple"):
        make_config(study, "quick", {"n_heads": "3"})


def test_step_grid():
    """The measurement grid (``log_spaced_steps``, formerly ``step_grid``)."""
    assert log_spaced_steps(100, 1) == [100]
    grid = log_spaced_steps(100, 5)
    assert grid[0] == 1 and grid[-1] == 100 and grid == sorted(set(grid))


def test_runs_tiny():
    config = _config()
    pts, rows, df = run_all(ec, config)
    assert SCHEMA <= set(df.columns)
    check_rows(rows, SCHEMA)
    assert df["seconds"].notna().sum() == len(pts)
    ent = df[df["lens"] == "entropy"]
    assert sorted(ent["step"].unique()) == [0, *log_spaced_steps(6, 3)]
    # 2 layers x 4 heads per step
    assert len(ent) == 2 * 2 * 4 * (len(log_spaced_steps(6, 3)) + 1)
    assert set(ent["setting_name"]) == {"plain", "sigma-reparam"}
    check_against_replay(df, pts, config, _replay_entropy, "entropy")


def _replay_entropy(config, setting: float) -> list[dict]:
    """Minibatch Adam at lr 3e-2; normalized entropy ``mean -sum A log A / log S`` of every
    head (an encoder: every query sees all S = 8 tokens), on the test sequences."""
    ds, x, y, xt, yt = sequences(48, 24)
    model = encoder(ds, 16, 4, 2, sigma_reparam=bool(setting))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    gen = torch.Generator().manual_seed(0)
    rows = []

    def measure(step):
        loss, acc = evaluate(model, x, y)
        rows.append({"lens": "train", "step": step, "train_loss": loss, "train_acc": acc,
                     "test_acc": evaluate(model, xt, yt)[1]})
        model.eval()
        with torch.no_grad(), capture(model, lambda n: n.endswith("attn.hook_pattern")) as cache:
            model(xt)
        for b in range(len(model.blocks)):
            a = cache[f"blocks.{b}.attn.hook_pattern"].double()
            ent = -(a * a.clamp_min(1e-300).log()).sum(-1).mean(dim=(0, 2))
            for h in range(4):
                rows.append({"lens": "entropy", "step": step, "layer": f"blocks.{b}.attn",
                             "head": h, "entropy": float(ent[h]),
                             "normalized_entropy": float(ent[h]) / math.log(8)})
        model.train()

    measure(0)
    for step in range(1, 7):
        idx = torch.randperm(48, generator=gen)[:16]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if step in log_spaced_steps(6, 3):
            measure(step)
    return rows


def test_full_preset_runs_with_tiny_overrides():
    config = _config("full", **{"data.name": "digits-rows", "seeds": "1", "device": "cpu",
                                "n_layers": "1"})
    rows = ec.run_point(config, ec.points(config)[0], Progress())
    assert rows and all(set(r) == SCHEMA for r in rows)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "ec"
    args = ["study", "entropy-collapse", "--preset", "quick", "--out", str(out),
            "--no-progress", "--set", *[f"{k}={v}" for k, v in TINY.items()]]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["setting"]) == {0.0, 1.0}
    assert (out / "entropy_collapse.png").stat().st_size > 0
    assert (out / "entropy_collapse.svg").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert "final normalized entropy" in html


def _synthetic() -> pd.DataFrame:
    rows = []

    def add(setting, seed, name, step, lens, **kw):
        rows.append({"setting": setting, "seed": seed,
                     **ec.COLUMNS.row(setting_name=name, step=step, lens=lens, **kw)})

    for seed in (0, 1):
        for setting, name, level in ((0.0, "plain", 0.1), (1.0, "sigma-reparam", 0.5)):
            for step in (1, 10):
                add(setting, seed, name, step, "train", train_loss=1.0 / step)
                for head, delta in enumerate((-0.05, 0.05)):
                    add(setting, seed, name, step, "entropy", layer="blocks.0.attn",
                        head=head, normalized_entropy=(level if step == 10 else 0.9) + delta)
    return pd.DataFrame(rows)


def test_headline_on_synthetic_frame(tmp_path):
    df = _synthetic()
    config = _config()
    h = ec.headline(df, config)
    assert h["final normalized entropy, mean over heads (plain)"] == pytest.approx(0.1)
    assert h["final normalized entropy, lowest head (plain)"] == pytest.approx(0.05)
    assert h["final normalized entropy, mean over heads (sigma-reparam)"] == (
        pytest.approx(0.5))
    assert h["final train loss (plain)"] == pytest.approx(0.1)
    assert h["diverged runs (plain)"] == 0
    assert h["seeds"] == 2
    assert [p.name for p in ec.figures(df, config, tmp_path)] == ["entropy_collapse.png"]
    assert ec.figures(df.iloc[0:0], config, tmp_path / "x") == []
    assert ec.headline(df.iloc[0:0], config) == {}
