"""``grokking``: delayed generalization through the telescoping lens (paper Figs 4, 11-13).

Two settings, each trained long with errors and effective parameters logged on a log step axis:

- ``polynomial``: Kumar et al.'s task (:func:`telescope.data.polynomial_task`) fit by the
  two-layer network ``f(x) = alpha / N sum_i phi(w_i . x)`` with
  ``phi = polynomial_activation(., epsilon)``; squared loss, full-batch gradient descent, for
  each ``(epsilon, alpha)`` of the sweep (small ``epsilon``: the initial kernel is badly
  aligned with the target and a lazy, large-``alpha`` network fits the training set long before
  it generalizes; a small ``alpha`` learns features from the start and generalizes with little
  delay).
- ``digits``: Omnigrok's large-initialization MLP (:class:`telescope.models.MLP` with ``alpha``
  scaling the initial weights) on the bundled 8x8 digits, MSE on one-hot targets, SGD with
  weight decay, ``alpha`` = 6 against 1.

Effective parameters ``p_train`` / ``p_test`` come from :class:`telescope.Smoother` (recorded at
every step, read at the logged steps) on the training set and a probe subset of the test set.
"""

from __future__ import annotations

import math
from dataclasses import field
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
import torch.nn.functional as F
from annotated_types import Ge, Lt
from torch import nn

import telescope
from telescope import plotting as fg
from telescope.data import load_digits, polynomial_task
from telescope.errors import UsageError
from telescope.models import MLP, TwoLayerPolynomialNet
from telescope.studies.base import Progress, Study
from telescope.studies.constraints import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
)
from telescope.train import fit, log_spaced_steps


@config_dataclass
class PolynomialSetting:
    """Kumar et al.'s polynomial task and two-layer network (``epsilons=`` empty: skip it)."""

    epsilons: tuple[float, ...] = (0.02, 0.2)
    # output scales, f = alpha/N sum phi(w.x) (large: lazy)
    alphas: tuple[PositiveFloat, ...] = (10.0,)
    n_train: PositiveInt = 550
    n_test: PositiveInt = 1000
    n_probe: PositiveInt = 300    # test points tracked by the smoother
    d: PositiveInt = 100
    width: PositiveInt = 500      # N hidden units
    lr: PositiveFloat = 4.0       # times N / alpha^2 (the mean-field scaling of the step)
    weight_decay: NonNegativeFloat = 0.0
    steps: PositiveInt = 20000


@config_dataclass
class DigitsSetting:
    """Omnigrok's large-initialization MLP on the bundled digits (``alphas=`` empty: skip)."""

    alphas: tuple[PositiveFloat, ...] = (6.0, 1.0)
    classes: tuple[int, ...] = ()  # empty: all ten digits
    n_train: PositiveInt = 200
    n_test: PositiveInt = 500
    n_probe: PositiveInt = 300
    hidden: tuple[PositiveInt, ...] = (128, 128)
    lr: PositiveFloat = 1e-3
    momentum: Annotated[float, Ge(0), Lt(1)] = 0.9
    weight_decay: NonNegativeFloat = 0.1
    batch_size: PositiveInt = 50
    steps: PositiveInt = 100000


@config_dataclass
class GrokkingConfig:
    """Config of the ``grokking`` study; ``--set digits.steps=2000``, ``--set
    polynomial.epsilons=0.02,0.2``."""

    polynomial: PolynomialSetting = field(default_factory=PolynomialSetting)
    digits: DigitsSetting = field(default_factory=DigitsSetting)
    n_log: Annotated[int, Ge(2)] = 40   # logged steps, log-spaced over training (plus step 0)
    seeds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.polynomial.epsilons and self.polynomial.alphas) and not self.digits.alphas:
            raise UsageError("nothing to run: polynomial.epsilons (or polynomial.alphas) and "
                             "digits.alphas are empty")
        g = self.digits
        if g.classes and (len(g.classes) < 2 or len(set(g.classes)) != len(g.classes)
                          or not all(0 <= c <= 9 for c in g.classes)):
            raise UsageError(f"digits.classes must be empty (all ten digits) or at least two "
                             f"different digits 0-9, got {g.classes}")


PRESETS = {
    "quick": {"seeds": 1, "n_log": 40,
              "polynomial.epsilons": (0.1,), "polynomial.alphas": (2.0, 0.1),
              "polynomial.n_train": 200, "polynomial.n_test": 500, "polynomial.n_probe": 200,
              "polynomial.d": 40, "polynomial.width": 200, "polynomial.steps": 8000,
              "digits.classes": (3, 5), "digits.n_train": 100, "digits.n_test": 260,
              "digits.n_probe": 150, "digits.hidden": (128, 128), "digits.steps": 5000},
    "full": {"seeds": 3, "digits.n_train": 1000, "digits.n_test": 797, "digits.n_probe": 500,
             "digits.hidden": (200, 200), "digits.steps": 100000},
}


def points(config: GrokkingConfig) -> list[dict]:
    """The sweep: every (epsilon, alpha) (polynomial) and alpha (digits) for every seed."""
    seeds = range(config.seed, config.seed + config.seeds)
    out = [{"task": "polynomial", "alpha": float(a), "epsilon": float(e), "seed": s}
           for e in config.polynomial.epsilons for a in config.polynomial.alphas for s in seeds]
    out += [{"task": "digits", "alpha": float(a), "epsilon": 0.0, "seed": s}
            for a in config.digits.alphas for s in seeds]
    return out


def _errors(model: nn.Module, data, classify: bool) -> dict:
    """Train/test MSE (against one-hot targets when classifying) and classification errors
    (NaN for the regression task)."""
    out_tr, out_te = model(data.x_train), model(data.x_test)
    if classify:
        y_tr, y_te = data.one_hot(data.y_train), data.one_hot(data.y_test)
        err_tr = float((out_tr.argmax(1) != data.y_train).float().mean())
        err_te = float((out_te.argmax(1) != data.y_test).float().mean())
    else:
        y_tr, y_te = data.y_train, data.y_test
        err_tr = err_te = math.nan
    return {"train_mse": float(F.mse_loss(out_tr, y_tr)),
            "test_mse": float(F.mse_loss(out_te, y_te)),
            "train_error": err_tr, "test_error": err_te}


def run_point(config: GrokkingConfig, point: dict, progress: Progress) -> list[dict]:
    """Train one setting, logging errors and effective parameters at log-spaced steps."""
    seed = point["seed"]
    gen = torch.Generator().manual_seed(seed)
    if point["task"] == "polynomial":
        s = config.polynomial
        data = polynomial_task(s.n_train, s.n_test, s.d, epsilon=point["epsilon"], seed=seed)
        model = TwoLayerPolynomialNet(s.d, s.width, point["alpha"], point["epsilon"], gen)
        lr = s.lr * s.width / point["alpha"] ** 2
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=s.weight_decay)
        y_train, batch, classify = data.y_train, None, False
    else:
        s = config.digits
        data = load_digits(s.n_train, s.n_test, classes=s.classes or None, seed=seed)
        torch.manual_seed(seed)   # MLP init draws from torch's global generator
        model = MLP(data.x_train.shape[1], s.hidden, data.n_classes, alpha=point["alpha"])
        opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum,
                              weight_decay=s.weight_decay)
        y_train, batch, classify = data.one_hot(data.y_train), min(s.batch_size, s.n_train), True
    smoother = telescope.Smoother(model, opt, data.x_train, y_train,
                                  probes={"test": data.x_test[: s.n_probe]}, every=s.steps + 1)
    with smoother:
        history = fit(model, opt, data.x_train, y_train, steps=s.steps, batch_size=batch,
                      generator=gen, eval_at=log_spaced_steps(s.steps, config.n_log, zero=True),
                      evaluate=lambda m: _errors(m, data, classify), callbacks=[smoother],
                      progress=progress)
    return [{**point, "step": int(r["step"]), **{k: r[k] for k in _COLUMNS}}
            for r in history.rows]


#: The measured columns of a row, in the table's order.
_COLUMNS = ("train_mse", "test_mse", "train_error", "test_error", "p_train", "p_test")


def _settings(df: pd.DataFrame):
    for (task, alpha, eps), sub in df.groupby(["task", "alpha", "epsilon"], sort=False):
        label = f"eps={eps:g} alpha={alpha:g}" if task == "polynomial" else f"alpha={alpha:g}"
        yield task, label, sub


def figures(df: pd.DataFrame, config: GrokkingConfig, out_dir: Path) -> list[Path]:
    """Per setting (columns): error by step (top), p_train / p_test by step (bottom)."""
    paths = []
    for task in ("polynomial", "digits"):
        tdf = df[df["task"] == task]
        if tdf.empty:
            continue
        settings = list(_settings(tdf))
        with fg.paper_style():
            fig, axes = fg.new_figure(2, len(settings), sharex=True)
            for j, (_, label, sub) in enumerate(settings):
                sub = sub[sub["step"] > 0]
                ax = axes[0, j]
                cols = ([("train_error", "train"), ("test_error", "test")] if task == "digits"
                        else [("train_mse", "train"), ("test_mse", "test")])
                for col, split in cols:
                    fg.plot_mean_spread(ax, sub, "step", col, label=split, marker=None,
                                        color=fg.COLORS[split])
                fg.log_axis(ax, "x")
                if task == "polynomial":
                    fg.log_axis(ax, "y")
                ax.set_title(label)
                ax.set_ylabel("misclassification" if task == "digits" else "MSE")
                ax.legend()
                ax = axes[1, j]
                for col in ("p_train", "p_test"):
                    fg.plot_mean_spread(ax, sub, "step", col, label=col, marker=None,
                                        color=fg.COLORS[col])
                fg.log_axis(ax, "x")
                ax.set_xlabel("optimization step")
                ax.set_ylabel("effective parameters")
                ax.legend()
            fg.panel_label(axes[0, 0], "a")
            fg.panel_label(axes[1, 0], "b")
            paths.append(fg.save_figure(fig, out_dir, f"grokking_{task}"))
    return paths


def _first_step(sub: pd.DataFrame, col: str, threshold: float) -> float:
    """First logged step (mean over seeds) with ``col`` at or below ``threshold``."""
    mean = sub.groupby("step")[col].mean().sort_index()
    hit = mean[mean <= threshold]
    return float(hit.index[0]) if len(hit) else math.nan


FIT_FRACTION = 0.1
"""Polynomial task: a loss counts as fit once it is below this fraction of its step-0 value."""


def fit_steps(sub: pd.DataFrame, fraction: float = FIT_FRACTION) -> tuple[float, float]:
    """``(train fit, test fit)`` of one polynomial setting: the first logged steps at which the
    mean train MSE, respectively test MSE, is below ``fraction`` of its step-0 value (NaN if
    never). Their ratio is the delay of generalization."""
    start = sub[sub["step"] == sub["step"].min()]
    return (_first_step(sub, "train_mse", fraction * float(start["train_mse"].mean())),
            _first_step(sub, "test_mse", fraction * float(start["test_mse"].mean())))


def headline(df: pd.DataFrame, config: GrokkingConfig) -> dict:
    """Per setting: when the training set is fit, when the test set is, how far apart (the
    delay of generalization), and the final errors and effective parameters."""
    out: dict = {}
    for task, label, sub in _settings(df):
        final = sub[sub["step"] == sub["step"].max()]
        key = f"{task} {label}"
        if task == "digits":
            te = "test_error"
            train_fit = _first_step(sub, "train_error", 0.01)
            drop = sub.groupby("step")[te].mean().sort_index()
            level = drop.iloc[0] - 0.5 * (drop.iloc[0] - drop.min())   # halfway down
            test_fit = _first_step(sub, te, float(level))
            out[f"{key}: step train error <= 1%"] = train_fit
            out[f"{key}: step test error halfway down"] = test_fit
        else:
            te = "test_mse"
            train_fit, test_fit = fit_steps(sub)
            pct = f"{FIT_FRACTION:.0%}"
            out[f"{key}: step train MSE < {pct} of start"] = train_fit
            out[f"{key}: step test MSE < {pct} of start"] = test_fit
            at_fit = sub[sub["step"] == train_fit] if math.isfinite(train_fit) else sub.iloc[:0]
            if len(at_fit):
                t0 = float(sub.loc[sub["step"] == sub["step"].min(), "test_mse"].mean())
                out[f"{key}: test MSE / start when train fit"] = \
                    float(at_fit["test_mse"].mean()) / t0
        out[f"{key}: delay (test step / train step)"] = (
            test_fit / train_fit if train_fit > 0 and math.isfinite(test_fit) else math.nan)
        out[f"{key}: final {te}"] = float(final[te].mean())
        out[f"{key}: final p_train"] = float(final["p_train"].mean())
        out[f"{key}: final p_test"] = float(final["p_test"].mean())
    return out


GUIDE = """
Grokking, delayed generalization, seen through effective parameters (paper Figs 4, 11-13).

- **grokking_polynomial**: Kumar et al.'s task (target `(beta . x)^2 / 2`, one hidden direction
  `beta` in `d` dimensions), fit by the two-layer network `f = alpha / N sum phi(w_i . x)` with
  activation `phi(h) = h + epsilon h^2 / 2`, centered at its initial function, full-batch
  gradient descent with step `lr N / alpha^2`; one column per (epsilon, alpha). Top: train and
  test MSE by step (log axes); bottom: effective parameters `p_train` and `p_test` of the
  telescoping smoother.
- **grokking_digits**: Omnigrok's MLP with initial weights scaled by alpha on the 8x8 digits, MSE
  on one-hot targets, SGD with weight decay; one column per alpha. Top: misclassification.

Polynomial task: alpha sets laziness. With a large alpha the weights barely move per unit of
function change, so the network first fits the training set with its initial kernel, whose
quadratic features are weak (small epsilon) and not aligned with `beta`: the training MSE falls
while the test MSE stays high (it even rises at first), and the test MSE only follows once the
features have turned towards `beta`. With a small alpha (rich from the start) train and test
fall nearly together. The `quick` preset (d = 40, 200 training points, 200 hidden units,
epsilon = 0.1, alpha = 2 against 0.1, 8000 steps) shows a moderate delay, not the sharp
plateau-then-drop of the paper: read the headline's steps at which train and test MSE first
fall below 10 % of their starting values, their ratio (the delay), and the test MSE (relative
to its start) at the step the training set is fit. A larger alpha delays generalization further
but needs many more steps (with alpha = 10 the test MSE is still at a third of its start after
20000 steps while the training MSE is below 1e-5): `--set polynomial.alphas=10,0.1
polynomial.steps=20000`.

Digits: with a large alpha the training error reaches zero long before the test error drops;
with alpha = 1 both fall together. In the paper, generalization coincides with `p_test` falling
below `p_train`: the model starts to use fewer effective parameters on test inputs than on
training inputs. The headline gives, per setting, the step where the training error first
reaches about zero (misclassification <= 1 %), the step where the test error is halfway down,
and the final effective parameters.
"""

STUDY = Study(
    name="grokking",
    description="Grokking: polynomial task (epsilon, alpha) and large-init MLP on digits "
                "(alpha 6 vs 1), errors and effective parameters by step",
    config_cls=GrokkingConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
)
