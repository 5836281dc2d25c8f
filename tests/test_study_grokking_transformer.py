"""The grokking-transformer study: mechanics on a tiny run, the full preset, the headline logic."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from telescope.cli import main
from telescope.studies import get_study, make_config
from telescope.studies import grokking_transformer as gt

TINY = {"p": "7", "train_fraction": "0.5", "d_model": "8", "n_heads": "2", "mlp_ratio": "2",
        "steps": "6", "n_log": "3", "n_linear": "2", "n_kernel": "6", "n_probe": "5",
        "lr": "1e-2"}


def _set(overrides: dict) -> list[str]:
    return ["--set", *(f"{k}={v}" for k, v in overrides.items())]


class _Progress:
    def __init__(self):
        self.total, self.done = None, 0

    def set(self, total):
        self.total = total

    def update(self, n=1):
        self.done += n

    def write(self, msg):
        pass


def test_run_point_mechanics():
    study = get_study("grokking_transformer")
    config = make_config(study, "quick", TINY)
    pts = study.points(config)
    assert pts == [{"weight_decay": 1.0, "seed": 0}]
    prog = _Progress()
    rows = study.run_point(config, pts[0], prog)
    assert prog.total == 6 and prog.done == 6
    df = pd.DataFrame(rows)
    assert list(df["step"]) == gt.log_steps(6, 3, 2)
    assert df["step"].iloc[0] == 0 and df["step"].iloc[-1] == 6
    for col in ("train_loss", "test_loss", "train_acc", "test_acc", "weight_norm",
                "kernel_distance", "kernel_target_alignment", "kernel_trace",
                "kernel_effective_rank", "p_train_ntk", "p_test_ntk", "entropy_l0_h0",
                "entropy_l0_h1", "srank_embed", "srank_qk", "srank_vo", "srank_mlp_in",
                "srank_unembed", "rank_qk_h0", "dnorm_vo_h1", "rank_wq"):
        assert col in df.columns, col
        assert df[col].notna().all(), col
    first = df.iloc[0]
    assert first["kernel_distance"] == pytest.approx(0.0, abs=1e-5)
    assert first["dnorm_embed"] == 0.0 and first["rank_embed"] == 0
    assert df["dnorm_embed"].iloc[-1] > 0
    assert df["kernel_distance"].iloc[-1] > 0
    # the kernel smoother's effective parameters lie in (0, n_kernel]
    assert ((df["p_train_ntk"] > 0) & (df["p_train_ntk"] <= 6 + 1e-9)).all()
    assert (df["p_test_ntk"] > 0).all()
    assert ((df["entropy_l0_h0"] > 0) & (df["entropy_l0_h0"] <= 1 + 1e-9)).all()
    assert ((df["train_acc"] >= 0) & (df["train_acc"] <= 1)).all()
    # same seed, same numbers
    again = pd.DataFrame(study.run_point(config, pts[0], _Progress()))
    np.testing.assert_allclose(again["test_loss"], df["test_loss"], rtol=1e-5)


def test_quick_tiny_end_to_end(tmp_path):
    out = tmp_path / "gt"
    assert main(["study", "grokking-transformer", "--preset", "quick", "--out", str(out),
                 *_set({**TINY, "weight_decays": "1,0"}), "--no-progress"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["weight_decay"]) == {1.0, 0.0}
    assert (out / "grokking_transformer_wd1.png").stat().st_size > 0
    assert (out / "grokking_transformer_wd0.svg").exists()
    assert (out / "report.html").exists()


def test_full_preset_smoke(tmp_path):
    study = get_study("grokking-transformer")
    full = make_config(study, "full", {})
    assert (full.p, full.d_model, full.n_heads, full.mlp_ratio) == (113, 128, 4, 4)
    assert full.lr == 1e-3 and full.betas == (0.9, 0.98) and full.train_fraction == 0.3
    assert full.weight_decays == (1.0, 0.0) and full.seeds == 3
    assert len(study.points(full)) == 6
    out = tmp_path / "full"
    assert main(["study", "grokking-transformer", "--preset", "full", "--out", str(out),
                 *_set({**TINY, "seeds": "1", "device": "cpu"}), "--no-progress"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 2 * len(gt.log_steps(6, 3, 2))


def test_config_validation():
    study = get_study("grokking-transformer")
    for bad in ({"d_model": "10", "n_heads": "4"}, {"train_fraction": "1.0"},
                {"weight_decays": "-1"}, {"smoother_ridge": "0"}, {"n_kernel": "1"}):
        with pytest.raises(ValueError):
            make_config(study, "quick", bad)


def test_log_steps():
    s = gt.log_steps(1000, 10, 4)
    assert s[0] == 0 and s[1] == 1 and s[-1] == 1000
    assert s == sorted(set(s))
    assert {250, 500, 750} <= set(s)
    assert gt.log_steps(5, 3, 0) == [0, 1, 2, 5]


def _synthetic(wd: float, seed: int, fit: int, grok: int | None) -> list[dict]:
    rows = []
    for step in (0, 10, 100, 200, 400, 800, 1600):
        test = 1.0 if grok is not None and step >= grok else 0.05
        rows.append({"weight_decay": wd, "seed": seed, "step": step,
                     "train_acc": 1.0 if step >= fit else 0.5, "test_acc": test,
                     "train_loss": 0.1, "test_loss": 1.0, "weight_norm": 50.0 - step / 100,
                     "kernel_distance": 0.8 if grok is not None and step >= grok else 0.1,
                     "kernel_target_alignment": 0.2, "kernel_effective_rank": 10.0,
                     "p_train_ntk": 5.0, "p_test_ntk": 3.0, "entropy_l0_h0": 0.5,
                     "entropy_l0_h1": 0.7, "srank_qk": 2.0, "srank_vo": 3.0,
                     "srank_embed": 4.0, "srank_mlp_in": 5.0})
    return rows


def test_headline_logic_and_figures(tmp_path):
    config = make_config(get_study("grokking-transformer"), "quick", {"seeds": "2"})
    df = pd.DataFrame(_synthetic(1.0, 0, 100, 400) + _synthetic(1.0, 1, 100, 800)
                      + _synthetic(0.0, 0, 10, None))
    h = gt.headline(df, config)
    assert h["wd=1: step train acc 99%"] == 100.0
    assert h["wd=1: step test acc 99% (grokking)"] == 600.0          # mean of 400 and 800
    assert h["wd=1: grokking delay (steps)"] == 500.0
    assert h["wd=1: grok step / fit step"] == 6.0
    assert h["wd=1: runs grokked"] == "2/2"
    assert h["wd=1: step of largest kernel-distance increase"] == 600.0
    assert h["wd=1: kernel distance at fit"] == pytest.approx(0.1)
    assert h["wd=1: kernel distance at grok"] == pytest.approx(0.8)
    assert h["wd=1: attention entropy (normalized, mean head) at end"] == pytest.approx(0.6)
    assert h["wd=1: weight norm at end"] == pytest.approx(34.0)
    assert h["wd=0: step train acc 99%"] == 10.0
    assert math.isnan(h["wd=0: step test acc 99% (grokking)"])
    assert h["wd=0: runs grokked"] == "0/1"
    assert h["wd=0: final test accuracy"] == pytest.approx(0.05)
    assert "wd=0: kernel distance at grok" not in h
    paths = gt.figures(df, config, tmp_path)
    assert [p.name for p in paths] == ["grokking_transformer_wd1.png",
                                       "grokking_transformer_wd0.png"]
    assert all(p.stat().st_size > 0 for p in paths)
