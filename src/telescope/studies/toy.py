"""``toy``: kernel ridge regression with the infinite-width NTK on a noisy random teacher.

A small, fast study that exercises the whole machinery (sweep, resume, executors, figures,
report) and serves as the template for real studies: copy this file, change the config, the
sweep and ``run_point``, and add one import line to ``telescope/studies/__init__.py``.

The sweep is ridge x seed. Each point draws a teacher regression task
(:func:`telescope.data.teacher_regression`, noisy training targets, clean test targets),
computes the infinite-width NTK of a ReLU network (:func:`telescope.infinite_ntk`) and reports
the train and test mean squared error of gradient flow with that kernel
(:func:`telescope.kernel_regression`) at several training times, converged included: one tidy
row per (point, time).
"""

from __future__ import annotations

import math
from dataclasses import field
from pathlib import Path

import pandas as pd
import torch

from telescope import plotting as fg
from telescope.data import teacher_regression
from telescope.errors import UsageError
from telescope.infinite import infinite_ntk
from telescope.kernels import kernel_regression
from telescope.studies.base import Progress, Study
from telescope.studies.constraints import (
    NonEmpty,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    config_dataclass,
)


@config_dataclass
class TeacherData:
    """The synthetic task (:func:`telescope.data.teacher_regression`)."""

    n_train: PositiveInt = 800
    n_test: PositiveInt = 800
    d: PositiveInt = 16
    noise: NonNegativeFloat = 0.5
    teacher_width: PositiveInt = 64


@config_dataclass
class ToyConfig:
    """Config of the ``toy`` study; ``--set data.n_train=64``, ``--set ridges=0.1,1,10``."""

    data: TeacherData = field(default_factory=TeacherData)
    depth: NonNegativeInt = 1                        # hidden layers of the NTK's ReLU network
    ridges: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 100.0)
    # lr * t; inf: converged
    times: NonEmpty[NonNegativeFloat] = (1.0, 10.0, 100.0, 1e3, 1e4, math.inf)
    seeds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.ridges or any(not r >= 0 for r in self.ridges):
            raise UsageError(f"ridges must be a non-empty list of numbers >= 0, got {self.ridges}")


PRESETS = {
    "quick": {},
    "full": {"data.n_train": 2000, "data.n_test": 2000, "seeds": 5,
             "ridges": (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3)},
}


def points(config: ToyConfig) -> list[dict]:
    """The sweep: every ridge for every seed."""
    seeds = range(config.seed, config.seed + config.seeds)
    return [{"ridge": float(r), "seed": s} for r in config.ridges for s in seeds]


def run_point(config: ToyConfig, point: dict, progress: Progress) -> list[dict]:
    """Train and test MSE of NTK gradient flow at every time of ``config.times``."""
    d = config.data
    data = teacher_regression(d.n_train, d.n_test, d.d, noise=d.noise, seed=point["seed"],
                              width=d.teacher_width, dtype=torch.float64)
    progress.set(len(config.times))
    k_train = infinite_ntk(data.x_train, depth=config.depth)["ntk"]
    k_test = infinite_ntk(data.x_test, data.x_train, depth=config.depth)["ntk"]
    # one eigendecomposition for all times (inf: converged)
    test, train = kernel_regression(k_train, k_test, data.y_train, ridge=point["ridge"],
                                    t=list(config.times), return_train=True)
    rows = []
    for i, t in enumerate(config.times):
        rows.append({**point, "t": float(t),
                     "train_mse": float(((train[i] - data.y_train) ** 2).mean()),
                     "test_mse": float(((test[i] - data.y_test) ** 2).mean())})
        progress.update()
    return rows


def estimate_memory(config: ToyConfig, point: dict) -> int:
    """Peak bytes of one point: the float64 ``[n_train, n_train]`` and ``[n_test, n_train]``
    kernels with the temporaries of their recursion and of the eigendecomposition.

    Measured (peak RSS of :func:`run_point`): about 14 ``[n_train, n_train]`` float64 arrays
    live at once while the train kernel is built (:func:`telescope.infinite_ntk`) and about 10
    ``[n_test, n_train]`` ones while the test kernel is; their sum is an upper bound (within
    about 1.5x).
    """
    n_train, n_test = config.data.n_train, config.data.n_test
    return 8 * (15 * n_train * n_train + 10 * n_test * n_train)


def figures(df: pd.DataFrame, config: ToyConfig, out_dir: Path) -> list[Path]:
    """Converged train/test MSE by ridge; test MSE by training time for each ridge."""
    with fg.paper_style():
        fig, axes = fg.new_figure(1, 2)
        ax = axes[0, 0]
        conv = df[df["t"] == math.inf]
        for split in ("train", "test"):
            fg.plot_mean_spread(ax, conv, "ridge", f"{split}_mse", label=split,
                                color=fg.COLORS[split])
        fg.log_axis(ax, "x")
        ax.set_xlabel("ridge")
        ax.set_ylabel("mean squared error (converged)")
        ax.legend()
        fg.panel_label(ax, "a")

        ax = axes[0, 1]
        finite = df[df["t"] < math.inf]
        for i, (ridge, sub) in enumerate(finite.groupby("ridge")):
            fg.plot_mean_spread(ax, sub, "t", "test_mse", label=f"ridge {ridge:g}",
                                color=fg.color_cycle(i))
        fg.log_axis(ax, "x")
        ax.set_xlabel("training time (lr x steps)")
        ax.set_ylabel("test MSE")
        ax.legend(loc="center right")
        fg.panel_label(ax, "b")
        return [fg.save_figure(fig, out_dir, "toy_mse")]


def headline(df: pd.DataFrame, config: ToyConfig) -> dict:
    """The best ridge (lowest mean converged test MSE over seeds) and its errors."""
    conv = df[df["t"] == math.inf].groupby("ridge")[["train_mse", "test_mse"]].mean()
    best = conv["test_mse"].idxmin()
    return {"best ridge": float(best),
            "test MSE at best ridge": float(conv.loc[best, "test_mse"]),
            "train MSE at best ridge": float(conv.loc[best, "train_mse"]),
            "test MSE at smallest ridge": float(conv["test_mse"].iloc[0]),
            "seeds": int(df["seed"].nunique())}


GUIDE = """
Kernel ridge regression with the infinite-width NTK of a ReLU network, on a random ReLU teacher
whose training targets carry Gaussian noise (the test targets are clean).

- **Panel a**: converged train and test mean squared error against the ridge (log axis); lines
  are the mean over seeds, the band spans the seeds' min and max. Small ridges interpolate the
  noise (train error near 0, test error high); large ridges underfit. The best ridge sits in
  between.
- **Panel b**: test error through gradient-flow training time for each ridge. Early stopping
  acts like a ridge: the test error of a small ridge dips before it rises to its converged value.

Everything is in `results.parquet`: one row per (ridge, seed, time).
"""

STUDY = Study(
    name="toy",
    description="NTK kernel ridge regression on a noisy teacher: test error by ridge and time "
                "(a fast template study)",
    config_cls=ToyConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
    estimate_memory=estimate_memory,
)
