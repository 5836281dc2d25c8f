"""ntk-double-descent: the kernel predictions against closed forms, the sweep mechanics on tiny
settings, and the headline / answer logic on hand-made results."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from telescope.runs import Progress
from telescope.studies import get_study, make_config
from telescope.studies import ntk_double_descent as ndd

STUDY = get_study("ntk-double-descent")
TINY = {"widths": "2,4", "mlp_widths": "2,8", "steps": "6", "evals": "2", "seeds": "1",
        "data.n_train": "24", "data.n_test": "16", "warmup": "2", "telescoping": "8"}


def test_kernel_prediction_of_a_linear_model_is_least_squares():
    """For f(x) = w.x + b the NTK is [X 1][X 1]^T: converged kernel regression from any f0 is
    the least-squares fit, and the smoother is the hat matrix (p_train = d + 1)."""
    torch.manual_seed(0)
    n, m, d = 30, 12, 5
    x, xt = torch.randn(n, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    y = torch.randn(n, 1, dtype=torch.float64)
    model = torch.nn.Linear(d, 1).double()
    with torch.no_grad():
        f0, f0t = model(x), model(xt)
    out = ndd.kernel_prediction(model, x, y, xt, f0, f0t, ridge=0.0)
    a = np.c_[x.numpy(), np.ones(n)]
    at = np.c_[xt.numpy(), np.ones(m)]
    beta = np.linalg.lstsq(a, y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(out["test"].numpy(), (at @ beta).ravel(), atol=1e-9)
    np.testing.assert_allclose(out["train"].numpy(), (a @ beta).ravel(), atol=1e-9)
    pinv = np.linalg.pinv(a)
    hat_test = at @ pinv                                          # smoother weights [m, n]
    assert out["p_train"] == pytest.approx(d + 1, rel=1e-9)       # trace of the hat matrix
    assert out["p_test"] == pytest.approx(n / m * (hat_test ** 2).sum(), rel=1e-9)


def test_kernel_prediction_interpolates_when_overparametrized():
    """More parameters than points: the converged prediction interpolates (p_train = n)."""
    torch.manual_seed(1)
    n = 10
    x, xt = torch.randn(n, 3), torch.randn(5, 3)
    y = torch.randn(n, 1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    with torch.no_grad():
        f0, f0t = model(x), model(xt)
    out = ndd.kernel_prediction(model, x, y, xt, f0, f0t, ridge=0.0)
    np.testing.assert_allclose(out["train"].numpy(), y.double().ravel().numpy(), atol=1e-7)
    assert out["p_train"] == pytest.approx(n, rel=1e-8)


def test_tiny_sweep_runs_and_fills_every_column():
    config = make_config(STUDY, "quick", TINY)
    pts = ndd.points(config)
    assert [(p["model"], p["width"]) for p in pts] == [
        ("transformer", 2), ("transformer", 4), ("mlp", 2), ("mlp", 8)]
    rows = ndd.run_point(config, pts[1], Progress())
    assert [r["step"] for r in rows] == [3, 6]
    last = rows[-1]
    for col in ("test_mse", "lazy_test_mse", "after_test_mse", "telescoping_test_mse",
                "lazy_p_train", "lazy_p_test", "after_p_test", "kernel_distance", "lazy_gap"):
        assert math.isfinite(last[col]), col
    assert 0 < last["lazy_p_train"] <= 24 + 1e-6
    assert last["ntk_rank_init"] == round(last["lazy_p_train"])  # min-norm: p_train = rank
    # six small Adam steps barely move a transformer: the telescoping model follows it closely
    assert last["telescoping_gap"] < 0.05
    mlp_rows = ndd.run_point(config, pts[2], Progress())
    assert mlp_rows[-1]["n_params"] == 40 * 2 + 2 + 2 + 1


def test_full_preset_builds_and_runs_with_tiny_overrides():
    config = make_config(STUDY, "full", {**TINY, "device": "cpu", "smoother": "true",
                                         "n_layers": "1", "widths": "2", "mlp_widths": "2"})
    assert config.n_heads == 2 and config.smoother
    rows = ndd.run_point(config, ndd.points(config)[0], Progress())
    assert 0 <= rows[-1]["network_p_train"] and 0 <= rows[-1]["network_p_test"]


def test_network_smoother_is_skipped_above_its_parameter_budget():
    config = make_config(STUDY, "quick", {**TINY, "smoother": "true", "smoother_max_params": "10",
                                          "models": "mlp"})
    rows = ndd.run_point(config, ndd.points(config)[0], Progress())
    assert math.isnan(rows[-1]["network_p_train"]) and math.isnan(rows[-1]["network_p_test"])


@pytest.mark.parametrize("override, message", [
    ({"widths": "3"}, "divisible by n_heads"),
    ({"models": "cnn"}, "models must be"),
    ({"label_noise": "1.5"}, "label_noise"),
    ({"data.kind": "cifar"}, "data.kind"),
])
def test_bad_configs_are_explained(override, message):
    with pytest.raises(ValueError, match=message):
        make_config(STUDY, "quick", {**override, **({"n_heads": "2"} if "widths" in override
                                                    else {})})


def _fake(curve_net, curve_lazy, gaps, kind="transformer"):
    widths = [2, 4, 8, 16, 32]
    rows = []
    for seed in (0, 1):
        for w, net, lazy, gap in zip(widths, curve_net, curve_lazy, gaps, strict=True):
            rows.append({"model": kind, "width": w, "seed": seed, "step": 10, "n_train": 100,
                         "test_mse": net + 0.01 * seed, "lazy_test_mse": lazy,
                         "after_test_mse": net * 1.1, "lazy_gap": gap,
                         "kernel_distance": 0.1})
    return pd.DataFrame(rows)


def test_headline_finds_peak_rank_correlation_and_lazy_validity():
    df = _fake([1.1, 2.0, 1.5, 1.2, 1.0], [1.3, 5.0, 2.0, 1.5, 1.1], [2.0, 1.0, 0.3, 0.2, 0.1])
    config = make_config(STUDY, "quick", {})
    h = ndd.headline(df, config)
    assert h["transformer: trained network: peak width"] == 4
    assert h["transformer: NTK at init (lazy): peak width"] == 4
    assert h["transformer: NTK at init (lazy): rank correlation with the network"] == (
        pytest.approx(1.0))
    assert h["transformer: NTK at init (lazy): median relative distance to the network"] == (
        pytest.approx(0.3))
    assert h["transformer: lazy prediction within 25 % from width"] == 16
    assert h["transformer: can NTK theory (at init) predict its double descent?"] == "yes"
    assert "double descent" in h["answer"] and "from width 16" in h["answer"]


def test_verdicts_follow_peak_location_and_validity():
    # peak one width early, lazy never valid: partly; two widths early: no
    partly = _fake([1.1, 1.5, 2.0, 1.2, 1.0], [1.3, 5.0, 2.0, 1.5, 1.1], [2.0] * 5)
    assert ndd.verdict(ndd._final(partly), "transformer") == "partly"
    no = _fake([1.1, 1.2, 1.5, 2.0, 1.0], [1.3, 5.0, 2.0, 1.5, 1.1], [2.0] * 5)
    assert ndd.verdict(ndd._final(no), "transformer") == "no"
    flat = _fake([2.0, 1.5, 1.2, 1.1, 1.0], [3.0, 2.0, 1.5, 1.2, 1.1], [2.0] * 5)
    assert ndd.verdict(ndd._final(flat), "transformer") == "no double descent"


def test_answer_says_when_there_is_no_peak_and_no_lazy_regime():
    df = _fake([2.0, 1.5, 1.2, 1.1, 1.0], [3.0, 2.0, 1.5, 1.2, 1.1], [2.0, 1.0, 0.9, 0.8, 0.7])
    final = ndd._final(df)
    assert ndd.lazy_valid_from(final, "transformer") is None
    text = ndd.answer(final)
    assert "no clear double descent" in text and "never come within 25 %" in text
    assert "relative distance 0.70 at the largest width" in text


def test_figures_and_report_from_tiny_run(tmp_path):
    config = make_config(STUDY, "quick", TINY)
    rows = []
    for p in ndd.points(config)[:2]:
        rows += [{**p, **r} for r in ndd.run_point(config, p, Progress())]
    paths = ndd.figures(pd.DataFrame(rows), config, tmp_path)
    assert [p.name for p in paths] == ["ntk_double_descent.png", "ntk_double_descent_steps.png"]
    assert all(p.stat().st_size > 0 and p.with_suffix(".svg").exists() for p in paths)


def test_cli_run_resumes_after_losing_a_point(tmp_path, capsys):
    """A finished run whose point file is lost (as if killed while computing it) recomputes only
    that point on the same command, and the results come out identical; the terminal shows the
    headline with the answer in words."""
    import json

    from telescope.cli import main

    sets = [f"{k}={v}" for k, v in TINY.items()]
    args = ["study", "ntk-double-descent", "--out", str(tmp_path), "--set", *sets,
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "\nanswer: Transformer: " in printed and "verdict" in printed.lower()
    first = pd.read_parquet(tmp_path / "results.parquet")
    files = sorted((tmp_path / "points").glob("*.parquet"))
    assert len(files) == 4 and (tmp_path / "report.html").exists()
    files[1].unlink()
    assert main(args) == 0
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["sessions"][-1]["skipped"] == 3
    again = pd.read_parquet(tmp_path / "results.parquet")
    pd.testing.assert_frame_equal(again.drop(columns="seconds"), first.drop(columns="seconds"))
