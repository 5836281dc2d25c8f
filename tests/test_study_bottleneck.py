"""The ``bottleneck`` study: sweep, presets and checks, the speedup arithmetic against curves
with known answers, a tiny run of every part (shared initial functions, the references), the
study's infinite-width description against a wide network's NTK, headline, figures and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from telescope.cli import main
from telescope.kernels import ntk
from telescope.models import BottleneckMLP
from telescope.studies import bottleneck as bn
from telescope.studies import get_study, make_config
from telescope.train import Progress

TINY = {"seeds": "1", "steps": "20", "evals": "4", "width": "32", "bottlenecks": "2,0",
        "data.n_train": "24", "data.n_test": "20", "n_probe": "8", "linear.width": "64",
        "linear.bottlenecks": "1,2", "linear.steps": "30", "linear.scalar_steps": "30",
        "linear.d": "4", "linear.n_train": "12", "target_scales": "1,4"}


def _config(**extra: str):
    return make_config(get_study("bottleneck"), "quick", {**TINY, **extra})


@pytest.fixture(scope="module")
def tiny_df():
    config = _config()
    rows = []
    for p in bn.points(config):
        rows += bn.run_point(config, p, Progress())
    return config, pd.DataFrame(rows)


def test_points_and_presets():
    study = get_study("bottleneck")
    quick = make_config(study, "quick", {})
    pts = bn.points(quick)
    assert len(pts) == 2 * 2 * (4 + 3 + 1)
    assert len({tuple(sorted(p.items())) for p in pts}) == len(pts)
    assert {p["part"] for p in pts} == {"mlp", "linear", "scalar"}
    full = make_config(study, "full", {})
    assert full.device == "auto" and full.seeds == 5 and full.width > quick.width
    assert len(bn.points(full)) == 5 * 5 * (9 + 6 + 1)
    no_scalar = make_config(study, "quick", {"linear.scalar": "false", "seeds": "1"})
    assert all(p["part"] != "scalar" for p in bn.points(no_scalar))


@pytest.mark.parametrize("overrides, match", [
    ({"bottlenecks": "4,4"}, "bottlenecks must be distinct"),
    ({"bottlenecks": "1024"}, "wider than width"),
    ({"n_probe": "500"}, "n_probe must be"),
    ({"loss_threshold": "1.5"}, "loss_threshold must be"),
    ({"data.n_train": "1500", "data.n_test": "400"}, "1797 bundled digits"),
    ({"device": "tpu"}, "device"),
    ({"target_scales": "0"}, "target_scales"),
])
def test_config_checks(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(get_study("bottleneck"), "quick", overrides)


def test_time_to_level_on_known_curves():
    t = np.array([0.0, 1.0, 100.0])
    loss = np.array([5.0, 1.0, 1e-4])                       # t^-2 after t = 1
    assert bn.time_to_level(t, loss, 1e-2) == pytest.approx(10.0)
    assert bn.time_to_level(t, loss, 3.0) == pytest.approx(0.5)   # linear from t = 0
    assert bn.time_to_level(t, loss, 6.0) == 0.0
    assert math.isnan(bn.time_to_level(t, loss, 1e-5))


def test_speedups_of_exponentials():
    t = np.concatenate([[0.0], np.geomspace(0.01, 20, 60)])
    rows = []
    for kind, rate in (("ntk", 1.0), ("network", 2.5), ("ode", 0.5)):
        rows += [{"part": "linear", "bottleneck": 2, "target_scale": 1.0, "seed": 0,
                  "kind": kind, "t": ti, "train_loss": 3.0 * math.exp(-rate * ti)} for ti in t]
    sp = bn.speedups(pd.DataFrame(rows), 0.01).set_index("kind")
    # log-log interpolation of an exponential between measured steps: within 0.5 %
    assert sp.loc["network", "speedup"] == pytest.approx(2.5, rel=5e-3)
    assert sp.loc["ode", "speedup"] == pytest.approx(0.5, rel=5e-3)
    assert sp.loc["network", "t_reach_ntk"] == pytest.approx(math.log(100), rel=5e-3)


def test_tiny_run_rows(tiny_df):
    config, df = tiny_df
    kinds = {part: set(sub["kind"]) for part, sub in df.groupby("part")}
    assert kinds == {"mlp": {"network", "ntk"}, "linear": {"network", "ode", "ntk"},
                     "scalar": {"network", "closed_form", "ntk"}}
    # every reference starts from the network's own initial function
    start = df[df["step"] == 0].groupby([*bn._KEYS, "kind"])["train_loss"].first().unstack()
    for ref in ("ntk", "ode", "closed_form"):
        both = start[[ref, "network"]].dropna()
        assert len(both) > 0
        assert both[ref].to_numpy() == pytest.approx(both["network"].to_numpy(), rel=1e-5)
    net = df[df["kind"] == "network"]
    assert (net[net["step"] == 0]["gap"] < 1e-6).all()
    mlp = net[net["part"] == "mlp"]
    assert mlp["test_error"].between(0, 1).all() and mlp["kernel_distance"].notna().all()
    assert (mlp[mlp["step"] == 0]["kernel_distance"].abs() < 1e-6).all()
    last = mlp[mlp["step"] == config.steps]
    # the bottleneck of width 2 moves its kernel more than the network without one
    by_k = last.groupby(["target_scale", "bottleneck"])["kernel_distance"].mean().unstack()
    assert (by_k[2] > by_k[0]).all()
    # the deep linear ODE's kernel movement is the network's
    lin = df[(df["part"] == "linear") & (df["step"] == config.linear.steps)]
    kd = lin.pivot_table(index=["bottleneck", "target_scale"], columns="kind",
                         values="kernel_distance")
    assert kd["ode"].to_numpy() == pytest.approx(kd["network"].to_numpy(), abs=0.05)
    assert (df[df["part"] == "scalar"]["closed_form_speedup"].dropna() > 0).all()


def test_headline_and_figures(tiny_df, tmp_path):
    config, df = tiny_df
    h = bn.headline(df, config)
    for key in ("speedup over the NTK, scale 4, k=2", "speedup over no bottleneck, scale 4, k=2",
                "kernel distance, scale 1, none", "test error, scale 1, infinite NTK",
                "no-bottleneck gap to the NTK, scale 1", "deep linear ODE speedup, scale 4, k=1",
                "scalar model: closed-form speedup, scale 4",
                "deep linear: max gap network vs infinite-width theory",
                "seeds that never reached the threshold"):
        assert key in h, key
    assert h["seeds"] == 1 and "target scale 4" in h["answer"]
    paths = bn.figures(df, config, tmp_path)
    assert [p.name for p in paths] == ["bottleneck_loss.png", "bottleneck_kernel.png",
                                       "bottleneck_linear.png"]
    assert all(p.stat().st_size > 0 and p.with_suffix(".svg").exists() for p in paths)
    # a partial run: only the linear part
    assert len(bn.figures(df[df["part"] == "linear"], config, tmp_path / "part")) == 1
    assert "deep linear ODE speedup, scale 1, k=2" in bn.headline(df[df["part"] == "linear"],
                                                                  config)


def test_infinite_architecture_is_the_wide_network():
    """The study's infinite description (with extra hidden layers) against the empirical NTK of
    the wide no-bottleneck network."""
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(0)
    model = BottleneckMLP(5, 1024, None, 1, depth_before=1, depth_after=1).double()
    k_inf = bn.infinite_architecture(model).kernel(x)["ntk"]
    assert float((ntk(model, x) - k_inf).norm() / k_inf.norm()) < 0.2
    torch.manual_seed(1)
    biased = BottleneckMLP(5, 1024, None, 1, bias_std=0.5).double()
    k_inf = bn.infinite_architecture(biased).kernel(x)["ntk"]
    assert float((ntk(biased, x) - k_inf).norm() / k_inf.norm()) < 0.2
    # deep linear: the fixed kernel the linear part's kernel flow uses
    linear = BottleneckMLP(5, 16, 2, 1, activation="identity", depth_after=1)
    l1, l2, d = 2, 3, 5
    assert torch.allclose(bn.infinite_architecture(linear).kernel(x)["ntk"],
                          (l1 + l2) * x @ x.T / d, atol=1e-10)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "bn"
    args = ["study", "bottleneck", "--preset", "quick", "--out", str(out), "--no-progress",
            "--set", *[f"{k}={v}" for k, v in TINY.items() if k != "target_scales"],
            "target_scales=2", "linear.scalar=false"]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["target_scale"]) == {2.0} and "scalar" not in set(df["part"])
    assert (out / "bottleneck_loss.png").stat().st_size > 0
    assert "speedup over the NTK" in (out / "report.html").read_text()
