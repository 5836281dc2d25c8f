"""The ``slingshot`` study: sweep and presets, a tiny run against a plain re-implementation,
the full preset with tiny overrides, the CLI end to end, and the headline on a synthetic
table."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from _sequence_replay import check_against_replay, check_rows, evaluate, run_all, tiny_config

from telescope.cli import main
from telescope.studies import get_study, make_config
from telescope.studies import slingshot as sl
from telescope.train import Progress

TINY = {"seeds": "1", "steps": "40", "every": "5", "p": "7", "d_model": "16"}

SCHEMA = sl.COLUMNS.names


def _config(preset: str = "quick", **extra: str):
    return tiny_config("slingshot", TINY, preset, **extra)


def test_points_and_presets():
    study = get_study("slingshot")
    quick = make_config(study, "quick", {})
    pts = sl.points(quick)
    assert len(pts) == 2 * 2
    assert all(isinstance(p["setting"], float) for p in pts)
    full = make_config(study, "full", {})
    assert full.device == "auto" and full.seeds == 3
    assert full.steps > quick.steps
    assert len(sl.points(full)) == 3 * 3
    with pytest.raises(ValueError, match="eps"):
        make_config(study, "quick", {"eps": "0,1e-8"})
    with pytest.raises(ValueError, match="train_fraction"):
        make_config(study, "quick", {"train_fraction": "1"})


def test_runs_tiny():
    config = _config()
    pts, rows, df = run_all(sl, config)
    assert SCHEMA <= set(df.columns)
    check_rows(rows, SCHEMA)
    assert df["seconds"].notna().sum() == len(pts)
    train = df[df["lens"] == "train"]
    assert sorted(train["step"].unique()) == list(range(5, 45, 5))
    assert train["growth"].notna().sum() == 2 * 7
    assert set(df["lens"]) <= {"train", "cycle", "spike"}
    check_against_replay(df, pts, config, _replay_slingshot, "slingshot")


def _replay_slingshot(config, setting: float) -> list[dict]:
    """Full-batch Adam (eps = setting, betas 0.9 / 0.99) on a + b mod 7; every 5 steps the
    loss before the step, the head's L2 norm after it, its log-growth rate per step."""
    from telescope.data import modular_arithmetic
    from telescope.models import TinyTransformer

    ds = modular_arithmetic(7, op="add", train_fraction=0.5, seed=0, equals=True)
    torch.manual_seed(0)
    model = TinyTransformer(8, 16, 4, 1, 3, 7, causal=True, readout="last")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=setting, betas=(0.9, 0.99))
    rows, last = [], None
    for step in range(1, 41):
        loss = F.cross_entropy(model(ds.x_train), ds.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0:
            norm = math.sqrt(sum(float((p.detach().double() ** 2).sum())
                                 for p in model.head.parameters()))
            rows.append({"lens": "train", "step": step, "train_loss": float(loss.detach()),
                         "norm": norm,
                         "growth": math.nan if last is None else math.log(norm / last) / 5,
                         "test_acc": evaluate(model, ds.x_test, ds.y_test)[1]})
            last = norm
    return rows


def test_full_preset_runs_with_tiny_overrides():
    config = _config("full", **{"seeds": "1", "device": "cpu", "p": "7", "d_model": "16"})
    assert config.eps == (1e-8, 1e-6, 1e-4)
    rows = sl.run_point(config, sl.points(config)[0], Progress())
    assert rows and all(set(r) == SCHEMA for r in rows)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "sl"
    args = ["study", "slingshot", "--preset", "quick", "--out", str(out), "--no-progress",
            "--set", *[f"{k}={v}" for k, v in TINY.items()]]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["setting"]) == {1e-8, 1e-4}
    assert (out / "slingshot.png").stat().st_size > 0
    assert (out / "slingshot.svg").stat().st_size > 0
    assert "cycles per run" in (out / "report.html").read_text()


def _synthetic() -> pd.DataFrame:
    rows = []

    def add(setting, seed, name, step, lens, **kw):
        rows.append({"setting": setting, "seed": seed,
                     **sl.COLUMNS.row(setting_name=name, step=step, lens=lens, **kw)})

    for seed in (0, 1):
        for eps, n_cycles in ((1e-8, 2), (1e-4, 0)):
            name = f"eps={eps:g}"
            for step in (10, 20, 30):
                add(eps, seed, name, step, "train", train_loss=0.1, norm=float(step))
            for k in range(n_cycles):
                add(eps, seed, name, 10 * k + 15, "cycle", cycle_start=10 * k,
                    cycle_end=10 * k + 20, has_spike=k == 0)
                add(eps, seed, name, 10 * k + 12, "spike", spike_height=50.0)
    return pd.DataFrame(rows)


def test_headline_on_synthetic_frame(tmp_path):
    df = _synthetic()
    config = _config()
    h = sl.headline(df, config)
    assert h["cycles per run (eps=1e-08)"] == 2
    assert h["cycles per run (eps=0.0001)"] == 0
    assert h["fraction of cycles with a loss spike (eps=1e-08)"] == 0.5
    assert h["final last-layer norm (eps=1e-08)"] == 30
    assert h["seeds"] == 2
    assert [p.name for p in sl.figures(df, config, tmp_path)] == ["slingshot.png"]
    assert sl.figures(df.iloc[0:0], config, tmp_path / "x") == []
