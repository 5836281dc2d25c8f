"""``double-descent``: test error and effective parameters through a width sweep (paper Figs 3, 9).

Jeffares, Curth & van der Schaar (NeurIPS 2024, Section 4.1) train one-hidden-layer ReLU networks
of increasing width with the squared loss on a binary task, with and without 20 % label noise.
With noise, the test error rises to a peak where the network can just interpolate the training
set (about as many parameters as training points) and falls again for wider networks. Writing
the trained network as a linear smoother of the training labels (:class:`telescope.Smoother`),
the effective parameters on the training set ``p_train`` rise with width up to about ``n`` (every
training point fits its own label) while those on the test set ``p_test`` peak at the threshold
and then *fall*: past the threshold the network keeps fitting its training points but leans less
and less on single labels to predict new points.

One sweep point is (width, label noise, seed). The network ``MLP(d, [width], 1)`` is trained on
``+1`` / ``-1`` targets (the first class of ``data.classes`` is ``+1``; one output) with
``F.mse_loss`` by SGD with heavy-ball momentum (full batch unless ``batch_size`` is set) with a
:class:`~telescope.Smoother` attached; at ``evals`` evenly spaced steps a row records the train
and test MSE and misclassification error of the network (training targets as trained on, i.e.
noisy, and also the clean ones; test targets are clean), ``p_train`` and ``p_test``, and how far
the smoother's prediction is from the network on the test points (``smoother_gap_test``: the
telescoping model is first order, and the Smoother's momentum buffer is first order too). Label
noise flips the sign of a fixed fraction of the training targets
(:func:`telescope.data.add_label_noise`, drawn with the point's seed); the seed also draws the
initialization.

The ``quick`` preset (MNIST-1D 3 vs 5, 200 training and 300 test points, 40 inputs: a network of
width ``w`` has ``42 w + 1`` parameters, so the interpolation threshold is near ``w = 5``; in
practice the test-error peak is at 8 to 12) shows the peak and the divergence of ``p_train`` and
``p_test`` on a laptop CPU in minutes. It uses the NTK parametrization
(``parametrization="ntk"``), whose tangent kernel does not grow with width, so one learning rate
trains widths 1 to 512 stably and about equally fast; ``parametrization="standard"`` (PyTorch's
default layers) needs a smaller learning rate at large widths. Momentum 0.9 reaches
interpolation in 1500 steps where plain gradient descent needs several times more.

The ``full`` preset moves to the paper's scale (its exact sizes are not restated here): 8x8 MNIST
3 vs 5 read from IDX files (``--set data.path=DIR``), 1000 training points (so the threshold is
near width 15), more widths, steps and seeds, for a GPU (``device="auto"``). CIFAR-10 cats vs
dogs, grayscale 8x8, is ``--set data.name=cifar10`` (its classes 3 and 5 are cat and dog).
"""

from __future__ import annotations

import time
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from annotated_types import Ge, Le

from telescope import plotting as fg
from telescope.data import add_label_noise
from telescope.errors import UsageError
from telescope.lens import Smoother
from telescope.models import MLP
from telescope.studies._binary import BinaryData, check_data, load_binary_task, sign_error
from telescope.studies.base import Progress, Study, check_device
from telescope.studies.base import resolve_device as _device
from telescope.studies.constraints import NonEmpty, PositiveFloat, PositiveInt, config_dataclass
from telescope.train import evenly_spaced_steps, fit

__all__ = ["BinaryData", "DoubleDescentConfig", "load_binary_task", "check_data", "points",
           "run_point", "figures", "headline", "STUDY"]

@config_dataclass
class DoubleDescentConfig:
    """Config of ``double-descent``; e.g. ``--set widths=1,4,16,64 steps=500 data.n_train=100``."""

    data: BinaryData = field(default_factory=BinaryData)
    widths: NonEmpty[PositiveInt] = (1, 2, 4, 6, 8, 10, 12, 16, 24, 32, 64, 128, 512)
    # fractions of flipped training targets
    label_noise: NonEmpty[Annotated[float, Ge(0), Le(1)]] = (0.2, 0.0)
    parametrization: Literal["ntk", "standard"] = "ntk"
    lr: PositiveFloat = 0.2
    momentum: float = 0.9
    steps: PositiveInt = 1500
    batch_size: PositiveInt | None = None  # None: full-batch gradient descent
    evals: PositiveInt = 4           # measurements at evals evenly spaced steps (the last: end)
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"              # "cpu", "cuda", ... or "auto" (cuda when available)
    seeds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_device("device", self.device)
        if not 0.0 <= self.momentum < 1.0:
            raise UsageError(f"momentum must lie in [0, 1), got {self.momentum}")


PRESETS = {
    "quick": {},
    "full": {
        "data.name": "mnist", "data.size": 8, "data.n_train": 1000, "data.n_test": 1000,
        "widths": (1, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64, 128, 256, 512, 1024,
                   2048),
        "steps": 10000, "evals": 10, "seeds": 5, "device": "auto",
    },
}


# --------------------------------------------------------------------------- the sweep


def points(config: DoubleDescentConfig) -> list[dict]:
    """Every width for every label-noise level and seed."""
    check_data(config.data)
    seeds = range(config.seed, config.seed + config.seeds)
    return [{"label_noise": float(p), "width": int(w), "seed": int(s)}
            for p in config.label_noise for w in config.widths for s in seeds]


def run_point(config: DoubleDescentConfig, point: dict, progress: Progress) -> list[dict]:
    """Train one width at one noise level and seed with a Smoother attached; one row per
    measurement step."""
    dtype = getattr(torch, config.dtype)
    device = _device(config.device)
    width, noise, seed = int(point["width"]), float(point["label_noise"]), int(point["seed"])
    ds = load_binary_task(config.data, dtype=dtype)
    if noise > 0:
        ds = add_label_noise(ds, noise, seed=seed)
    x, y = ds.x_train.flatten(1).to(device), ds.y_train.to(device)
    x_test, y_test = ds.x_test.flatten(1).to(device), ds.y_test.to(device)
    y_clean = ds.meta.get("y_train_clean", ds.y_train).to(device)
    n = x.shape[0]

    torch.manual_seed(seed)
    model = MLP(x.shape[1], [width], 1, activation="relu",
                parametrization=config.parametrization).to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    smoother = Smoother(model, opt, x, y, probes={"test": x_test}, every=config.steps)
    batch = n if config.batch_size is None else min(config.batch_size, n)
    setup = {"n_train": n, "n_test": int(x_test.shape[0]), "n_params": n_params,
             "params_per_example": n_params / n}

    def measure(model: torch.nn.Module) -> dict:
        f, f_test = model(x), model(x_test)
        return {
            "train_mse": float(F.mse_loss(f, y)),
            "test_mse": float(F.mse_loss(f_test, y_test)),
            "train_error": sign_error(f, y),
            "test_error": sign_error(f_test, y_test),
            "train_error_clean": sign_error(f, y_clean),
            # how closely the smoother (the telescoping model) follows the network on test
            "smoother_gap_test": float((smoother.predict("test").reshape(-1)
                                        - f_test.reshape(-1)).abs().mean()),
        }

    start = time.perf_counter()
    with smoother:
        history = fit(model, opt, x, y, steps=config.steps,
                      batch_size=None if batch == n else batch,
                      generator=torch.Generator().manual_seed(seed),
                      eval_at=evenly_spaced_steps(config.steps, config.evals),
                      evaluate=measure, callbacks=[smoother], progress=progress)
    rows = [{"step": r["step"], **{k: r[k] for k in _MEASURED}, **setup} for r in history.rows]
    rows[-1]["seconds"] = time.perf_counter() - start
    return rows


#: The measured columns of a row, in the table's order.
_MEASURED = ("train_mse", "test_mse", "train_error", "test_error", "train_error_clean",
             "p_train", "p_test", "smoother_gap_test")


# --------------------------------------------------------------------------- figures


def _final(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each point's last measurement."""
    if df.empty:
        return df
    last = df.groupby(["label_noise", "width", "seed"])["step"].transform("max")
    return df[df["step"] == last]


def _noise_levels(df: pd.DataFrame) -> list[float]:
    return sorted(df["label_noise"].unique(), reverse=True)


def figures(df: pd.DataFrame, config: DoubleDescentConfig, out_dir: Path) -> list[Path]:
    """``double_descent.png``: MSE, misclassification error and effective parameters by width,
    one column per label-noise level; ``double_descent_steps.png``: test MSE and ``p_test`` by
    width at every measurement step (how the peak forms during training)."""
    final = _final(df)
    if final.empty:
        return []
    levels = _noise_levels(final)
    widths = sorted(final["width"].unique())
    paths = []
    with fg.paper_style():
        fig, axes = fg.new_figure(3, len(levels), sharex=True, sharey="row",
                                  panel_size=(3.4, 2.4))
        for j, noise in enumerate(levels):
            sub = final[final["label_noise"] == noise]
            rows = (("mse", "mean squared error"), ("error", "misclassification error"))
            for i, (metric, label) in enumerate(rows):
                ax = axes[i, j]
                for split in ("train", "test"):
                    fg.plot_mean_spread(ax, sub, "width", f"{split}_{metric}", label=split,
                                        color=fg.COLORS[split])
                if j == 0:
                    ax.set_ylabel(label)
            axes[0, j].set_title(f"label noise {noise:.0%}")
            ax = axes[2, j]
            for key in ("p_train", "p_test"):
                fg.plot_mean_spread(ax, sub, "width", key, label=key, color=fg.COLORS[key])
            n_train = int(sub["n_train"].iloc[0])
            ax.axhline(n_train, color="#999999", lw=0.8, ls=":", label=f"n = {n_train}")
            ax.set_xlabel("hidden neurons")
            if j == 0:
                ax.set_ylabel("effective parameters p")
            for i in range(3):
                fg.log_axis(axes[i, j], "x", base=2, ticks=fg.sparse_ticks(widths))
        for i in range(3):
            axes[i, 0].legend()
            fg.panel_label(axes[i, 0], "abc"[i])
        paths.append(fg.save_figure(fig, out_dir, "double_descent"))

        steps = sorted(df["step"].unique())
        fig, axes = fg.new_figure(2, len(levels), sharex=True, sharey="row",
                                  panel_size=(3.4, 2.4))
        for j, noise in enumerate(levels):
            sub = df[df["label_noise"] == noise]
            for k, step in enumerate(steps):
                at = sub[sub["step"] == step]
                color = fg.color_cycle(k)
                fg.plot_mean_spread(axes[0, j], at, "width", "test_mse", label=f"step {step}",
                                    color=color, marker=None)
                fg.plot_mean_spread(axes[1, j], at, "width", "p_test", label=f"step {step}",
                                    color=color, marker=None)
            axes[0, j].set_title(f"label noise {noise:.0%}")
            axes[1, j].set_xlabel("hidden neurons")
            for i in range(2):
                fg.log_axis(axes[i, j], "x", base=2, ticks=fg.sparse_ticks(widths))
        axes[0, 0].set_ylabel("test MSE")
        axes[1, 0].set_ylabel("p_test")
        axes[0, 0].legend()
        paths.append(fg.save_figure(fig, out_dir, "double_descent_steps"))
    return paths



# --------------------------------------------------------------------------- headline


def headline(df: pd.DataFrame, config: DoubleDescentConfig) -> dict:
    """At the end of training, for the noisiest setting (mean over seeds): the width with the
    highest test MSE (the interpolation peak) and the numbers there and at the largest width;
    and the test MSE of the noise-free setting at the same widths, when it was run."""
    final = _final(df)
    if final.empty:
        return {}
    noise = max(final["label_noise"])
    cols = ["test_mse", "test_error", "train_mse", "p_train", "p_test"]
    mean = final[final["label_noise"] == noise].groupby("width")[cols].mean()
    peak, widest = int(mean["test_mse"].idxmax()), int(mean.index.max())
    out = {
        "label noise": float(noise),
        "peak width": peak,
        "peak test MSE": float(mean.loc[peak, "test_mse"]),
        "test misclassification at peak": float(mean.loc[peak, "test_error"]),
        "largest width": widest,
        "test MSE at largest width": float(mean.loc[widest, "test_mse"]),
        "test misclassification at largest width": float(mean.loc[widest, "test_error"]),
        "p_train at smallest width": float(mean["p_train"].iloc[0]),
        "p_train at peak": float(mean.loc[peak, "p_train"]),
        "p_test at peak": float(mean.loc[peak, "p_test"]),
        "p_train at largest width": float(mean.loc[widest, "p_train"]),
        "p_test at largest width": float(mean.loc[widest, "p_test"]),
        "n_train": int(final["n_train"].iloc[0]),
    }
    clean = final[final["label_noise"] == 0.0]
    if noise > 0 and not clean.empty:
        cm = clean.groupby("width")["test_mse"].mean()
        if peak in cm.index and widest in cm.index:
            out["noise-free test MSE at peak width"] = float(cm.loc[peak])
            out["noise-free test MSE at largest width"] = float(cm.loc[widest])
    out["seeds"] = int(final["seed"].nunique())
    return out


GUIDE = """
One-hidden-layer ReLU networks of increasing width (log x axis) are trained with the squared loss
on a binary task with targets +1 / -1; lines are means over seeds, bands their min-max. With label
noise (left column) the test error (**row a**: mean squared error, **row b**: misclassification)
peaks where the network first fits its noisy training targets, at about as many parameters as
training points, and falls again for wider networks; without noise (right) the bump is much
smaller (the paper's Fig. 9). **Row c** reads each network as a linear smoother of the training
labels: `p_train` rises with width until it reaches n (dotted line: every training point fits its
own label), while `p_test` peaks near the threshold and then falls, so wide networks fit their
training labels yet predict new points from many labels at once (the paper's Fig. 3).
`double_descent_steps.png` shows the peak in test error and `p_test` building up during
training. The results' column `smoother_gap_test`, the mean distance between the smoother's and
the network's test predictions, checks the first-order approximation: it is largest for the
narrowest networks and near the threshold.
"""

STUDY = Study(
    name="double-descent",
    description="width sweep of one-hidden-layer ReLU nets with label noise: test error and "
                "effective parameters p_train / p_test (paper Figs 3, 9)",
    config_cls=DoubleDescentConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
)
