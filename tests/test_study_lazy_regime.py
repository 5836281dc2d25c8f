"""The ``lazy-regime`` study: sweep and presets, a tiny run against a plain re-implementation,
the full preset with tiny overrides, the CLI end to end, and the headline on a synthetic
table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from _first_order import FirstOrder
from _sequence_replay import (
    check_against_replay,
    check_rows,
    encoder,
    run_all,
    sequences,
    tiny_config,
)

from telescope.cli import main
from telescope.studies import get_study, make_config
from telescope.studies import lazy_regime as lr
from telescope.train import Progress, log_spaced_steps

TINY = {"seeds": "1", "steps": "6", "evals": "3", "d_model": "16", "n_train": "24",
        "n_probe": "8"}

SCHEMA = lr.COLUMNS.names


def _config(preset: str = "quick", **extra: str):
    return tiny_config("lazy-regime", TINY, preset, **extra)


def test_points_and_presets():
    study = get_study("lazy_regime")
    quick = make_config(study, "quick", {})
    pts = lr.points(quick)
    assert len(pts) == 2 * 4
    assert all(isinstance(p["setting"], float) for p in pts)
    full = make_config(study, "full", {})
    assert full.device == "auto" and full.seeds == 3
    assert full.steps > quick.steps
    assert len(lr.points(full)) == 3 * 8
    only = make_config(study, "quick", {"alphas": "1,8", "seeds": "1"})
    assert lr.points(only) == [{"setting": a, "seed": 0} for a in (1., 8.)]
    with pytest.raises(ValueError, match="alphas"):
        make_config(study, "quick", {"alphas": "0,1"})
    with pytest.raises(ValueError, match="n_probe must be >= 1"):
        make_config(study, "quick", {"n_probe": "0"})
    with pytest.raises(ValueError, match="task must be one of"):
        make_config(study, "quick", {"task": "words"})


def test_runs_tiny():
    config = _config()
    pts, rows, df = run_all(lr, config)
    assert SCHEMA <= set(df.columns)
    check_rows(rows, SCHEMA)
    assert df["seconds"].notna().sum() == len(pts)
    assert len(df) == 4 * len(log_spaced_steps(6, 3))
    # the gap shrinks with alpha (about 1 / alpha) at the same step
    end = df[df["step"] == 6].set_index("setting")["gap_abs"]
    assert end.loc[64.0] < end.loc[4.0] < end.loc[1.0]
    check_against_replay(df, pts, config, _replay_lazy, "lazy")


def _replay_lazy(config, setting: float) -> list[dict]:
    """``h = alpha (f - f_0)`` trained by GD at lr 0.5 on ``MSE / alpha^2``; the gap to the
    linearization at the initialization from ``torch.func.jvp`` (:mod:`_first_order`)."""
    from telescope.models import LazyModel

    ds, x, y, xt, _ = sequences(24, 8)
    targets = F.one_hot(y, 10).float()
    inner = encoder(ds, 16, 2, 1)
    theta0 = [p.detach().double().clone() for p in inner.parameters()]
    model = LazyModel(inner, setting)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    fo = FirstOrder(model, {"probe": xt})
    rows = []
    for step in range(1, 7):
        opt.zero_grad()
        (F.mse_loss(model(x), targets) / setting ** 2).backward()
        opt.step()
        if step not in log_spaced_steps(6, 3):
            continue
        h, lin = fo.actual("probe").double(), fo.linearized("probe").double()
        gap, scale = float((h - lin).abs().mean()), float(h.abs().mean())
        with torch.no_grad():
            mse = float(((model(x) - targets) ** 2).mean())
        dist = math.sqrt(sum(float(((p.detach().double() - p0) ** 2).sum())
                             for p, p0 in zip(inner.parameters(), theta0, strict=True)))
        rows.append({"lens": "lazy", "step": step, "train_loss": mse, "gap_abs": gap,
                     "gap_rel": gap / scale, "output_scale": scale, "param_distance": dist})
    return rows


def test_full_preset_runs_with_tiny_overrides():
    config = _config("full", **{"task": "digits-rows", "seeds": "1", "device": "cpu"})
    rows = lr.run_point(config, lr.points(config)[0], Progress())
    assert rows and all(set(r) == SCHEMA for r in rows)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "lr"
    args = ["study", "lazy-regime", "--preset", "quick", "--out", str(out), "--no-progress",
            "--set", *[f"{k}={v}" for k, v in TINY.items()], "alphas=1,16"]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["setting"]) == {1.0, 16.0}
    assert (out / "lazy_regime.png").stat().st_size > 0
    assert (out / "lazy_regime.svg").stat().st_size > 0
    assert "gap scaling exponent" in (out / "report.html").read_text()


def _synthetic() -> pd.DataFrame:
    rows = []
    for seed in (0, 1):
        for alpha in (1.0, 4.0, 16.0):
            for step in (10, 100):
                gap = 0.3 * step / alpha
                rows.append({"setting": alpha, "seed": seed, **lr.COLUMNS.row(
                    setting_name=f"alpha={alpha:g}", step=step, gap_abs=gap, gap_rel=gap / 0.5,
                    output_scale=0.5)})
    return pd.DataFrame(rows)


def test_headline_on_synthetic_frame(tmp_path):
    df = _synthetic()
    config = _config()
    h = lr.headline(df, config)
    assert h["step T of the gaps below"] == 100
    assert h["|h_T - h_lin| at T (alpha=4)"] == pytest.approx(7.5)
    assert h["gap scaling exponent in alpha (fit, theory -1)"] == pytest.approx(-1.0)
    assert h["gap scaling exponent, two largest alphas"] == pytest.approx(-1.0)
    assert h["seeds"] == 2
    assert [p.name for p in lr.figures(df, config, tmp_path)] == ["lazy_regime.png"]
    # the headline holds the lazy numbers and the seeds, nothing else
    assert set(h) == {"step T of the gaps below", "seeds",
                      "gap scaling exponent in alpha (fit, theory -1)",
                      "gap scaling exponent, two largest alphas",
                      *(f"|h_T - h_lin| at T (alpha={a})" for a in (1, 4, 16)),
                      *(f"relative gap at T (alpha={a})" for a in (1, 4, 16))}
    assert np.isfinite(h["relative gap at T (alpha=16)"])
