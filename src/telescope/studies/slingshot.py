"""``slingshot``: norm-growth cycles of the last layer with Adam, and Adam's ``epsilon``.

Thilak, Littwin, Zhai, Saremi, Paiss & Susskind (2022), "The Slingshot Mechanism: An Empirical
Study of Adaptive Optimizers and the Grokking Phenomenon". A one-layer decoder
(:class:`telescope.models.TinyTransformer`) learns ``a + b mod p``
(:func:`telescope.data.modular_arithmetic`, sequences ``[a, b, =]``) full batch with Adam and no
weight decay; the setting is Adam's ``epsilon``. Logged every ``every`` steps: the last layer's
norm ``||theta_head||_2`` (:class:`telescope.lens.NormCycles`), the train loss of the step
(before its update) and the test accuracy. Cycles are found by
:func:`telescope.lens.detect_cycles` (a growth phase of the log-norm rising by at least
``min_rise``, followed by a plateau or a drop); loss spikes by :func:`telescope.lens.loss_spikes`
(the loss exceeding ``spike_factor`` times its running minimum). A cycle "has a spike" when a
spike peak lies in ``[start, end]`` of the cycle. Thilak et al. see cycles with small
``epsilon`` and none when ``epsilon`` is large enough to damp Adam's normalization of tiny
gradients. The quick preset uses ``beta2 = 0.99`` (Thilak et al.: Adam's default 0.999) and a
learning rate of ``1e-2`` so that the first slingshot comes within 3000 steps; the full preset
uses 0.999 and ``1e-3`` over 1e5 steps.

A sweep point is ``(setting, seed)``. Rows are tidy: ``lens == "train"`` (one per point and
logged step: ``train_loss``, ``test_acc``, ``norm``, ``growth`` = ``d log norm / d step``, and
``diverged`` on the last row of a run whose loss is not finite), ``lens == "cycle"`` (one per
detected cycle at its peak step: ``cycle_start``, ``cycle_end``, ``cycle_rise``, ``has_spike``)
and ``lens == "spike"`` (one per loss spike at its peak step: ``cycle_start``, ``cycle_end``,
``spike_height``).

The ``quick`` preset runs on a laptop CPU in a minute; the ``full`` preset (``p = 97``, a wider
model, 1e5 steps, three ``epsilon``) is meant for a GPU (``device="auto"``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from annotated_types import Ge, Gt, Lt

from telescope import plotting as fg
from telescope.data import modular_arithmetic
from telescope.lens import NormCycles, loss_spikes
from telescope.models import TinyTransformer
from telescope.studies._sequence import (
    Columns,
    check_training,
    final_step,
    loss_acc,
    settings,
    sweep,
)
from telescope.studies.base import Progress, Study, resolve_device
from telescope.studies.constraints import (
    NonEmpty,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
)
from telescope.train import fit

__all__ = ["SlingshotConfig", "COLUMNS", "points", "run_point", "figures", "headline", "STUDY"]


# --------------------------------------------------------------------------- config


@config_dataclass
class SlingshotConfig:
    """Adam's ``eps`` on modular addition, full batch, no weight decay; e.g. ``--set
    eps=1e-8,1e-6 steps=5000``."""

    eps: NonEmpty[PositiveFloat] = (1e-8, 1e-4)
    p: Annotated[int, Ge(3)] = 23
    train_fraction: Annotated[float, Gt(0), Lt(1)] = 0.5
    d_model: PositiveInt = 32
    n_heads: PositiveInt = 4
    lr: PositiveFloat = 1e-2
    # shorter second-moment memory: earlier first slingshot
    beta2: Annotated[float, Ge(0), Lt(1)] = 0.99
    steps: PositiveInt = 3000
    every: PositiveInt = 10            # log norm and loss every `every` steps
    min_rise: NonNegativeFloat = 0.05  # detect_cycles: minimal relative rise of a growth phase
    smooth: PositiveInt = 1            # detect_cycles: moving-average window (log points)
    # loss_spikes: loss > factor * running minimum
    spike_factor: Annotated[float, Gt(1)] = 10.0
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"                # "cpu", "cuda", ... or "auto" (cuda when available)
    seeds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_training(self)


PRESETS = {
    "quick": {},
    "full": {"eps": (1e-8, 1e-6, 1e-4), "p": 97, "d_model": 128, "beta2": 0.999, "lr": 1e-3,
             "steps": 100000, "every": 50, "smooth": 3, "seeds": 3, "device": "auto"},
}


# --------------------------------------------------------------------------- one point

COLUMNS = Columns(text=("setting_name", "lens"), ints=("step",),
                  floats=("train_loss", "test_acc", "norm", "growth", "cycle_start",
                          "cycle_end", "cycle_rise", "spike_height", "seconds"),
                  bools=("diverged", "has_spike"))


def points(config: SlingshotConfig) -> list[dict]:
    """Adam's ``eps`` (``setting``) x seed."""
    return sweep(config.eps, config)


def run_point(config: SlingshotConfig, point: dict, progress: Progress) -> list[dict]:
    """Train one decoder by full-batch Adam; norm and loss every ``every`` steps, then its
    cycles and loss spikes."""
    start = time.perf_counter()
    seed, eps = int(point["seed"]), float(point["setting"])
    name = f"eps={eps:g}"
    c = config
    dev, dtype = resolve_device(c.device), getattr(torch, c.dtype)
    ds = modular_arithmetic(c.p, op="add", train_fraction=c.train_fraction, seed=seed,
                            equals=True)
    x, y, x_test, y_test = (t.to(dev) for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    torch.manual_seed(seed)
    model = TinyTransformer(c.p + 1, c.d_model, c.n_heads, 1, 3, c.p, causal=True,
                            readout="last").to(device=dev, dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, eps=eps, betas=(0.9, c.beta2),
                           weight_decay=0.0)
    norms = NormCycles(model.head, name="head")
    history = fit(model, opt, x, y, steps=c.steps, loss="cross_entropy",
                  eval_at=range(c.every, c.steps + 1, c.every),
                  evaluate=lambda m: {"test_acc": loss_acc(m, x_test, y_test)[1]
                                      if len(x_test) else math.nan},
                  callbacks=[norms], on_nonfinite="stop", progress=progress)
    # the loss of the step's forward pass (before the update), the norm after it
    growth = {r["step"]: r["growth"] for r in norms.rows()}
    rows = [COLUMNS.row(setting_name=name, step=r["step"], lens="train", train_loss=r["loss"],
                        test_acc=r["test_acc"], norm=r["head_norm"], growth=growth[r["step"]])
            for r in history.rows]
    if history.diverged_at is not None:
        rows.append(COLUMNS.row(setting_name=name, step=history.diverged_at, lens="train",
                                train_loss=history.diverged_loss, diverged=True))
    steps, losses = [r["step"] for r in history.rows], [r["loss"] for r in history.rows]
    spikes = loss_spikes(steps, losses, c.spike_factor)
    for s in spikes:
        rows.append(COLUMNS.row(setting_name=name, step=s["peak"], lens="spike",
                                cycle_start=s["start"], cycle_end=s["end"],
                                spike_height=s["height"]))
    if len(steps) >= 2:
        for cyc in norms.cycles(min_rise=c.min_rise, smooth=c.smooth):
            has = any(cyc["start"] <= s["peak"] <= cyc["end"] for s in spikes)
            rows.append(COLUMNS.row(setting_name=name, step=cyc["peak"], lens="cycle",
                                    cycle_start=cyc["start"], cycle_end=cyc["end"],
                                    cycle_rise=cyc["rise"], has_spike=has))
    if not rows:   # fewer than `every` steps
        rows.append(COLUMNS.row(setting_name=name, step=0, lens="train"))
    rows[-1]["seconds"] = time.perf_counter() - start
    return rows


# --------------------------------------------------------------------------- figures


def figures(df: pd.DataFrame, config: SlingshotConfig, out_dir: Path) -> list[Path]:
    """``slingshot``: the last-layer norm (cycle peaks marked) and the train loss (spike peaks
    marked) by step, per seed and eps (PNG + SVG)."""
    if df.empty:
        return []
    train = df[(df["lens"] == "train") & df["norm"].notna()]
    cycles = df[df["lens"] == "cycle"]
    spikes = df[df["lens"] == "spike"]
    with fg.paper_style():
        fig, axes = fg.new_figure(2, 1, panel_size=(6.4, 2.3), sharex=True)
        for i, (setting, name) in enumerate(settings(df)):
            color = fg.color_cycle(i)
            for k, (seed, t) in enumerate(train[train["setting"] == setting].groupby("seed")):
                label = name if k == 0 else None
                axes[0, 0].plot(t["step"], t["norm"], color=color, lw=1.0, label=label)
                axes[1, 0].plot(t["step"], t["train_loss"], color=color, lw=1.0, label=label)
                cy = cycles[(cycles["setting"] == setting) & (cycles["seed"] == seed)]
                if not cy.empty:
                    peak_norm = np.interp(cy["step"], t["step"], t["norm"])
                    axes[0, 0].plot(cy["step"], peak_norm, "v", color=color, ms=5)
                s = spikes[(spikes["setting"] == setting) & (spikes["seed"] == seed)]
                if not s.empty:
                    peak_loss = np.interp(s["step"], t["step"], t["train_loss"])
                    axes[1, 0].plot(s["step"], peak_loss, "^", color=color, ms=5)
        axes[0, 0].set_ylabel("last-layer norm ||theta_head||")
        axes[1, 0].set_ylabel("train cross-entropy")
        fg.log_axis(axes[1, 0], "y")
        axes[1, 0].set_xlabel("step (triangles: detected cycle peaks / loss spikes)")
        axes[0, 0].legend()
        fg.panel_label(axes[0, 0], "a")
        fg.panel_label(axes[1, 0], "b")
        return [fg.save_figure(fig, out_dir, "slingshot")]


# --------------------------------------------------------------------------- headline


def headline(df: pd.DataFrame, config: SlingshotConfig) -> dict:
    """Per eps, means over seeds: cycles and loss spikes per run, the fraction of cycles with a
    loss spike, and the last-layer norm at the last step."""
    out: dict = {}
    if df.empty:
        return out
    seeds = df.groupby("setting")["seed"].nunique()
    for setting, name in settings(df):
        s = df[df["setting"] == setting]
        n = int(seeds.get(setting, 1))
        cyc = s[s["lens"] == "cycle"]
        spk = s[s["lens"] == "spike"]
        out[f"cycles per run ({name})"] = len(cyc) / n
        out[f"loss spikes per run ({name})"] = len(spk) / n
        if len(cyc):
            out[f"fraction of cycles with a loss spike ({name})"] = float(
                cyc["has_spike"].mean())
        tr = final_step(s[s["lens"] == "train"])
        if not tr.empty:
            out[f"final last-layer norm ({name})"] = float(tr["norm"].mean())
    out["seeds"] = int(df["seed"].nunique())
    return out


GUIDE = """
Slingshot (Thilak et al. 2022): the figure `slingshot.png`, rows in `results.parquet` (columns
`setting`, `seed`, `step`, `lens`); one curve per seed.

- **a**: last-layer norm through training for each Adam `eps` (triangles: completed growth
  cycles by `detect_cycles`). **b**: train loss (triangles: loss spikes). Slingshots appear once
  the loss is tiny: the norm jumps while the loss spikes, then plateaus. A large `eps` damps
  Adam's normalization of tiny gradients and suppresses them.
"""

STUDY = Study(
    name="slingshot",
    description="slingshot: last-layer norm cycles and loss spikes of Adam on modular "
                "addition, small vs large eps",
    config_cls=SlingshotConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
)
