"""The trees-vs-nets study end to end (tiny overrides) and its full config."""

import math

import pandas as pd
import pytest

from telescope.cli import main
from telescope.studies import get_study, make_config


def test_quick_tiny_end_to_end(tmp_path):
    out = tmp_path / "tvn"
    args = ["study", "trees-vs-nets", "--preset", "quick", "--out", str(out), "--no-progress",
            "--seeds", "1", "--set", "net.epochs=3", "--set", "net.hidden=16",
            "--set", "trees.n_estimators=5", "--set", "fractions=0,0.25,0.5",
            "--set", "data.n_pool=200", "--set", "data.n_test=40"]
    assert main(args) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df["fraction"]) == [0.0, 0.25, 0.5]
    assert df.loc[df["fraction"] == 0.0, "rel_increase"].abs().max() == 0.0
    assert (df.loc[df["fraction"] == 0.0, ["rel_err_net", "rel_err_trees"]] == 1.0).all().all()
    ratio = df["mse_net"] / df.loc[df["fraction"] == 0.0, "mse_net"].iloc[0]
    assert (df["rel_err_net"] - ratio).abs().max() < 1e-12
    assert ((df["rel_err_net"] - df["rel_err_trees"]) == df["rel_increase"]).all()
    assert df["trees_smoother_err"].max() < 1e-10          # boosting smoother == sklearn
    assert (df["kwn_trees"] > 0).all() and (df["kwn_net"] > 0).all()
    for c in ("mse_net", "mse_trees", "p_net", "p_trees", "telescoping_err"):
        assert df[c].map(math.isfinite).all()
    assert (out / "trees_vs_nets.png").exists() and (out / "trees_vs_nets_mse.svg").exists()
    assert (out / "report.html").exists()
    assert main(args) == 0                                 # resume: nothing left to run


def test_synthetic_data_tiny(tmp_path):
    out = tmp_path / "syn"
    assert main(["study", "trees-vs-nets", "--out", str(out), "--no-progress", "--seeds", "1",
                 "--set", "data.name=synthetic", "--set", "data.synthetic_n=150",
                 "--set", "data.n_test=30", "--set", "net.epochs=2", "--set", "net.hidden=8",
                 "--set", "trees.n_estimators=3", "--set", "fractions=0,0.5",
                 "--no-report"]) == 0
    assert len(pd.read_parquet(out / "results.parquet")) == 2


def test_full_config_builds_and_validation():
    st = get_study("trees-vs-nets")
    cfg = make_config(st, "full", {})
    assert cfg.data.name == "synthetic" and cfg.seeds == 5 and max(cfg.fractions) == 1.0
    assert len(st.points(cfg)) == 5
    cfg = make_config(st, "full", {"data.name": "openml", "data.path": "/x",
                                   "data.dataset": "houses"})
    assert cfg.data.dataset == "houses"
    with pytest.raises(ValueError):
        make_config(st, "quick", {"fractions": "0.1,0.5"})        # no reference fraction 0
    with pytest.raises(ValueError):
        make_config(st, "quick", {"data.name": "nope"})


def test_table_needs_path():
    st = get_study("trees-vs-nets")
    cfg = make_config(st, "quick", {"data.name": "table"})
    with pytest.raises(ValueError, match="data.path"):
        st.run_point(cfg, {"seed": 0}, None)


@pytest.mark.parametrize("kind", ["table", "openml"])
def test_file_tables(tmp_path, kind):
    """A CSV written here, read as a table (--set data.path=FILE) or as a plain OpenML folder
    (--set data.path=DIR --set data.dataset=houses), the way the Grinsztajn sets are read."""
    import numpy as np

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(150, 4)), columns=list("abcd"))
    frame["price"] = frame["a"] ** 2 + frame["b"] + 0.1 * rng.normal(size=150)
    folder = tmp_path / "cache"
    folder.mkdir()
    frame.to_csv(folder / "houses.csv", index=False)
    path = folder / "houses.csv" if kind == "table" else folder
    out = tmp_path / "out"
    assert main(["study", "trees-vs-nets", "--out", str(out), "--no-progress", "--seeds", "1",
                 "--set", f"data.name={kind}", "--set", f"data.path={path}",
                 "--set", "data.dataset=houses", "--set", "data.target=price",
                 "--set", "data.n_test=30", "--set", "net.epochs=2", "--set", "net.hidden=8",
                 "--set", "trees.n_estimators=3", "--set", "fractions=0,0.5",
                 "--no-report"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 2 and df["trees_smoother_err"].max() < 1e-10
