"""The grokking study: tiny end-to-end run through the CLI and the full preset's config."""

from __future__ import annotations

import pandas as pd
import pytest

from telescope.cli import main
from telescope.studies import get_study, make_config
from telescope.studies.grokking import log_steps

TINY = ["--set", "polynomial.epsilons=0.05", "polynomial.n_train=20", "polynomial.n_test=30",
        "polynomial.n_probe=10", "polynomial.d=8", "polynomial.width=16",
        "polynomial.steps=12", "digits.n_train=30", "digits.n_test=40", "digits.n_probe=10",
        "digits.hidden=16", "digits.steps=12", "digits.batch_size=10", "n_log=5"]



def test_quick_tiny_end_to_end(tmp_path):
    out = tmp_path / "grok"
    assert main(["study", "grokking", "--preset", "quick", "--out", str(out), *TINY,
                 "--no-progress"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    for col in ("task", "alpha", "epsilon", "seed", "step", "train_mse", "test_mse",
                "train_error", "test_error", "p_train", "p_test"):
        assert col in df.columns
    assert set(df["task"]) == {"polynomial", "digits"}
    assert set(df.loc[df["task"] == "digits", "alpha"]) == {6.0, 1.0}
    assert df["step"].max() == 12 and (df["step"] == 0).any()
    assert df["p_train"].iloc[-1] > 0
    for name in ("grokking_polynomial", "grokking_digits"):
        assert (out / f"{name}.png").stat().st_size > 0
        assert (out / f"{name}.svg").exists()
    assert (out / "report.html").exists()


def test_full_preset_config_builds():
    study = get_study("grokking")
    config = make_config(study, "full", {})
    assert config.digits.alphas == (6.0, 1.0)
    assert config.digits.n_train == 1000 and config.seeds == 3
    assert len(study.points(config)) == 3 * (len(config.polynomial.epsilons) + 2)
    with pytest.raises(ValueError):
        make_config(study, "quick", {"polynomial.epsilons": "", "digits.alphas": ""})


def test_log_steps():
    steps = log_steps(1000, 10)
    assert steps[0] == 0 and steps[1] == 1 and steps[-1] == 1000
    assert steps == sorted(set(steps))
