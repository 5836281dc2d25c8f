"""``approximation``: how well the telescoping model follows a network in training (paper
Figs 2, 7, 8).

Jeffares, Curth & van der Schaar (NeurIPS 2024, Section 3 and Appendix) compare two first-order
models of a trained network against the network itself:

- the telescoping model ``f~_t(x) = f_0(x) + sum_s grad f_{s-1}(x)^T (theta_s - theta_{s-1})``,
  a sum of per-step linearizations (red in the figures), and
- the model linearized around the initialization ``f_0(x) + grad f_0(x)^T (theta_t - theta_0)``
  (gray), the lazy / neural-tangent-kernel picture.

The first stays close to the network through training for small learning rates and any
optimizer; the second drifts away by orders of magnitude more as the weights move. Both come
from :class:`telescope.Telescope`, which observes the optimizer's steps, so the same code serves
plain SGD, SGD with momentum, SGD with weight decay, AdamW and a network with a sigmoid output.

One sweep point is (optimizer, learning rate, seed): an MLP with three hidden ReLU layers of
width 200 is trained with the squared loss ``0.5 * mean (f(x) - y)^2`` on a binary task with
targets ``+1`` / ``-1`` (for ``sigmoid``: the network's output passes through a sigmoid and the
targets are ``1`` / ``0``), on random minibatches. Every ``every`` steps a row records, on the
training and the test points, the mean absolute error of both models against the network
(``*_mae_train``, ``*_mae_test``), the network's output scale, the minibatch loss, and the test
accuracy of the network, the telescoping model and the linearized model (the sign of the
output, or the output against 0.5 for ``sigmoid``).

The ``quick`` preset uses scikit-learn's bundled 8x8 digits, 3 vs 5 (250 training and 115 test
points) and 1000 steps; the ``full`` preset the paper's 8x8 MNIST 3 vs 5 read from IDX files
(``--set data.path=DIR``) with more points, steps, learning rates and seeds.
"""

from __future__ import annotations

import math
import time
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from annotated_types import Ge
from matplotlib.lines import Line2D
from torch import nn

from telescope import plotting as fg
from telescope.errors import UsageError
from telescope.lens import Telescope
from telescope.models import MLP
from telescope.studies._binary import BinaryData, check_data, load_binary_task
from telescope.studies.base import Progress, Study, check_device
from telescope.studies.base import resolve_device as _device
from telescope.studies.constraints import PositiveInt, config_dataclass
from telescope.train import fit

__all__ = ["VARIANTS", "DigitsData", "ApproximationConfig", "points", "run_point", "figures",
           "headline", "STUDY"]

HIDDEN = (200, 200, 200)
"""The paper's network: three hidden ReLU layers of width 200."""

OPTIMIZERS = ("sgd", "momentum", "weight_decay", "adamw")
"""Optimizer presets: plain SGD, SGD with heavy-ball momentum, SGD with weight decay, AdamW."""

MOMENTUM = 0.9
WEIGHT_DECAY = 0.1
"""Weight decay of the ``weight_decay`` preset: large enough to visibly change the fit in 1000
steps (at lr 0.01 the weights shrink by about ``exp(-lr * wd * steps) = 0.37`` from decay alone);
at 1e-3 it would leave no trace."""
ADAMW_WEIGHT_DECAY = 1e-2

SIGMOID = "sigmoid"
VARIANTS = (*OPTIMIZERS, SIGMOID)
"""The optimizer presets (:data:`OPTIMIZERS`) and ``sigmoid``: plain SGD on a network with a
sigmoid output."""

TITLES = {
    "sgd": "SGD",
    "momentum": f"SGD + momentum {MOMENTUM}",
    "weight_decay": f"SGD + weight decay {WEIGHT_DECAY:g}",
    "adamw": f"AdamW (weight decay {ADAMW_WEIGHT_DECAY:g})",
    SIGMOID: "SGD, sigmoid output",
}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The optimizer preset ``name`` (one of :data:`OPTIMIZERS`) at learning rate ``lr``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    if name == "weight_decay":
        return torch.optim.SGD(params, lr=lr, weight_decay=WEIGHT_DECAY)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)
    raise UsageError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


@config_dataclass
class DigitsData(BinaryData):
    """The binary task of this study: by default the bundled 8x8 digits, 3 (+1) vs 5 (-1), which
    hold 183 threes and 182 fives."""

    name: str = "digits"
    n_train: Annotated[int, Ge(2)] = 250    # an override restates BinaryData's range
    n_test: PositiveInt = 115


@config_dataclass
class ApproximationConfig:
    """Config of ``approximation``; e.g. ``--set optimizers=sgd,adamw lrs=0.01 steps=200``."""

    data: DigitsData = field(default_factory=DigitsData)
    hidden: tuple[int, ...] = HIDDEN
    optimizers: tuple[str, ...] = VARIANTS
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)       # sgd, momentum, weight_decay
    adamw_lrs: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4)  # adamw (steps of about lr per weight)
    sigmoid_lrs: tuple[float, ...] = (1e-2, 3e-2, 1e-1, 3e-1)  # sigmoid (its slope is <= 1/4)
    steps: int = 1000
    batch_size: PositiveInt | None = 200   # None: full batch
    every: int = 10                  # a row every `every` steps
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"              # "cpu", "cuda", ... or "auto"
    seeds: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [o for o in self.optimizers if o not in VARIANTS]
        if not self.optimizers or unknown:
            raise UsageError(f"optimizers must be some of {', '.join(VARIANTS)}; got "
                             f"{', '.join(self.optimizers) or 'none'}")
        for lr in (*self.lrs, *self.adamw_lrs, *self.sigmoid_lrs):
            if not (lr > 0 and math.isfinite(lr)):
                raise UsageError(f"learning rates must be positive numbers, got {lr}")
        if self.steps < 1 or self.every < 1:
            raise UsageError(f"steps and every must be >= 1, got {self.steps} and {self.every}")
        check_device("device", self.device)
        if any(h < 1 for h in self.hidden):
            raise UsageError(f"hidden must be layer widths >= 1, got {self.hidden}")
        for name in self.optimizers:
            key = {"adamw": "adamw_lrs", "sigmoid": "sigmoid_lrs"}.get(name, "lrs")
            if not getattr(self, key):
                raise UsageError(f"{key} is empty but optimizers include {name}, which uses it: "
                                 f"give {key} a value or drop {name} from optimizers")


PRESETS = {
    "quick": {},
    "full": {
        "data.name": "mnist", "data.size": 8, "data.n_train": 1000, "data.n_test": 1000,
        "lrs": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
        "adamw_lrs": (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
        "sigmoid_lrs": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
        "steps": 5000, "every": 25, "seeds": 3, "device": "auto",
    },
}


def points(config: ApproximationConfig) -> list[dict]:
    """Every learning rate of every optimizer (``adamw_lrs`` for AdamW, ``sigmoid_lrs`` for the
    sigmoid network, ``lrs`` for the others), for every seed."""
    check_data(config.data)
    seeds = range(config.seed, config.seed + config.seeds)
    lrs = {"adamw": config.adamw_lrs, SIGMOID: config.sigmoid_lrs}
    return [{"optimizer": name, "lr": float(lr), "seed": int(s)}
            for name in config.optimizers for lr in lrs.get(name, config.lrs) for s in seeds]


def run_point(config: ApproximationConfig, point: dict, progress: Progress) -> list[dict]:
    """Train one optimizer at one learning rate with a Telescope attached; one row per
    recorded step."""
    name, lr, seed = str(point["optimizer"]), float(point["lr"]), int(point["seed"])
    if name not in VARIANTS:
        raise UsageError(f"unknown optimizer {name!r}; known: {', '.join(VARIANTS)}")
    dtype = getattr(torch, config.dtype)
    device = _device(config.device)
    ds = load_binary_task(config.data, dtype=dtype)
    x, y = ds.x_train.flatten(1).to(device), ds.y_train.to(device)
    x_test, y_test = ds.x_test.flatten(1).to(device), ds.y_test.to(device)
    threshold = 0.0
    if name == SIGMOID:  # targets 1 / 0 for a sigmoid output
        y, y_test, threshold = (y + 1) / 2, (y_test + 1) / 2, 0.5
    n = x.shape[0]
    batch = n if config.batch_size is None else min(config.batch_size, n)

    torch.manual_seed(seed)
    model: nn.Module = MLP(x.shape[1], config.hidden, 1, activation="relu")
    if name == SIGMOID:
        model = nn.Sequential(model, nn.Sigmoid())
    model = model.to(device=device, dtype=dtype)
    opt = make_optimizer("sgd" if name == SIGMOID else name, model.parameters(), lr)

    def accuracy(pred: torch.Tensor) -> float:
        return float(((pred.reshape(-1) > threshold) == (y_test.reshape(-1) > threshold))
                     .to(torch.float64).mean())

    class Accuracies:
        """The minibatch loss and the test accuracy of the network, the telescoping model and
        the linearized model, at every recorded step."""

        COLUMNS = ("train_loss", "acc_network", "acc_telescoping", "acc_linearized")

        def measure(self, state) -> dict:
            return {"train_loss": state.loss,
                    "acc_network": accuracy(tel.actual("test")),
                    "acc_telescoping": accuracy(tel.telescoping("test")),
                    "acc_linearized": accuracy(tel.linearized("test"))}

    start = time.perf_counter()
    with Telescope(model, opt, {"train": x, "test": x_test}, every=config.every) as tel:
        history = fit(model, opt, x, y, steps=config.steps,
                      loss=lambda out, target: 0.5 * F.mse_loss(out, target), batch_size=batch,
                      generator=torch.Generator().manual_seed(seed + 1),
                      eval_at=range(config.every, config.steps + 1, config.every),
                      callbacks=[Accuracies()], progress=progress)
    seconds = time.perf_counter() - start
    # the Telescope's rows of step t are completed at step t + 1 (from that step's JVP), so
    # they are read at the end rather than through Telescope.measure (a forward pass at t)
    errors: dict[int, dict] = {}
    for r in tel.history:
        errors.setdefault(r["step"], {}).update(
            {f"{key}_{r['probe']}": r[key]
             for key in ("telescoping_mae", "linearized_mae", "output_scale")})
    setup = {"n_train": n, "n_test": int(x_test.shape[0]), "batch_size": batch}
    rows = [{"step": r["step"], **errors[r["step"]], **{k: r[k] for k in Accuracies.COLUMNS},
             **setup} for r in history.rows]
    rows[-1]["seconds"] = seconds
    return rows


# --------------------------------------------------------------------------- figures


def _order(df: pd.DataFrame) -> list[str]:
    present = set(df["optimizer"])
    return [o for o in VARIANTS if o in present]


def _fade(color: str, amount: float) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return tuple(c + (1.0 - c) * amount for c in to_rgb(color))


def figures(df: pd.DataFrame, config: ApproximationConfig, out_dir: Path) -> list[Path]:
    """``approximation_steps.png`` (Fig. 7): test error of both models by step, one panel per
    optimizer, one line style per learning rate; ``approximation_lr.png`` (Fig. 2): error at
    the last step by learning rate; ``approximation_accuracy.png`` (Fig. 8): test accuracy of
    both models against the network's, at each optimizer's largest learning rate."""
    if df.empty:
        return []
    names = _order(df)
    paths = []
    styles = ("-", "--", ":", "-.")
    models = (("telescoping", fg.COLORS["telescoping"]), ("linearized", fg.COLORS["linearized"]))
    with fg.paper_style():
        fig, axes = fg.new_figure(1, len(names), sharey=True, panel_size=(3.0, 3.0))
        for ax, name in zip(axes[0], names, strict=True):
            sub = df[df["optimizer"] == name]
            lrs = sorted(sub["lr"].unique(), reverse=True)
            handles = []
            for i, lr in enumerate(lrs):
                at = sub[sub["lr"] == lr]
                fade = 0.6 * i / max(1, len(lrs) - 1)
                for model, color in models:
                    fg.plot_mean_spread(ax, at, "step", f"{model}_mae_test", marker=None,
                                        color=_fade(color, fade), ls=styles[i % len(styles)],
                                        lw=1.2)
                handles.append(Line2D([], [], color=_fade("#333333", fade), lw=1.2,
                                      ls=styles[i % len(styles)], label=f"lr {lr:g}"))
            fg.log_axis(ax, "y")
            ax.set_title(TITLES.get(name, name))
            ax.set_xlabel("optimization step")
            ax.add_artist(ax.legend(handles=handles, loc="lower right"))
        axes[0, 0].set_ylabel("mean |model - network| (test)")
        fig.legend(handles=[Line2D([], [], color=c, lw=2, label=f"{m} model")
                            for m, c in models], loc="outside lower center", ncol=2)
        paths.append(fg.save_figure(fig, out_dir, "approximation_steps"))

        last = df[df["step"] == df.groupby(["optimizer", "lr", "seed"])["step"]
                  .transform("max")]
        fig, axes = fg.new_figure(1, len(names), sharey=True, panel_size=(2.6, 2.6))
        for ax, name in zip(axes[0], names, strict=True):
            sub = last[last["optimizer"] == name]
            for model, color in models:
                fg.plot_mean_spread(ax, sub, "lr", f"{model}_mae_test", label=model,
                                    color=color)
            fg.log_axis(ax, "x")
            fg.log_axis(ax, "y")
            ax.set_title(TITLES.get(name, name))
            ax.set_xlabel("learning rate")
        axes[0, 0].set_ylabel("error at the last step (test)")
        axes[0, 0].legend()
        paths.append(fg.save_figure(fig, out_dir, "approximation_lr"))

        fig, axes = fg.new_figure(2, len(names), sharex="col", sharey=True,
                                  panel_size=(2.6, 2.2))
        for j, name in enumerate(names):
            sub = df[df["optimizer"] == name]
            lr = sub["lr"].max()
            at = sub[sub["lr"] == lr]
            for i, (model, color) in enumerate((("telescoping", fg.COLORS["telescoping"]),
                                                ("linearized", "#1f77b4"))):
                ax = axes[i, j]
                fg.plot_mean_spread(ax, at, "step", "acc_network", label="network",
                                    color="#999999", marker=None, lw=2.4)
                fg.plot_mean_spread(ax, at, "step", f"acc_{model}", label=model, color=color,
                                    marker=None, lw=1.2)
                if i == 0:
                    ax.set_title(f"{TITLES.get(name, name)}, lr {lr:g}")
                else:
                    ax.set_xlabel("optimization step")
                if j == 0:
                    ax.set_ylabel("test accuracy")
                    ax.legend(loc="lower right")
        paths.append(fg.save_figure(fig, out_dir, "approximation_accuracy"))
    return paths


# --------------------------------------------------------------------------- headline


def headline(df: pd.DataFrame, config: ApproximationConfig) -> dict:
    """Per optimizer, at its largest learning rate and last step (mean over seeds): the test
    errors of the telescoping and the linearized model, and the test accuracies of the
    network, the telescoping model and the linearized model."""
    if df.empty:
        return {}
    last = df[df["step"] == df.groupby(["optimizer", "lr", "seed"])["step"].transform("max")]
    out: dict = {}
    ratios = []
    for name in _order(last):
        sub = last[last["optimizer"] == name]
        lr = float(sub["lr"].max())
        m = sub[sub["lr"] == lr].mean(numeric_only=True)
        tele, lin = float(m["telescoping_mae_test"]), float(m["linearized_mae_test"])
        out[f"{name} (lr {lr:g}): telescoping | linearized error"] = (tele, lin)
        out[f"{name} (lr {lr:g}): accuracy network | telescoping | linearized"] = (
            float(m["acc_network"]), float(m["acc_telescoping"]), float(m["acc_linearized"]))
        ratios.extend((last["linearized_mae_test"] / last["telescoping_mae_test"])
                      [last["optimizer"] == name].tolist())
    finite = [r for r in ratios if math.isfinite(r)]
    if finite:
        out["median linearized / telescoping error, all runs"] = float(pd.Series(finite).median())
    out["seeds"] = int(last["seed"].nunique())
    return out


GUIDE = """
How closely two first-order models follow a network in training: the telescoping model (red),
which adds up a linearization around the parameters before every step, and the model linearized
once around the initialization (gray); errors are mean absolute differences from the network's
outputs on the test points, for an MLP with three hidden ReLU layers of width 200 trained with the
squared loss on a binary task. `approximation_steps.png` (the paper's Fig. 7) shows them by
step, one panel per optimizer and darker lines for larger learning rates: the telescoping error
stays ten to a thousand times below the linearized one, which grows to the scale of the outputs
as the weights leave their initial values. `approximation_lr.png` (Fig. 2) shows the error at the
last step by learning rate: the telescoping error shrinks roughly in proportion to it, the
linearized error only once the weights barely move, and AdamW, whose steps are about lr per
weight whatever the gradient, needs far smaller learning rates for the same accuracy.
`approximation_accuracy.png` (Fig. 8) compares the test accuracy of the telescoping model (top)
and of the linearized model (bottom) with the network's (thick gray) at each optimizer's largest
learning rate. The results also hold the errors on the training points (`*_mae_train`) and the
network's output scale (`output_scale_*`).
"""

STUDY = Study(
    name="approximation",
    description="telescoping vs linearized approximation error by step and learning rate for "
                "SGD, momentum, weight decay, AdamW, sigmoid output (paper Figs 2, 7, 8)",
    config_cls=ApproximationConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
)
