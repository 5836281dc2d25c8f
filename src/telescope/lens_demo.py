"""``telescope lens``: the approximation quality of the telescoping model, a first look.

Reproduces, at laptop scale, the approximation experiment of Jeffares, Curth & van der Schaar
(NeurIPS 2024; Figures 2 and 7): an MLP with three hidden ReLU layers of width 200 is trained with
the squared loss on 8x8 digits (sklearn's bundled ``load_digits``, classes 3 versus 5, targets
``+1`` / ``-1``, inputs standardized with training statistics) by several optimizers, while a
:class:`~telescope.lens.Telescope` records on the training and test points the mean absolute
error against the actual network of

- the telescoping model ``f~_t(x) = f_0(x) + sum_s grad f_{s-1}(x)^T (theta_s - theta_{s-1})``
  (red in the figure), and
- the model linearized around the initialization
  ``f_0(x) + grad f_0(x)^T (theta_t - theta_0)`` (gray).

The bundled digits hold 183 threes and 182 fives, so the default split is 250 training and 115
test points (the paper uses 1000 of each from MNIST). Everything here composes the library; no
telescoping math lives in this module.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from telescope._table import format_table as _format_table
from telescope.errors import UsageError

OPTIMIZERS = ("sgd", "momentum", "weight_decay", "adamw")
"""Optimizer presets: plain SGD, SGD with heavy-ball momentum, SGD with weight decay, AdamW."""

MOMENTUM = 0.9
WEIGHT_DECAY = 0.1
"""Weight decay of the ``weight_decay`` preset: large enough to visibly change the fit in 1000
steps (at lr 0.01 the weights shrink by about ``exp(-lr * wd * steps) = 0.37`` from decay alone);
at 1e-3 it would leave no trace."""
ADAMW_WEIGHT_DECAY = 1e-2
DEFAULT_LRS = (0.001, 0.01)
"""Learning rates of the SGD-family presets (``sgd``, ``momentum``, ``weight_decay``)."""
DEFAULT_ADAMW_LRS = (1e-5, 1e-4)
"""Learning rates of the ``adamw`` preset (Adam's steps are about ``lr`` per parameter, so it
takes far smaller learning rates than SGD)."""

HIDDEN = (200, 200, 200)
DIGITS = (3, 5)

CSV_COLUMNS = ("optimizer", "lr", "step", "probe", "telescoping_mae", "linearized_mae",
               "output_scale", "train_loss", "n_train", "n_test", "batch_size", "seed")
TABLE_COLUMNS = ("optimizer", "lr", "steps", "train_loss", "test_acc", "telescoping_mae",
                 "linearized_mae", "ratio", "output_scale", "seconds")


def load_digits_3v5(n_train: int, n_test: int, seed: int, dtype: torch.dtype = torch.float32
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's bundled 8x8 digits, classes 3 (target ``+1``) versus 5 (target ``-1``).

    A seeded random split into ``n_train`` training and ``n_test`` test points; the 64 pixel
    features are standardized with the training mean and standard deviation (constant pixels
    keep a scale of 1). Returns ``x_train [n_train, 64], y_train [n_train], x_test, y_test``.
    """
    from sklearn.datasets import load_digits

    x_all, labels = load_digits(return_X_y=True)
    keep = (labels == DIGITS[0]) | (labels == DIGITS[1])
    x = torch.as_tensor(x_all[keep], dtype=torch.float64)
    y = torch.where(torch.as_tensor(labels[keep]) == DIGITS[0], 1.0, -1.0).to(torch.float64)
    if n_train < 2 or n_test < 1:
        raise UsageError(f"need n_train >= 2 and n_test >= 1, got {n_train} and {n_test}")
    if n_train + n_test > x.shape[0]:
        raise UsageError(
            f"the bundled digits hold {x.shape[0]} images of {DIGITS[0]}s and {DIGITS[1]}s; "
            f"n_train + n_test = {n_train + n_test} is too many")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    tr, te = order[:n_train], order[n_train:n_train + n_test]
    mean, std = x[tr].mean(0), x[tr].std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    x = (x - mean) / std
    return x[tr].to(dtype), y[tr].to(dtype), x[te].to(dtype), y[te].to(dtype)


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


OPTIMIZER_TITLES = {
    "sgd": "SGD",
    "momentum": f"SGD + momentum {MOMENTUM}",
    "weight_decay": f"SGD + weight decay {WEIGHT_DECAY:g}",
    "adamw": f"AdamW (weight decay {ADAMW_WEIGHT_DECAY:g})",
}


def run_lens_demo(
    out_dir: str | Path,
    *,
    steps: int = 1000,
    lrs: Sequence[float] = DEFAULT_LRS,
    adamw_lrs: Sequence[float] = DEFAULT_ADAMW_LRS,
    optimizers: Sequence[str] = OPTIMIZERS,
    n_train: int = 250,
    n_test: int = 115,
    batch_size: int = 200,
    seed: int = 0,
    every: int = 10,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> list[dict]:
    """Train the approximation setup per optimizer and learning rate with a Telescope attached.

    For every optimizer in ``optimizers`` and learning rate (``lrs`` for the SGD-family
    presets, ``adamw_lrs`` for ``adamw``), the same initialization (seed ``seed``) is trained for
    ``steps`` minibatch steps (``batch_size`` points drawn without replacement per step, or the
    whole training set if smaller) on ``0.5 * mean (f(x) - y)^2``. Writes ``approximation.csv``
    (the tidy rows returned) and ``approximation.png`` into ``out_dir``.

    Returns
    -------
    list[dict]
        One row per recorded step (every ``every`` steps), probe set (``"train"``, ``"test"``)
        and run: ``optimizer, lr, step, probe, telescoping_mae, linearized_mae, output_scale,
        train_loss`` (the loss of that step's minibatch, before the step) and the setup
        (``n_train, n_test, batch_size, seed``). Each run's last row per probe carries
        ``seconds`` (wall time of the run) and ``test_acc`` (accuracy of the final network).
    """
    from tqdm.auto import tqdm

    from telescope.lens import Telescope
    from telescope.models import MLP

    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    if every < 1:
        raise UsageError(f"every must be >= 1, got {every}")
    optimizers = list(optimizers)
    if not optimizers:
        raise UsageError("give at least one optimizer")
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise UsageError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    for lr in (*lrs, *adamw_lrs):
        if not (lr > 0 and math.isfinite(lr)):
            raise UsageError(f"learning rates must be positive, got {lr}")
    runs = [(name, float(lr)) for name in optimizers
            for lr in (adamw_lrs if name == "adamw" else lrs)]
    if not runs:
        raise UsageError("no learning rates given")

    x, y, x_test, y_test = load_digits_3v5(n_train, n_test, seed, dtype)
    batch = min(batch_size, n_train)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup = {"n_train": n_train, "n_test": n_test, "batch_size": batch, "seed": seed}

    rows: list[dict] = []
    bar = tqdm(total=len(runs) * steps, desc="telescope lens", unit="step",
               disable=not progress, smoothing=0.05)
    try:
        for name, lr in runs:
            bar.set_postfix_str(f"{name} lr={lr:g}")
            torch.manual_seed(seed)
            model = MLP(x.shape[1], HIDDEN, 1, activation="relu").to(dtype)
            opt = make_optimizer(name, model.parameters(), lr)
            gen = torch.Generator().manual_seed(seed + 1)
            losses: dict[int, float] = {}
            start = time.perf_counter()
            with Telescope(model, opt, {"train": x, "test": x_test}, every=every) as tel:
                for t in range(1, steps + 1):
                    idx = torch.randperm(n_train, generator=gen)[:batch]
                    opt.zero_grad(set_to_none=True)
                    loss = 0.5 * F.mse_loss(model(x[idx]).squeeze(-1), y[idx])
                    loss.backward()
                    if t % every == 0:
                        losses[t] = loss.detach().item()
                    opt.step()
                    bar.update()
            seconds = time.perf_counter() - start
            pred = tel.actual("test").squeeze(-1)
            test_acc = float(((pred > 0) == (y_test > 0)).to(torch.float64).mean())
            run_rows = [{"optimizer": name, "lr": lr, **r, "train_loss": losses.get(r["step"]),
                         **setup} for r in tel.history]
            for r in run_rows[-2:]:
                r.update(seconds=seconds, test_acc=test_acc)
            rows.extend(run_rows)
    finally:
        bar.close()

    write_csv(rows, out / "approximation.csv")
    plot_approximation(rows, out / "approximation.png")
    return rows


def summarize(rows: list[dict], probe: str = "test") -> list[dict]:
    """One row per run: the last recorded step on ``probe``, with the ratio
    ``linearized_mae / telescoping_mae`` (how many times better the telescoping model is)."""
    last: dict[tuple[str, float], dict] = {}
    for r in rows:
        if r["probe"] == probe:
            last[(r["optimizer"], r["lr"])] = r
    table = []
    for r in last.values():
        tele, lin = r["telescoping_mae"], r.get("linearized_mae")
        table.append({**r, "steps": r["step"],
                      "ratio": (lin / tele) if lin is not None and tele > 0 else math.inf})
    return table


def _fmt(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key in ("optimizer",):
        return str(value)
    if key == "steps":
        return str(int(value))
    if key == "lr":
        return f"{value:g}"
    if key == "seconds":
        return f"{value:.1f}"
    if key in ("test_acc", "train_loss"):
        return f"{value:.3f}"
    if key == "ratio":
        return f"{value:.0f}x" if math.isfinite(value) else "inf"
    return f"{value:.2e}"


def format_table(table: list[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """Right-aligned, whitespace-separated text table (one header line, no spaces in cells)."""
    return _format_table(table, columns, _fmt)


def write_csv(rows: list[dict], path: Path, columns: Sequence[str] = CSV_COLUMNS) -> None:
    """The tidy rows as CSV (``columns``, missing values empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def plot_approximation(rows: list[dict], path: Path, probe: str = "test") -> None:
    """One panel per optimizer: the mean absolute error against the actual network of the
    telescoping model (red) and the linearized model (gray) by step on ``probe``, log y-axis;
    solid, strong lines for the largest learning rate, dashed and paler ones for smaller ones (the
    paper's Figure 7)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig = Figure(figsize=(4.2 * len(names), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    styles = ("-", "--", ":", "-.")
    for ax, name in zip(axes, names, strict=True):
        lrs = sorted({r["lr"] for r in rows if r["optimizer"] == name}, reverse=True)
        for i, lr in enumerate(lrs):
            run = [r for r in rows if r["optimizer"] == name and r["lr"] == lr
                   and r["probe"] == probe]
            steps = [r["step"] for r in run]
            fade = 0.55 * i / max(1, len(lrs) - 1)  # 0 for the largest lr, paler below
            ls = styles[i % len(styles)]
            ax.plot(steps, [_positive(r["telescoping_mae"]) for r in run], ls=ls, lw=1.6,
                    color=_fade((0.85, 0.1, 0.1), fade), label=f"telescoping, lr {lr:g}")
            if run and run[0].get("linearized_mae") is not None:
                ax.plot(steps, [_positive(r["linearized_mae"]) for r in run], ls=ls, lw=1.6,
                        color=_fade((0.3, 0.3, 0.3), fade), label=f"linearized, lr {lr:g}")
        ax.set_yscale("log")
        ax.set_title(OPTIMIZER_TITLES.get(name, name), fontsize=10)
        ax.set_xlabel("optimization step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"mean |approximation - network| ({probe})")
    fig.savefig(path, dpi=120)


def _fade(rgb: tuple[float, float, float], amount: float) -> tuple[float, float, float]:
    """``rgb`` blended towards white by ``amount`` in [0, 1]."""
    return tuple(c + (1.0 - c) * amount for c in rgb)


def _positive(value: float) -> float:
    """Exact zeros (possible in principle) would vanish from a log axis: show them at 1e-16."""
    return max(float(value), 1e-16)
