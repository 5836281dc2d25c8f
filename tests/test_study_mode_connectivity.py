"""The mode-connectivity study: tiny end-to-end run through the CLI and the full preset."""

from __future__ import annotations

import pandas as pd
import pytest

from telescope.cli import main
from telescope.studies import get_study, make_config

TINY = ["--set", "data.n_train=60", "data.n_test=40", "channels=4", "spawn_steps=0,3",
        "k=4", "batch_size=16", "n_alpha=3", "seeds=1"]



def test_quick_tiny_end_to_end(tmp_path):
    out = tmp_path / "mc"
    assert main(["study", "mode-connectivity", "--preset", "quick", "--out", str(out), *TINY,
                 "--no-progress"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    for col in ("spawn", "seed", "alpha", "test_acc", "acc_a", "acc_b", "acc_drop",
                "grad_change_conv1", "grad_change_conv2", "grad_change_head",
                "grad_change_all"):
        assert col in df.columns
    assert sorted(df["spawn"].unique()) == [0, 3]
    assert len(df) == 2 * 3
    assert (df["acc_drop"] >= 0).all() and (df["grad_change_all"] >= 0).all()
    assert (out / "mode_connectivity.png").stat().st_size > 0
    assert (out / "mode_connectivity.svg").exists()
    assert (out / "report.html").exists()


def test_full_preset_config_builds():
    study = get_study("mode_connectivity")
    config = make_config(study, "full", {})
    assert config.k == 3000 and config.channels == 32 and config.seeds == 3
    assert len(study.points(config)) == 3 * len(config.spawn_steps)
    with pytest.raises(ValueError):
        make_config(study, "quick", {"n_alpha": "2"})
