"""The grokking study: tiny end-to-end run through the CLI and the full preset's config."""

from __future__ import annotations

import pandas as pd
import pytest

from telescope.cli import main
from telescope.studies import get_study, make_config
from telescope.studies.grokking import STUDY, TwoLayerPolynomialNet, fit_steps, log_steps

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


def test_polynomial_points_cross_epsilon_and_alpha():
    study = get_study("grokking")
    config = make_config(study, "quick", {"polynomial.epsilons": "0.1,0.2",
                                          "polynomial.alphas": "2,0.1", "digits.alphas": ""})
    pts = study.points(config)
    assert {(p["epsilon"], p["alpha"]) for p in pts} == {(0.1, 2.0), (0.1, 0.1), (0.2, 2.0),
                                                        (0.2, 0.1)}
    with pytest.raises(ValueError):
        make_config(study, "quick", {"polynomial.alphas": "0"})


def test_fit_steps_and_headline_delay():
    # train falls below 10 % at step 10, test at step 100: a delay of 10
    steps = [0, 1, 10, 100, 1000]
    rows = [{"task": "polynomial", "alpha": 2.0, "epsilon": 0.1, "seed": 0, "step": s,
             "train_mse": tr, "test_mse": te, "train_error": float("nan"),
             "test_error": float("nan"), "p_train": 1.0, "p_test": 1.0}
            for s, tr, te in zip(steps, [1.0, 0.5, 0.05, 0.01, 0.001],
                                 [1.0, 1.1, 0.6, 0.05, 0.01], strict=True)]
    df = pd.DataFrame(rows)
    assert fit_steps(df) == (10.0, 100.0)
    h = STUDY.headline(df, make_config(STUDY, "quick", {}))
    assert h["polynomial eps=0.1 alpha=2: delay (test step / train step)"] == 10.0
    assert h["polynomial eps=0.1 alpha=2: test MSE / start when train fit"] == 0.6


def _fit_steps_plain_gd(alpha: float, steps: int = 3000) -> tuple[int, int]:
    """Steps to train / test MSE below 10 % of the start, plain GD without the smoother."""
    import torch
    import torch.nn.functional as F

    from telescope.data import polynomial_task

    torch.manual_seed(0)
    data = polynomial_task(100, 300, 20, epsilon=0.1, seed=0)
    model = TwoLayerPolynomialNet(20, 100, alpha, 0.1, torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=4.0 * 100 / alpha ** 2)
    fit = {"train": None, "test": None}
    with torch.no_grad():
        start = {"train": F.mse_loss(model(data.x_train), data.y_train).item(),
                 "test": F.mse_loss(model(data.x_test), data.y_test).item()}
    for step in range(1, steps + 1):
        opt.zero_grad()
        F.mse_loss(model(data.x_train), data.y_train).backward()
        opt.step()
        with torch.no_grad():
            for split, x, y in (("train", data.x_train, data.y_train),
                                ("test", data.x_test, data.y_test)):
                if fit[split] is None and F.mse_loss(model(x), y).item() < 0.1 * start[split]:
                    fit[split] = step
        if fit["test"] is not None:
            break
    assert fit["train"] is not None and fit["test"] is not None, fit
    return fit["train"], fit["test"]


def test_lazy_polynomial_net_generalizes_late():
    """The effect the quick preset shows, at a smaller size: the lazy net (alpha = 2) fits the
    training set long before the test set; the rich one (alpha = 0.1) fits both nearly
    together."""
    lazy_train, lazy_test = _fit_steps_plain_gd(2.0)
    rich_train, rich_test = _fit_steps_plain_gd(0.1)
    assert lazy_test - lazy_train > 5 * (rich_test - rich_train)
    assert lazy_test / lazy_train > 2.5
    assert rich_test < lazy_train
