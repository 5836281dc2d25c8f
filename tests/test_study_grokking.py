"""The grokking study: tiny end-to-end run through the CLI and the full preset's config."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from _first_order import SmootherReference

from telescope.cli import main
from telescope.data import polynomial_task
from telescope.models import TwoLayerPolynomialNet
from telescope.studies import get_study, make_config
from telescope.studies.grokking import STUDY, fit_steps
from telescope.train import log_spaced_steps

TINY = ["--set", "polynomial.epsilons=0.05", "polynomial.n_train=20", "polynomial.n_test=30",
        "polynomial.n_probe=10", "polynomial.d=8", "polynomial.width=16",
        "polynomial.steps=12", "digits.n_train=30", "digits.n_test=40", "digits.n_probe=10",
        "digits.hidden=16", "digits.steps=12", "digits.batch_size=10", "n_log=5"]



def test_quick_tiny_end_to_end(tmp_path):
    out = tmp_path / "grok"
    assert main(["study", "grokking", "--preset", "quick", "--out", str(out), *TINY,
                 "--no-progress"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["task"]) == {"polynomial", "digits"}
    assert set(df.loc[df["task"] == "digits", "alpha"]) == {6.0, 1.0}
    logged = log_spaced_steps(12, 5, zero=True)
    for _, sub in df.groupby(["task", "alpha"]):
        assert sub["step"].tolist() == logged
    for alpha in (2.0, 0.1):
        sub = df[(df["task"] == "polynomial") & (df["alpha"] == alpha)].set_index("step")
        ref = _polynomial_replay(alpha)
        for col in ("train_mse", "test_mse", "p_train", "p_test"):
            assert sub[col].tolist() == pytest.approx(ref[col], rel=1e-4, abs=1e-9), (alpha, col)
    for alpha in (6.0, 1.0):
        sub = df[(df["task"] == "digits") & (df["alpha"] == alpha)].set_index("step")
        ref = _digits_replay(alpha)
        for col in ("train_mse", "test_mse"):
            assert sub[col].tolist() == pytest.approx(ref[col], rel=1e-5), (alpha, col)
        for col in ("train_error", "test_error"):
            assert (sub[col] - ref[col]).abs().max() < 1e-6, (alpha, col)  # steps of 1/40
    for name in ("grokking_polynomial", "grokking_digits"):
        assert (out / f"{name}.png").stat().st_size > 0
        assert (out / f"{name}.svg").exists()
    assert (out / "report.html").exists()


def _polynomial_replay(alpha: float) -> dict[str, list[float]]:
    """The TINY polynomial point written out plainly: full-batch GD with step ``4 N / alpha^2``;
    the effective parameters from the smoother recursion with explicit per-point Jacobians
    (:class:`_first_order.SmootherReference`). Step 0: the centered net outputs exactly 0, so
    the MSE is the targets' mean square."""
    data = polynomial_task(20, 30, 8, epsilon=0.05, seed=0)
    x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test
    model = TwoLayerPolynomialNet(8, 16, alpha, 0.05, torch.Generator().manual_seed(0))
    lr = 4.0 * 16 / alpha ** 2
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ref = SmootherReference(model, x, {"test": xt[:10]}, lr=lr)
    out: dict[str, list[float]] = {k: [] for k in ("train_mse", "test_mse", "p_train", "p_test")}

    def log():
        with torch.no_grad():
            out["train_mse"].append(float(((model(x) - y) ** 2).mean()))
            out["test_mse"].append(float(((model(xt) - yt) ** 2).mean()))
        out["p_train"].append(ref.effective_parameters("train"))
        out["p_test"].append(ref.effective_parameters("test"))

    log()
    assert out["train_mse"][0] == pytest.approx(float((y ** 2).mean()), rel=1e-6)
    for step in range(1, 13):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        ref.step(torch.arange(20))
        opt.step()
        if step in log_spaced_steps(12, 5, zero=True):
            log()
    return out


def _digits_replay(alpha: float) -> dict[str, list[float]]:
    """The TINY digits point written out plainly: MLP with initial weights scaled by alpha,
    SGD (momentum 0.9, weight decay 0.1) on the MSE against one-hot targets, batches of 10."""
    from telescope.data import load_digits
    from telescope.models import MLP

    data = load_digits(30, 40, classes=(3, 5), seed=0)
    x, xt = data.x_train, data.x_test
    y, yt = F.one_hot(data.y_train, 2).float(), F.one_hot(data.y_test, 2).float()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP(64, (16,), 2, alpha=alpha)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=0.1)
    out: dict[str, list[float]] = {k: [] for k in ("train_mse", "test_mse", "train_error",
                                                   "test_error")}

    def log():
        with torch.no_grad():
            f, ft = model(x), model(xt)
        out["train_mse"].append(float(((f - y) ** 2).mean()))
        out["test_mse"].append(float(((ft - yt) ** 2).mean()))
        out["train_error"].append(float((f.argmax(1) != data.y_train).double().mean()))
        out["test_error"].append(float((ft.argmax(1) != data.y_test).double().mean()))

    log()
    for step in range(1, 13):
        idx = torch.randperm(30, generator=gen)[:10]
        opt.zero_grad()
        ((model(x[idx]) - y[idx]) ** 2).mean().backward()
        opt.step()
        if step in log_spaced_steps(12, 5, zero=True):
            log()
    return out


def test_full_preset_config_builds():
    study = get_study("grokking")
    config = make_config(study, "full", {})
    assert config.digits.alphas == (6.0, 1.0)
    assert config.digits.n_train == 1000 and config.seeds == 3
    assert len(study.points(config)) == 3 * (len(config.polynomial.epsilons) + 2)
    with pytest.raises(ValueError):
        make_config(study, "quick", {"polynomial.epsilons": "", "digits.alphas": ""})


def test_log_steps():
    steps = log_spaced_steps(1000, 10, zero=True)
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
