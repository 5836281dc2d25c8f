"""The ``double-descent`` study: end to end through the CLI with tiny sizes, its presets, the
effective parameters it reports, and its headline."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from _first_order import SmootherReference

from telescope.cli import main
from telescope.data import add_label_noise
from telescope.models import MLP
from telescope.studies import double_descent as dd
from telescope.studies import get_study, make_config
from telescope.train import Progress

COLUMNS = {"label_noise", "width", "seed", "step", "train_mse", "test_mse", "train_error",
           "test_error", "train_error_clean", "p_train", "p_test", "smoother_gap_test",
           "n_train", "n_test", "n_params", "params_per_example", "seconds"}
TINY = ["--set", "widths=2,16", "steps=30", "evals=2", "data.n_train=40", "data.n_test=30",
        "--seeds", "1", "--no-progress"]



def test_quick_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "dd"
    assert main(["study", "double-descent", "--preset", "quick", "--out", str(out), *TINY]) == 0
    assert "report:" in capsys.readouterr().out

    df = pd.read_parquet(out / "results.parquet")
    assert COLUMNS <= set(df.columns)
    # 2 widths x 2 noise levels (the quick preset's 0.2 and 0.0) x 1 seed, 2 measurements each
    assert len(df) == 8
    assert sorted(df["step"].unique()) == [15, 30]
    assert set(df["label_noise"]) == {0.0, 0.2} and set(df["width"]) == {2, 16}
    assert (df["n_train"] == 40).all() and (df["n_test"] == 30).all()
    assert (df.loc[df["width"] == 2, "n_params"] == 2 * 42 + 1).all()  # 40 inputs, 1 output
    # (the measured values are checked against a plain recomputation in
    # test_run_point_matches_a_plain_recomputation)
    # the clean training error differs from the noisy one only with label noise
    clean = df[df["label_noise"] == 0.0]
    assert (clean["train_error"] == clean["train_error_clean"]).all()
    assert df["seconds"].notna().sum() == 4  # on each point's last row

    for name in ("double_descent", "double_descent_steps"):
        assert (out / f"{name}.png").stat().st_size > 0
        assert (out / f"{name}.svg").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert "peak width" in html and "p_test at largest width" in html

    # re-running the same command resumes: nothing left to compute
    assert main(["study", "double-descent", "--preset", "quick", "--out", str(out), *TINY]) == 0
    assert "0 computed now" in capsys.readouterr().out


def test_full_preset_builds_and_runs_with_tiny_overrides(tmp_path):
    study = get_study("double-descent")
    full = make_config(study, "full", {})
    assert full.data.name == "mnist" and full.data.classes == (3, 5)
    assert full.data.n_train == 1000 and full.seeds == 5 and full.device == "auto"
    assert max(full.widths) >= 1024 and full.label_noise == (0.2, 0.0)
    # MNIST needs its files: a clear error naming the setting, before anything runs
    with pytest.raises(ValueError, match="data.path"):
        dd.points(full)
    with pytest.raises(ValueError, match="data.path"):
        dd.run_point(full, {"width": 2, "label_noise": 0.2, "seed": 0}, Progress())
    located = make_config(study, "full", {"data.path": str(tmp_path)})
    assert len(dd.points(located)) == len(full.widths) * 2 * 5
    with pytest.raises(ValueError, match="MNIST"):  # no IDX files there
        dd.run_point(located, dd.points(located)[0], Progress())

    tiny = make_config(study, "full", {
        "data.name": "digits", "data.n_train": "30", "data.n_test": "20", "widths": "3",
        "steps": "10", "evals": "2", "seeds": "1", "device": "cpu", "dtype": "float64"})
    rows = dd.run_point(tiny, dd.points(tiny)[0], Progress())
    assert [r["step"] for r in rows] == [5, 10]
    assert rows[-1]["n_params"] == 3 * 66 + 1  # 64 pixels
    assert COLUMNS - {"label_noise", "width", "seed"} <= set(rows[-1])


def test_training_error_is_scored_against_the_noisy_targets():
    data = dd.BinaryData(n_train=40, n_test=10)
    cfg = dd.DoubleDescentConfig(data=data, widths=(2,), steps=2, evals=1)
    # every training target flipped: the noisy and the clean error are complementary
    (row,) = dd.run_point(cfg, {"width": 2, "label_noise": 1.0, "seed": 1}, Progress())
    assert row["train_error"] + row["train_error_clean"] == pytest.approx(1.0)
    ds = dd.load_binary_task(data)
    assert set(ds.y_train.flatten().tolist()) == {-1.0, 1.0} and ds.y_train.shape == (40, 1)


def test_run_point_matches_a_plain_recomputation():
    """One noisy point, three full-batch momentum steps: the network's errors recomputed from a
    plain training loop, the effective parameters and the smoother's prediction from explicit
    per-point Jacobians and the smoother recursion (:class:`_first_order.SmootherReference`)."""
    data = dd.BinaryData(n_train=40, n_test=30)
    cfg = dd.DoubleDescentConfig(data=data, widths=(16,), steps=3, evals=1, dtype="float64")
    point = {"width": 16, "label_noise": 0.2, "seed": 1}
    (row,) = dd.run_point(cfg, point, Progress())

    clean = dd.load_binary_task(data, dtype=torch.float64)
    noisy = add_label_noise(clean, 0.2, seed=1)
    x, y, xt, yt = noisy.x_train, noisy.y_train, noisy.x_test, noisy.y_test
    assert (y != clean.y_train).sum() == 8                     # 20 % of the 40 labels flipped
    torch.manual_seed(1)
    model = MLP(x.shape[1], [16], 1, parametrization="ntk").double()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    ref = SmootherReference(model, x, {"test": xt}, lr=cfg.lr, momentum=cfg.momentum)
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        ref.step(torch.arange(40))
        opt.step()
    with torch.no_grad():
        f, ft = model(x), model(xt)

    def error(pred, target):
        return float((torch.sign(pred) != target).double().mean())

    assert row["train_mse"] == pytest.approx(float(((f - y) ** 2).mean()), rel=1e-10)
    assert row["test_mse"] == pytest.approx(float(((ft - yt) ** 2).mean()), rel=1e-10)
    assert row["train_error"] == error(f, y)
    assert row["train_error_clean"] == error(f, clean.y_train)
    assert row["test_error"] == error(ft, yt)
    assert row["p_train"] == pytest.approx(ref.effective_parameters("train"), rel=1e-8)
    assert row["p_test"] == pytest.approx(ref.effective_parameters("test"), rel=1e-8)
    gap = float((ref.predict("test", y) - ft.reshape(-1)).abs().mean())
    assert row["smoother_gap_test"] == pytest.approx(gap, rel=1e-6)
    assert row["n_params"] == 16 * 42 + 1 and row["params_per_example"] == (16 * 42 + 1) / 40


def test_p_train_increases_with_width():
    """Without label noise and with few training points, wider networks fit their training
    labels more closely and lean more on them: p_train rises with width towards n."""
    cfg = dd.DoubleDescentConfig(data=dd.BinaryData(n_train=30, n_test=20), widths=(1, 4, 32),
                                 label_noise=(0.0,), steps=300, lr=0.5, momentum=0.0, evals=1,
                                 seeds=1, dtype="float64")
    p = {}
    for point in dd.points(cfg):
        (row,) = dd.run_point(cfg, point, Progress())
        p[point["width"]] = row["p_train"]
    assert p[1] < p[4] < p[32] <= 30 * 1.05
    assert p[32] - p[1] > 5


def test_headline_finds_the_peak():
    rows = []
    for noise, mse in ((0.2, {2: 1.0, 8: 3.0, 64: 0.8}), (0.0, {2: 0.7, 8: 0.6, 64: 0.5})):
        for width, value in mse.items():
            for seed in (0, 1):
                rows.append({"label_noise": noise, "width": width, "seed": seed, "step": 10,
                             "test_mse": value + 0.01 * seed, "test_error": 0.1,
                             "train_mse": 0.0, "p_train": float(width), "p_test": 10.0 / width,
                             "n_train": 50})
                rows.append({**rows[-1], "step": 5, "test_mse": 99.0})  # not the last step
    h = dd.headline(pd.DataFrame(rows), dd.DoubleDescentConfig())
    assert h["peak width"] == 8 and h["largest width"] == 64
    assert h["peak test MSE"] == pytest.approx(3.005)
    assert h["test MSE at largest width"] == pytest.approx(0.805)
    assert h["p_train at largest width"] == 64 and h["p_test at peak"] == pytest.approx(1.25)
    assert h["p_train at smallest width"] == 2
    assert h["test misclassification at peak"] == pytest.approx(0.1)
    assert h["noise-free test MSE at peak width"] == pytest.approx(0.605)
    assert h["seeds"] == 2


def test_config_validation():
    study = get_study("double-descent")
    with pytest.raises(ValueError, match="widths"):
        make_config(study, "quick", {"widths": "0,4"})
    with pytest.raises(ValueError, match="label_noise"):
        make_config(study, "quick", {"label_noise": "1.5"})
    with pytest.raises(ValueError, match="classes"):
        make_config(study, "quick", {"data.classes": "3,3"})
