"""``hypernetwork-ntk``: when is a hypernetwork linear in its parameters, and what is its kernel?

Littwin, Galanti, Wolf & Yang (2020), "On Infinite-Width Hypernetworks", NeurIPS. A hypernetwork
``h(x, z) = f(x; g(z))`` (:class:`telescope.models.HyperNetwork`) has a meta-network ``g`` that
writes every weight of a primary MLP ``f``; only ``g`` is trained. The paper's two claims, and
what this study measures for each:

(a) **With a finite primary network, a wide meta-network does not make the model linear.** For
an ordinary MLP the first-order Taylor model around the initialization becomes exact as the
width grows (the NTK regime). A hypernetwork's output depends on the primary weights ``g(z)``
through a product of ``H`` layers, and those weights move by order one however wide ``g`` is,
so for a primary of fixed size the first ``H`` terms of its Taylor expansion stay of order one
(the paper's result for a finite primary network). Sweep: the meta width ``n`` for the
hypernetwork (``"hyper"``: primary ``1 -> m -> 1``, ``m = primary_width``, fixed) and for a plain
MLP on ``u = [x, z]`` with the same hidden widths (``"mlp"``), both over ``meta_widths``, and a
hypernetwork whose primary widens with the meta-network (``"hyper-wide"``, ``m = n /
wide_ratio``, over ``wide_meta_widths``: the dually wide case, linear again). Each is trained
by full-batch gradient descent on the mean squared error for ``steps`` steps at ``lr =
lr_fraction * N / lambda_max``, the same fraction of the stability limit of the model's
linearization (``lambda_max``: the top eigenvalue of its infinite-width NTK on the ``N`` training
points), with a :class:`telescope.Telescope` attached. At log-spaced steps ``T`` the relative
**Taylor gap** on the test points is

    ``gap = ||h_T - h_lin,T|| / ||h_T - h_0||``,   ``h_lin,T = h_0 + grad_w h_0 . (w_T - w_0)``

(``Telescope.linearized``): the share of the function's change that the linearization at
initialization misses (``0``: linear, lazy training); ``telescoping_gap`` is the same for the
telescoping model (first order per step), which stays accurate for both.

(b) **When both widen, the NTK becomes the hyperkernel, a Hadamard product.** The empirical NTK
of the hypernetwork (:func:`telescope.ntk`, the structured rule of its meta-network's
``NTKLinear`` layers: exact) on ``n_kernel`` points of every task is compared with the
infinite-width hyperkernel :meth:`telescope.infinite.hypernetwork.HyperMLP.kernel`,
``Theta^h(u, u') = Theta^g(z, z') * Q(u, u')`` (the meta-network's NTK times the primary's NTK
computed with the meta-network's NNGP as the covariance of its weights; derived in that module),
along three series: both widths grow (``n = meta_ratio * m``, ``m`` in ``kernel_primary_widths``),
only the meta width grows (``m = primary_width``), only the primary width grows (``n =
kernel_fixed_meta``). Rows give the relative Frobenius distance to the hyperkernel and to the
plain product of the two networks' own kernels ``Theta^g(z, z') * Theta^f(x, x')``
(:meth:`HyperMLP.hadamard`), which is the limit only for a linear primary or pairs of one task.

Data (:func:`telescope.data.sinusoid_tasks`, generated offline): ``n_tasks`` sinusoids
``y = A sin(x + phi)``, ``A`` uniform in ``amplitude``, ``phi`` uniform in ``[0, pi]``, ``x``
uniform in ``[-pi, pi]`` (standardized for the network); the task embedding ``z`` is ``(cos phi,
sin phi, a)`` on the sphere of radius ``sqrt(3)`` (``a``: the amplitude mapped to ``[-1, 1]``).
Training and test points are different ``x`` of the same tasks. The seed draws the tasks, the
points and the networks.

The ``quick`` preset takes about a minute of CPU time on one thread (three seeds, meta widths
up to 4096, the "both widen" kernels up to ``n = 4096``, ``m = 1024``); ``full`` (wider networks,
more tasks, steps and seeds) is meant for a GPU (``device="auto"``).
"""

from __future__ import annotations

import math
import time
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from annotated_types import Gt, Lt
from torch import Tensor, nn

from telescope import infinite as inf
from telescope import plotting as fg
from telescope.data import Dataset, sinusoid_tasks
from telescope.errors import UsageError
from telescope.infinite.hypernetwork import HyperMLP
from telescope.kernels import kernel_distance
from telescope.kernels import ntk as empirical_ntk
from telescope.lens import Telescope
from telescope.studies.base import Progress, Study, check_device, check_range
from telescope.studies.base import resolve_device as _device
from telescope.studies.constraints import (
    NonEmpty,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
)
from telescope.train import fit, log_spaced_steps

__all__ = ["SinusoidData", "HypernetworkNTKConfig", "points", "run_point", "figures",
           "headline", "STUDY"]

MODELS = ("hyper", "hyper-wide", "mlp")
SERIES = ("both", "meta", "primary")
X_FEATURES, Z_FEATURES = 1, 3


# --------------------------------------------------------------------------- config


@config_dataclass
class SinusoidData:
    """The task family (:func:`telescope.data.sinusoid_tasks`); the kernels use the first
    ``n_kernel`` training points of every task."""

    n_tasks: PositiveInt = 8
    n_train: PositiveInt = 16          # points per task
    n_test: PositiveInt = 16
    n_kernel: PositiveInt = 8
    amplitude: tuple[NonNegativeFloat, NonNegativeFloat] = (0.5, 2.0)

    def __post_init__(self) -> None:
        check_range("data.n_kernel", self.n_kernel, 1, self.n_train)
        if not self.amplitude[0] < self.amplitude[1]:
            raise UsageError(f"data.amplitude must be (lo, hi) with lo < hi, got "
                             f"{self.amplitude}")


@config_dataclass
class HypernetworkNTKConfig:
    """Config of ``hypernetwork-ntk``; e.g. ``--set meta_widths=64,256 steps=200``."""

    data: SinusoidData = field(default_factory=SinusoidData)
    # (a) the Taylor gap
    models: tuple[Literal["hyper", "hyper-wide", "mlp"], ...] = ("hyper", "hyper-wide", "mlp")
    meta_widths: NonEmpty[PositiveInt] = (64, 256, 1024, 4096)    # "hyper" and "mlp"
    primary_width: PositiveInt = 8     # the finite primary (and the "meta only" kernel series)
    wide_meta_widths: NonEmpty[PositiveInt] = (64, 256, 1024)     # "hyper-wide"
    wide_ratio: PositiveInt = 8        # "hyper-wide": primary width = meta width / wide_ratio
    steps: PositiveInt = 300
    lr_fraction: Annotated[float, Gt(0), Lt(1)] = 0.25   # of the stability limit N / lambda_max
    evals: PositiveInt = 6             # log-spaced measurement steps
    # (b) the kernel
    kernel_primary_widths: NonEmpty[PositiveInt] = (16, 64, 256, 1024)   # "both" and "primary"
    meta_ratio: PositiveInt = 4        # "both": meta width = meta_ratio * primary width
    kernel_meta_widths: NonEmpty[PositiveInt] = (64, 256, 1024, 4096, 16384)   # "meta"
    kernel_fixed_meta: PositiveInt = 64   # "primary": the meta width
    kernel_draws: Annotated[int, Gt(0), Lt(1001)] = 3   # networks per kernel point
    # the networks: NTK parametrization, ReLU; primary 1 -> m -> 1, meta 3 -> n -> P
    W_std: PositiveFloat = math.sqrt(2.0)   # hidden layers of all three networks
    readout_std: PositiveFloat = 1.0   # the meta's readout (S(z, z) = 1) and the MLP's
    b_std: NonNegativeFloat = 1.0      # the primary's biases (and the plain MLP's)
    device: str = "cpu"                # "cpu", "cuda", ... or "auto"
    seeds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise UsageError(f"models must name at least one of {', '.join(MODELS)}")
        for key in ("models", "meta_widths", "wide_meta_widths", "kernel_primary_widths",
                    "kernel_meta_widths"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise UsageError(f"{key} must not repeat, got {','.join(map(str, values))}")
        if "hyper-wide" in self.models and min(self.wide_meta_widths) < self.wide_ratio:
            raise UsageError(
                f"hyper-wide needs every wide_meta_widths value >= wide_ratio={self.wide_ratio} "
                f"(its primary width is the meta width / wide_ratio), got "
                f"{','.join(map(str, self.wide_meta_widths))}; lower wide_ratio or drop the small "
                "widths")
        check_device("device", self.device)


PRESETS = {
    "quick": {},
    "full": {"data.n_tasks": 16, "data.n_train": 32, "data.n_test": 32, "data.n_kernel": 8,
             "meta_widths": (64, 128, 256, 512, 1024, 2048, 4096, 8192),
             "wide_meta_widths": (64, 128, 256, 512, 1024, 2048, 4096, 8192), "steps": 2000,
             "evals": 12, "kernel_primary_widths": (16, 32, 64, 128, 256, 512, 1024, 2048),
             "kernel_meta_widths": (64, 256, 1024, 4096, 16384, 65536), "kernel_draws": 5,
             "seeds": 5, "device": "auto"},
}


# --------------------------------------------------------------------------- the sweep


def points(config: HypernetworkNTKConfig) -> list[dict]:
    """(a) model x meta width x seed, then (b) series x width x seed."""
    seeds = range(config.seed, config.seed + config.seeds)
    out: list[dict] = []
    for model in config.models:
        widths = config.wide_meta_widths if model == "hyper-wide" else config.meta_widths
        for n in sorted(widths):
            m = n // config.wide_ratio if model == "hyper-wide" else config.primary_width
            out += [{"part": "taylor", "model": model, "meta_width": int(n),
                     "primary_width": int(m) if model != "mlp" else 0, "seed": int(s)}
                    for s in seeds]
    series: list[tuple[str, int, int]] = []
    series += [("both", config.meta_ratio * m, m) for m in sorted(config.kernel_primary_widths)]
    series += [("meta", n, config.primary_width) for n in sorted(config.kernel_meta_widths)]
    series += [("primary", config.kernel_fixed_meta, m)
               for m in sorted(config.kernel_primary_widths)]
    for name, n, m in series:
        out += [{"part": "kernel", "model": name, "meta_width": int(n), "primary_width": int(m),
                 "seed": int(s)} for s in seeds]
    return out


def _architecture(config: HypernetworkNTKConfig, meta_width: int,
                  primary_width: int) -> HyperMLP:
    """The hypernetwork of a point: meta ``3 -> n -> P`` (ReLU, no biases, hidden scale
    ``W_std``, readout ``readout_std``: with ``|z|^2 = 3`` and the defaults every generated
    weight has variance ``S(z, z) = 1``), primary ``1 -> m -> 1`` (ReLU, ``W_std``, biases
    ``b_std``)."""
    return HyperMLP(inf.serial(inf.Dense(meta_width, W_std=config.W_std), inf.Relu()),
                    X_FEATURES, (primary_width,), activation=inf.Relu(), W_std=config.W_std,
                    b_std=config.b_std, meta_W_std=config.readout_std)


def _plain_mlp(config: HypernetworkNTKConfig, width: int) -> inf.Layer:
    """The plain MLP ``4 -> n -> 1`` on ``u = [x, z]`` (ReLU, hidden scale ``W_std``, readout
    ``readout_std``, biases ``b_std``)."""
    return inf.serial(inf.Dense(width, W_std=config.W_std, b_std=config.b_std), inf.Relu(),
                      inf.Dense(1, W_std=config.readout_std, b_std=config.b_std))


def _data(config: HypernetworkNTKConfig, seed: int) -> Dataset:
    d = config.data
    return sinusoid_tasks(d.n_tasks, d.n_train, d.n_test, seed=seed,
                          amplitude=tuple(d.amplitude))  # type: ignore[arg-type]


def _rms(t: Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


class _TaylorGap:
    """A :func:`telescope.train.fit` callback: on the Telescope's ``test`` probes, the share of
    the change ``h_T - h_0`` that the linearization at initialization (and the telescoping
    model) misses."""

    def __init__(self, telescope: Telescope) -> None:
        self.telescope = telescope

    def measure(self, state) -> dict:
        tel = self.telescope
        actual, start = tel.actual("test"), tel.initial("test")
        change = _rms(actual - start)
        lin, tele = _rms(actual - tel.linearized("test")), _rms(actual - tel.telescoping("test"))
        return {"change": change, "gap_abs": lin,
                "gap": lin / change if change > 0 else math.nan,
                "telescoping_gap": tele / change if change > 0 else math.nan}


def _taylor_point(config: HypernetworkNTKConfig, point: dict, progress: Progress) -> list[dict]:
    start = time.perf_counter()
    seed, n, model_name = int(point["seed"]), int(point["meta_width"]), point["model"]
    device = _device(config.device)
    data = _data(config, seed)
    if model_name == "mlp":
        arch = _plain_mlp(config, n)
        k_inf = arch.kernel(data.x_train.double())["ntk"]
        torch.manual_seed(seed)
        model: nn.Module = arch.module((X_FEATURES + Z_FEATURES,))
    else:
        hyper = _architecture(config, n, int(point["primary_width"]))
        k_inf = hyper.kernel(data.x_train.double())["ntk"]
        torch.manual_seed(seed)
        model = hyper.module(Z_FEATURES)
    # GD on the mean squared error moves the linearized model's residual by (1 - 2 lr s / N)
    # along the kernel's eigenvalue s: stable for lr < N / lambda_max
    n_train = data.x_train.shape[0]
    lr = config.lr_fraction * n_train / float(torch.linalg.eigvalsh(k_inf)[-1])
    model = model.to(device)
    u, y = data.x_train.to(device), data.y_train.to(device)
    u_test, y_test = data.x_test.to(device), data.y_test.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with Telescope(model, opt, {"test": u_test}, every=config.steps,
                   track_linearized=False) as tel:
        history = fit(model, opt, u, y, steps=config.steps,
                      eval_at=log_spaced_steps(config.steps, config.evals),
                      evaluate=lambda m: {"train_mse": float(F.mse_loss(m(u), y)),
                                          "test_mse": float(F.mse_loss(m(u_test), y_test))},
                      callbacks=[_TaylorGap(tel)], progress=progress)
    n_params = sum(p.numel() for p in model.parameters())
    rows = [{"kind": "taylor", "step": int(r["step"]), "train_mse": r["train_mse"],
             "test_mse": r["test_mse"], "gap": r["gap"], "gap_abs": r["gap_abs"],
             "telescoping_gap": r["telescoping_gap"], "change": r["change"], "lr": lr,
             "n_params": int(n_params)} for r in history.rows]
    rows[-1]["seconds"] = time.perf_counter() - start
    return rows


def _rel(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def _draw_seed(seed: int, draw: int) -> int:
    return int(np.random.SeedSequence([seed, draw]).generate_state(1)[0])


def _kernel_point(config: HypernetworkNTKConfig, point: dict, progress: Progress) -> list[dict]:
    seed, n, m = int(point["seed"]), int(point["meta_width"]), int(point["primary_width"])
    device = _device(config.device)
    data = _data(config, seed)
    d = config.data
    u = data.x_train.reshape(d.n_tasks, d.n_train, -1)[:, :d.n_kernel].reshape(
        d.n_tasks * d.n_kernel, -1)
    arch = _architecture(config, n, m)
    exact = arch.kernel(u.double())["ntk"]
    naive = arch.hadamard(u.double())["ntk"]
    progress.set(config.kernel_draws)
    rows: list[dict] = []
    for draw in range(config.kernel_draws):
        start = time.perf_counter()
        torch.manual_seed(_draw_seed(seed, draw))
        net = arch.module(Z_FEATURES).to(device)
        k = empirical_ntk(net, u.to(device)).double().cpu()
        rows.append({"kind": "distance", "draw": draw, "dist_exact": _rel(k, exact),
                     "dist_naive": _rel(k, naive), "cos_exact": kernel_distance(k, exact),
                     "cos_naive": kernel_distance(k, naive),
                     "naive_vs_exact": _rel(naive, exact),
                     "n_params": int(sum(p.numel() for p in net.parameters())),
                     "seconds": time.perf_counter() - start})
        if draw == 0:   # one row of the kernel: example 0 (task 0) against every example
            rows += [{"kind": "slice", "draw": 0, "j": j, "same_task": j < d.n_kernel,
                      "empirical": float(k[0, j]), "exact": float(exact[0, j]),
                      "naive": float(naive[0, j])} for j in range(u.shape[0])]
        progress.update()
        del net
    return rows


def run_point(config: HypernetworkNTKConfig, point: dict, progress: Progress) -> list[dict]:
    """(a) one training with its Taylor gaps at log-spaced steps, or (b) the empirical NTKs of
    ``kernel_draws`` networks against the hyperkernel and the plain product."""
    if point["part"] == "taylor":
        return _taylor_point(config, point, progress)
    return _kernel_point(config, point, progress)


def estimate_memory(config: HypernetworkNTKConfig, point: dict) -> int:
    """About the peak bytes of a point: the meta-network's readout ``n x P`` (``P = 3 m + 1``)
    with its gradient and the Telescope's three copies, and the ``[N, n]`` and ``[N, P]``
    activations of training or of the structured kernel, in float32."""
    n, m = int(point["meta_width"]), max(int(point["primary_width"]), 1)
    d = config.data
    params = n * (3 * m + 1 + Z_FEATURES + 1)
    examples = d.n_tasks * (d.n_train + d.n_test)
    return 4 * (6 * params + 8 * examples * (n + 3 * m + 1)) + 2**26


# --------------------------------------------------------------------------- figures

_LABELS = {"hyper": "hypernetwork, primary width {m}", "hyper-wide": "hypernetwork, primary "
           "width n/{r}", "mlp": "plain MLP (same hidden widths)"}
_SERIES = {"both": "both widen (n = {k} m)", "meta": "meta only (m = {m})",
           "primary": "primary only (n = {n})"}


def _taylor(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["part"] == "taylor") & (df["kind"] == "taylor")] if "kind" in df else df[:0]


def _distances(df: pd.DataFrame) -> pd.DataFrame:
    out = df[(df["part"] == "kernel") & (df["kind"] == "distance")].copy()
    out["width"] = np.where(out["model"] == "primary", out["primary_width"], out["meta_width"])
    return out


def _label(model: str, config: HypernetworkNTKConfig) -> str:
    return _LABELS[model].format(m=config.primary_width, r=config.wide_ratio)


def _series_label(series: str, config: HypernetworkNTKConfig) -> str:
    return _SERIES[series].format(k=config.meta_ratio, m=config.primary_width,
                                  n=config.kernel_fixed_meta)


def figures(df: pd.DataFrame, config: HypernetworkNTKConfig, out_dir: Path) -> list[Path]:
    """``hypernetwork_taylor.png``: (a) the Taylor gap at the last step against the meta width,
    (b) the gap through training at the largest width. ``hypernetwork_kernel.png``: (a) the
    distance of the empirical NTK to the hyperkernel along the three series (and to the plain
    product, dashed), (b) one row of the kernels at the widest "both" point."""
    paths = []
    taylor, dist = _taylor(df), _distances(df)
    with fg.paper_style():
        if not taylor.empty:
            fig, axes = fg.new_figure(1, 2)
            last = taylor[taylor["step"] == taylor["step"].max()]
            ax = axes[0, 0]
            for i, (model, sub) in enumerate(last.groupby("model", sort=False)):
                fg.plot_mean_spread(ax, sub, "meta_width", "gap", label=_label(model, config),
                                    color=fg.color_cycle(i))
            widths = sorted(last["meta_width"].unique())
            fg.log_axis(ax, "x", base=2, ticks=fg.sparse_ticks(widths))
            fg.log_axis(ax, "y")
            ax.set_xlabel("meta width n")
            ax.set_ylabel("||h_T - h_lin|| / ||h_T - h_0||")
            ax.set_title(f"Taylor gap after {int(last['step'].max())} GD steps")
            ax.legend(fontsize=7)
            ax = axes[0, 1]
            for i, (model, sub) in enumerate(taylor.groupby("model", sort=False)):
                widest = sub[sub["meta_width"] == sub["meta_width"].max()]
                fg.plot_mean_spread(ax, widest, "step", "gap", color=fg.color_cycle(i),
                                    label=f"{model}, n = {int(widest['meta_width'].max())}")
                fg.plot_mean_spread(ax, widest, "step", "telescoping_gap",
                                    color=fg.color_cycle(i), ls=":", marker=None)
            fg.log_axis(ax, "x")
            fg.log_axis(ax, "y")
            ax.set_xlabel("step T")
            ax.set_ylabel("gap (dotted: telescoping model)")
            ax.set_title("each model at its largest meta width")
            ax.legend(fontsize=7)
            for ax, letter in zip(axes[0], "ab", strict=True):
                fg.panel_label(ax, letter)
            paths.append(fg.save_figure(fig, out_dir, "hypernetwork_taylor"))
        if not dist.empty:
            fig, axes = fg.new_figure(1, 2, panel_size=(3.6, 2.8))
            ax = axes[0, 0]
            for i, series in enumerate(SERIES):
                sub = dist[dist["model"] == series]
                if sub.empty:
                    continue
                fg.plot_mean_spread(ax, sub, "width", "dist_exact", spread="sem",
                                    label=_series_label(series, config), color=fg.color_cycle(i))
                if series == "both":
                    fg.plot_mean_spread(ax, sub, "width", "dist_naive", spread="sem", ls="--",
                                        marker=None, color=fg.color_cycle(i),
                                        label="both widen, vs plain product")
                    s = sub.groupby("width")["dist_exact"].mean()
                    w = s.index.to_numpy(float)
                    ax.plot(w, s.iloc[0] * (w / w[0]) ** -0.5, ls=":",
                            color=fg.COLORS["linearized"], label="slope width^-1/2")
            fg.log_axis(ax, "x", base=2,
                        ticks=fg.sparse_ticks(sorted(dist["width"].unique()), most=6))
            fg.log_axis(ax, "y")
            ax.set_xlabel("the width that grows")
            ax.set_ylabel("||K - K_hyper||_F / ||K_hyper||_F")
            ax.legend(fontsize=6)
            ax = axes[0, 1]
            both = df[(df["part"] == "kernel") & (df["kind"] == "slice")
                      & (df["model"] == "both")]
            if not both.empty:
                widest = both[both["meta_width"] == both["meta_width"].max()]
                first = widest[widest["seed"] == widest["seed"].min()].sort_values("j")
                ax.plot(first["j"], first["empirical"], color=fg.COLORS["network"], lw=1.0,
                        label=f"empirical (n={int(first['meta_width'].iloc[0])}, "
                              f"m={int(first['primary_width'].iloc[0])})")
                ax.plot(first["j"], first["exact"], color=fg.COLORS["telescoping"], ls="--",
                        label="hyperkernel Theta^g * Q")
                ax.plot(first["j"], first["naive"], color=fg.COLORS["linearized"], ls=":",
                        label="plain product Theta^g * Theta^f")
                ax.axvspan(-0.5, config.data.n_kernel - 0.5, color="#eeeeee", zorder=0)
                ax.set_xlabel("example j (grey: the same task as example 0)")
                ax.set_ylabel("Theta(u_0, u_j)")
                ax.legend(fontsize=6)
            for ax, letter in zip(axes[0], "ab", strict=True):
                fg.panel_label(ax, letter)
            paths.append(fg.save_figure(fig, out_dir, "hypernetwork_kernel"))
    return paths


# --------------------------------------------------------------------------- headline


def _slope(s: pd.Series) -> float:
    if len(s) < 2:
        return math.nan
    return float(np.polyfit(np.log(s.index.to_numpy(float)), np.log(s.to_numpy(float)), 1)[0])


def headline(df: pd.DataFrame, config: HypernetworkNTKConfig) -> dict:
    """(a) the Taylor gap at the last step at the smallest and largest meta width per model
    (mean and min-max over seeds) and its log-log slope in the width; (b) the distance of the
    empirical NTK to the hyperkernel at the largest width of each series, the fitted exponent
    of its decay when both widen, and the distance of the plain product to the hyperkernel."""
    out: dict = {}
    taylor, dist = _taylor(df), _distances(df)
    words: list[str] = []
    if not taylor.empty:
        last = taylor[taylor["step"] == taylor["step"].max()]
        out["step T of the Taylor gaps"] = int(last["step"].max())
        slopes = {}
        for model, sub in last.groupby("model", sort=False):
            by = sub.groupby("meta_width")["gap"]
            mean = by.mean()
            for w in sorted({mean.index.min(), mean.index.max()}):
                out[f"Taylor gap ({model}, meta width {w})"] = float(mean[w])
                out[f"Taylor gap min-max over seeds ({model}, meta width {w})"] = (
                    f"{by.min()[w]:.3g}-{by.max()[w]:.3g}")
            slopes[model] = _slope(mean)
            out[f"Taylor gap slope in log meta width ({model})"] = slopes[model]
        if "hyper" in slopes and "mlp" in slopes:
            wmax = int(last[last["model"].isin(("hyper", "mlp"))]["meta_width"].max())
            gh = out.get(f"Taylor gap (hyper, meta width {wmax})", math.nan)
            gm = out.get(f"Taylor gap (mlp, meta width {wmax})", math.nan)
            at = last[last["meta_width"] == wmax].groupby("model")["gap"]
            ratio = float(at.min().get("hyper", math.nan) / at.max().get("mlp", math.nan))
            key = f"smallest hypernetwork gap over seeds / largest MLP gap (meta width {wmax})"
            out[key] = ratio
            words.append(
                f"(a) With a finite primary (width {config.primary_width}) the hypernetwork's "
                f"Taylor gap does not shrink with the meta width (log-log slope "
                f"{slopes['hyper']:.2f}; {gh:.3g} at width {wmax}), while the plain MLP's does "
                f"(slope {slopes['mlp']:.2f}; {gm:.3g} at width {wmax}, "
                f"{gh / gm:.3g}x smaller; the hypernetwork's smallest gap over seeds is "
                f"{ratio:.3g}x the MLP's largest)")
        if "hyper-wide" in slopes:
            wide = last[last["model"] == "hyper-wide"].groupby("meta_width")["gap"].mean()
            words.append(
                f"a hypernetwork whose primary widens too (m = n/{config.wide_ratio}) becomes "
                f"linear again: gap {wide.iloc[0]:.3g} at n = {int(wide.index[0])}, "
                f"{wide.iloc[-1]:.3g} at n = {int(wide.index[-1])} (slope "
                f"{slopes['hyper-wide']:.2f})")
    if not dist.empty:
        for series in SERIES:
            sub = dist[dist["model"] == series]
            if sub.empty:
                continue
            mean = sub.groupby("width")["dist_exact"].mean()
            w = int(mean.index.max())
            out[f"distance to the hyperkernel ({series}, largest width {w})"] = float(mean[w])
            out[f"distance to the hyperkernel ({series}, smallest width "
                f"{int(mean.index.min())})"] = float(mean.iloc[0])
            if series == "both":
                rate = _slope(mean)
                out["hyperkernel convergence exponent (both widen, fit)"] = rate
                naive = sub.groupby("width")["dist_naive"].mean()
                out[f"distance to the plain product ({series}, largest width {w})"] = float(
                    naive[w])
                words.append(
                    f"(b) when both widen the empirical NTK approaches the hyperkernel "
                    f"Theta^g(z,z') * Q(u,u') (distance {mean.iloc[0]:.3g} -> {mean[w]:.3g}, "
                    f"exponent {rate:.2f} in the meta width) but not the plain product "
                    f"Theta^g * Theta^f ({naive[w]:.3g} at the largest width)")
            elif len(mean) > 1:
                words.append(f"{'only the meta' if series == 'meta' else 'only the primary'} "
                             f"widening leaves it at {mean[w]:.3g}")
        out["distance of the plain product to the hyperkernel"] = float(
            dist["naive_vs_exact"].mean())
    out["seeds"] = int(df["seed"].nunique())
    if words:
        out["answer"] = "; ".join(words) + "."
    return out


GUIDE = """
Littwin, Galanti, Wolf & Yang (2020), "On Infinite-Width Hypernetworks": a meta-network g writes
all the weights of a primary MLP f, h(x, z) = f(x; g(z)); only g is trained. Tasks: sinusoids
y = A sin(x + phi), the task embedding z encodes (A, phi).

# Figure hypernetwork_taylor

- **Panel a**: the Taylor gap ||h_T - h_lin|| / ||h_T - h_0|| on test points after training,
  against the meta width (mean over seeds, band: min to max). h_lin is the model linearized at
  initialization evaluated at the trained parameters: 0 means the network trained like its
  linearization (the NTK regime). The plain MLP's gap falls with the width; the hypernetwork's
  with a finite primary does not (the paper: for a primary network of fixed size its first H
  Taylor terms stay of order one). The "hyper-wide" hypernetwork, whose primary widens with
  the meta-network (m = n/8), falls again: only the dually wide hypernetwork trains like its
  linearization.
- **Panel b**: the gap through training, each model at its largest width; dotted, the
  telescoping model (first order one step at a time), far more accurate in every case.

# Figure hypernetwork_kernel

- **Panel a**: the relative distance of the hypernetwork's empirical NTK (telescope.ntk) to the
  infinite-width hyperkernel Theta^g(z, z') * Q(u, u') as widths grow: both (the kernel converges,
  the dotted line is width^-1/2), only the meta-network or only the primary (it does not: the
  kernel stays random). Mean over seeds and network draws, band: standard error. Dashed: the
  distance to the plain product Theta^g(z, z') * Theta^f(x, x') of the two networks' own NTKs,
  which is not the limit when tasks differ.
- **Panel b**: one row of the kernels at the widest point: example 0 against every example, the
  examples of its own task shaded. There (S(z, z) = 1) the plain product is exact; across tasks
  the primary's weights are only partly correlated, which the primary's ReLUs see, and the plain
  product misses it.

Everything is in `results.parquet`: part "taylor" rows (kind "taylor", one per measured step) and
part "kernel" rows (kind "distance" per network draw, kind "slice" for panel b).
"""

STUDY = Study(
    name="hypernetwork-ntk",
    description="Hypernetworks (Littwin et al. 2020): a finite primary keeps them nonlinear "
                "however wide the meta-network; with both wide the NTK is the hyperkernel",
    config_cls=HypernetworkNTKConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
    estimate_memory=estimate_memory,
)
