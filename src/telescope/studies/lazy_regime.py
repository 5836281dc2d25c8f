"""``lazy-regime``: how far an alpha-scaled transformer stays from its linearization.

Chizat, Oyallon & Bach (2019), "On Lazy Training in Differentiable Programming", NeurIPS.
``h = LazyModel(TinyTransformer(...), alpha)``, ``h(x) = alpha (f(x; theta) - f(x; theta_0))``,
trained by plain gradient descent on ``MSE(h, y) / alpha^2`` (one-hot targets) at a fixed
learning rate (the setting is ``alpha``), with a :class:`telescope.Telescope` attached. At
every logged step ``T`` the gap between the network and its linearization at initialization,
``h_lin(x) = h_0(x) + grad_theta h_{theta_0}(x)^T (theta_T - theta_0)``
(``Telescope.linearized`` vs ``Telescope.actual``) on held-out probe points is recorded as
``gap_abs = mean_{x, o} |h_T(x) - h_lin(x)|`` (absolute) and ``gap_rel = gap_abs / mean
|h_T(x)|`` (relative). With this scaling every step moves ``theta`` by ``O(1 / alpha)``, so at
a fixed ``T`` the Taylor remainder is ``gap_abs = alpha * O(||theta_T - theta_0||^2) = O(1 /
alpha)`` and ``alpha * gap_abs`` against ``T`` should collapse onto one curve for large
``alpha``. The figure also plots the gap against ``T / alpha``; there the curves need not
collapse (in the quick preset they do not: the parameter distance at a fixed ``T`` scales like
``1 / alpha``, so ``T / alpha`` is not the variable that the remainder depends on).

The task is a sequence classification task (:func:`telescope.data.sequence_task` named by
``task``, default ``"digits-rows"``: scikit-learn's bundled 8x8 digits as 8 tokens of 8 pixels,
10 classes): ``n_train`` training sequences and ``n_probe`` held-out probes. A sweep point is
``(setting, seed)``; one row per point and logged step: ``train_loss`` (the MSE of ``h``),
``gap_abs``, ``gap_rel``, ``output_scale = mean |h_T(x)|`` and ``param_distance = ||theta_T -
theta_0||``. A non-finite loss stops the point with an error (the Telescope refuses non-finite
parameters too).

The ``quick`` preset runs on a laptop CPU in a minute; the ``full`` preset (eight alphas, a
larger model and MNIST-1D patches, 2000 steps) is meant for a GPU (``device="auto"``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from telescope import plotting as fg
from telescope.lens import Telescope
from telescope.models import LazyModel
from telescope.studies._sequence import (
    Columns,
    check_task,
    check_training,
    encoder,
    load_sequence,
    settings,
    sweep,
)
from telescope.studies.base import Progress, Study
from telescope.studies.constraints import NonEmpty, PositiveFloat, PositiveInt, config_dataclass
from telescope.train import fit, log_spaced_steps

__all__ = ["LazyRegimeConfig", "COLUMNS", "points", "run_point", "figures", "headline", "STUDY"]


# --------------------------------------------------------------------------- config


@config_dataclass
class LazyRegimeConfig:
    """``LazyModel(TinyTransformer, alpha)``, GD on ``MSE / alpha^2``; e.g. ``--set
    alphas=1,8,64 steps=1000``."""

    alphas: NonEmpty[PositiveFloat] = (1.0, 4.0, 16.0, 64.0)
    task: str = "digits-rows"          # the sequence task, or "mnist1d-patches"
    n_train: PositiveInt = 128
    n_probe: PositiveInt = 64          # held-out points the gap is measured on
    d_model: PositiveInt = 32
    n_heads: PositiveInt = 2
    n_layers: PositiveInt = 1
    lr: PositiveFloat = 0.5
    steps: PositiveInt = 300
    evals: PositiveInt = 12            # log-spaced measurement steps (the last: the end)
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"                # "cpu", "cuda", ... or "auto" (cuda when available)
    seeds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_training(self)
        check_task("task", self.task)


PRESETS = {
    "quick": {},
    "full": {"task": "mnist1d-patches",
             "alphas": (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0), "n_train": 512,
             "n_probe": 256, "d_model": 64, "steps": 2000, "evals": 20, "seeds": 3,
             "device": "auto"},
}


# --------------------------------------------------------------------------- one point

COLUMNS = Columns(text=("setting_name",), ints=("step",),
                  floats=("train_loss", "gap_abs", "gap_rel", "output_scale", "param_distance",
                          "seconds"))


def points(config: LazyRegimeConfig) -> list[dict]:
    """The scale ``alpha`` (``setting``) x seed."""
    return sweep(config.alphas, config)


class _LinearizationGap:
    """A :func:`telescope.train.fit` callback: at each measured step, the gap between the
    network and its linearization at ``theta_0`` on the Telescope's probes, and
    ``||theta_T - theta_0||`` of ``params`` (copied at construction)."""

    def __init__(self, telescope: Telescope, params, probe: str = "probe") -> None:
        self.telescope, self.probe = telescope, probe
        self.params = list(params)
        self.theta0 = [p.detach().clone() for p in self.params]

    def measure(self, state) -> dict:
        actual = self.telescope.actual(self.probe).double()
        lin = self.telescope.linearized(self.probe).double()
        gap = float((actual - lin).abs().mean())
        scale = float(actual.abs().mean())
        with torch.no_grad():
            dist = math.sqrt(sum(float((p - p0).double().pow(2).sum())
                                 for p, p0 in zip(self.params, self.theta0, strict=True)))
        return {"gap_abs": gap, "gap_rel": gap / scale if scale > 0 else math.nan,
                "output_scale": scale, "param_distance": dist}


def run_point(config: LazyRegimeConfig, point: dict, progress: Progress) -> list[dict]:
    """Train ``h = alpha (f - f_0)`` by full-batch GD on ``MSE / alpha^2``; the gap to the
    linearization on the log-spaced grid."""
    start = time.perf_counter()
    seed, alpha = int(point["seed"]), float(point["setting"])
    ds, (x, y, x_test, _) = load_sequence(config.task, config.n_train, config.n_probe, seed,
                                          config.device, config.dtype)
    targets = F.one_hot(y, ds.n_classes).to(x.dtype)
    torch.manual_seed(seed)
    inner = encoder(ds, config.d_model, config.n_heads, config.n_layers)
    inner = inner.to(device=x.device, dtype=x.dtype)
    model = LazyModel(inner, alpha)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    # the Telescope follows the optimizer through its own hooks (and stops on non-finite
    # parameters); the gap callback reads h_T and h_lin from it
    with Telescope(model, opt, {"probe": x_test}, every=config.steps,
                   track_linearized=False) as tel:
        history = fit(model, opt, x, targets, steps=config.steps,
                      loss=lambda out, t: model.scale_loss(F.mse_loss(out, t)),
                      eval_at=log_spaced_steps(config.steps, config.evals),
                      evaluate=lambda m: {"train_loss": float(F.mse_loss(m(x), targets))},
                      callbacks=[_LinearizationGap(tel, inner.parameters())],
                      progress=progress)
    rows = [COLUMNS.row(setting_name=f"alpha={alpha:g}", step=r["step"],
                        **{k: r[k] for k in ("train_loss", "gap_abs", "gap_rel", "output_scale",
                                             "param_distance")})
            for r in history.rows]
    rows[-1]["seconds"] = time.perf_counter() - start
    return rows


# --------------------------------------------------------------------------- figures


def figures(df: pd.DataFrame, config: LazyRegimeConfig, out_dir: Path) -> list[Path]:
    """``lazy_regime``: the gap against ``T``, ``alpha x`` gap against ``T``, the gap against
    ``T / alpha`` and the train MSE, per alpha (PNG + SVG)."""
    if df.empty:
        return []
    lazy = df.copy()
    lazy["alpha"] = lazy["setting"]
    lazy["t_over_alpha"] = lazy["step"] / lazy["alpha"]
    lazy["alpha_gap"] = lazy["gap_abs"] * lazy["alpha"]
    panels = (("step", "gap_abs", "step T", "|h_T - h_lin| (mean abs)"),
              ("step", "alpha_gap", "step T", "alpha x gap"),
              ("t_over_alpha", "gap_abs", "T / alpha", "|h_T - h_lin| (mean abs)"),
              ("step", "train_loss", "step T", "train MSE of h"))
    with fg.paper_style():
        fig, axes = fg.new_figure(1, 4, panel_size=(2.9, 2.5))
        for i, (setting, name) in enumerate(settings(df)):
            g = lazy[lazy["setting"] == setting]
            for k, (x, y, _, _) in enumerate(panels):
                fg.plot_mean_spread(axes[0, k], g, x, y, color=fg.color_cycle(i), label=name,
                                    marker="o" if k < 3 else None)
        for k, (_, _, xl, yl) in enumerate(panels):
            fg.log_axis(axes[0, k], "x")
            if k < 3:
                fg.log_axis(axes[0, k], "y")
            axes[0, k].set_xlabel(xl)
            axes[0, k].set_ylabel(yl)
            fg.panel_label(axes[0, k], "abcd"[k])
        axes[0, 0].legend()
        return [fg.save_figure(fig, out_dir, "lazy_regime")]


# --------------------------------------------------------------------------- headline


def headline(df: pd.DataFrame, config: LazyRegimeConfig) -> dict:
    """The linearization gap (absolute, relative) by alpha at the last step every alpha
    reached (means over seeds), its log-log slope in alpha (theory: -1) and the slope between
    the two largest alphas."""
    out: dict = {}
    if df.empty:
        return out
    common = df.groupby("setting")["step"].max().min()   # the last step every alpha reached
    at = df[df["step"] == common].groupby("setting")[["gap_abs", "gap_rel"]].mean()
    out["step T of the gaps below"] = int(common)
    for setting, row in at.iterrows():
        out[f"|h_T - h_lin| at T (alpha={setting:g})"] = float(row["gap_abs"])
        out[f"relative gap at T (alpha={setting:g})"] = float(row["gap_rel"])
    ok = at[(at["gap_abs"] > 0) & np.isfinite(at["gap_abs"])]
    if len(ok) >= 2:
        slope = np.polyfit(np.log(ok.index.to_numpy(float)), np.log(ok["gap_abs"].to_numpy()), 1)
        out["gap scaling exponent in alpha (fit, theory -1)"] = float(slope[0])
        (a1, g1), (a2, g2) = list(ok["gap_abs"].items())[-2:]
        out["gap scaling exponent, two largest alphas"] = float(
            math.log(g2 / g1) / math.log(a2 / a1))
    out["seeds"] = int(df["seed"].nunique())
    return out


GUIDE = """
Lazy regime (Chizat et al. 2019): the figure `lazy_regime.png`, rows in `results.parquet`
(columns `setting` = alpha, `seed`, `step`). Curves are means over seeds, bands their min-max;
step axes are logarithmic.

- **a**: mean absolute gap between the alpha-scaled network and its linearization at
  initialization on held-out probes against step `T`; it should shrink like `1 / alpha`
  (the headline fits the exponent, over all alphas and between the two largest). **b**:
  `alpha x gap` against `T`: the curves collapse when the gap is `~ 1/alpha`; `alpha = 1`
  peels off upwards when the network leaves the lazy regime. **c**: the gap against `T / alpha`
  (no collapse expected there: at fixed `T` the parameter distance is already `~ 1/alpha`).
  **d**: the training loss, nearly the same for every large `alpha` at a fixed `T` (the loss is
  scaled by `1 / alpha^2`, the learning rate is fixed).
"""

STUDY = Study(
    name="lazy-regime",
    description="lazy regime: gap between an alpha-scaled small transformer and its "
                "linearization at init shrinks like 1/alpha",
    config_cls=LazyRegimeConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
)
