"""``ntk-width``: the empirical NTK of finite MLPs against the infinite-width NTK they converge to.

Jacot, Gabriel & Hongler (NeurIPS 2018) show that the tangent kernel of a network in the NTK
parametrization tends, as the hidden widths grow, to a deterministic kernel that depends on the
architecture only (the infinite-width NTK); its fluctuations at initialization shrink like
``width**-1/2``. Kernel regression with that kernel, converged, is what NTK theory predicts for a
network trained to convergence with the squared loss.

One sweep point is (width, seed). For a finite width, the NTK-parametrized ReLU MLP
``40-W-...-W-10`` (``depth`` hidden layers, initialized with ``torch.manual_seed(seed)``) gets
its empirical NTK on the MNIST-1D training points (:func:`telescope.ntk` with
``output="trace"``, divided by the 10 outputs: the single-output kernel) in float64; the point
``width = inf`` takes the infinite-width NTK of the same architecture
(:func:`telescope.infinite_ntk`, float64). The point's first row (``kind = "kernel"``) holds the
relative Frobenius distance to the infinite NTK ``||K - K_inf||_F / ||K_inf||_F``, their centered
alignment, the effective rank, the time of the kernel call on the training points
(``ntk_seconds``, after a warm-up call on two points for the empirical kernel), and the test
accuracy of converged kernel regression on one-hot labels with a ridge of ``ridge`` times the mean
of the kernel's diagonal; then one row per eigenvalue (``kind = "spectrum"``, ``index`` 1 for the
largest, ``eigenvalue``). The seed also draws the data (``load_mnist1d(seed=seed)``).

The ``quick`` preset (256 training and 1000 test points, widths 64, 256, 512, one seed) runs in
seconds on a laptop CPU; ``full`` sweeps widths 64 to 4096 on 1000 training points over five
seeds, for a GPU (``device="auto"``): on one CPU thread its width-4096 points take about four
minutes each (``telescope.ntk`` works in blocks of ``ntk_memory_gb``; more memory, larger blocks).
"""

from __future__ import annotations

import math
import time
from dataclasses import field
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch
from annotated_types import Ge
from torch import Tensor, nn

from telescope import plotting as fg
from telescope.data import load_mnist1d
from telescope.errors import UsageError
from telescope.infinite import infinite_ntk
from telescope.kernels import alignment, effective_rank, kernel_regression, spectrum
from telescope.kernels import ntk as empirical_ntk
from telescope.models import MLP
from telescope.studies.base import Progress, Study, check_device
from telescope.studies.base import resolve_device as _device
from telescope.studies.constraints import NonEmpty, PositiveFloat, PositiveInt, config_dataclass

__all__ = ["MNIST1DData", "NTKWidthConfig", "points", "run_point", "figures", "headline", "STUDY"]


@config_dataclass
class MNIST1DData:
    """MNIST-1D (:func:`telescope.data.load_mnist1d`, 40 inputs, 10 classes): the first
    ``n_train`` points of the training split make the kernel, the first ``n_test`` of the test
    split are predicted."""

    n_train: Annotated[int, Ge(2)] = 256
    n_test: PositiveInt = 1000


@config_dataclass
class NTKWidthConfig:
    """Config of ``ntk-width``; e.g. ``--set widths=16,32,64 data.n_train=64``."""

    data: MNIST1DData = field(default_factory=MNIST1DData)
    # finite widths; the infinite one is always added
    widths: NonEmpty[PositiveInt] = (64, 256, 512)
    depth: PositiveInt = 2                     # hidden layers
    ridge: PositiveFloat = 1e-4                # kernel regression: ridge / mean diagonal
    ntk_memory_gb: PositiveFloat = 2.0         # telescope.ntk's max_memory_gb (its blocks)
    device: str = "cpu"                        # "cpu", "cuda", ... or "auto"
    seeds: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if len(set(self.widths)) != len(self.widths):
            raise UsageError(f"widths must not repeat, got {self.widths}")
        check_device("device", self.device)


PRESETS = {
    "quick": {},
    "full": {"data.n_train": 1000, "data.n_test": 1000, "seeds": 5, "device": "auto",
             "widths": (64, 128, 256, 512, 1024, 2048, 4096)},
}


def points(config: NTKWidthConfig) -> list[dict]:
    """Every width in increasing order, then the infinite width, for every seed."""
    seeds = range(config.seed, config.seed + config.seeds)
    widths = [float(w) for w in sorted(config.widths)] + [math.inf]
    return [{"width": w, "seed": int(s)} for w in widths for s in seeds]


def estimate_memory(config: NTKWidthConfig, point: dict) -> int:
    """The float64 kernels of one point: the ``[n, n]`` infinite and empirical kernels with a
    copy each, and the ``[n_test, n]`` test-train kernels; for a finite width also
    :func:`telescope.ntk`'s block budget (``ntk_memory_gb``)."""
    n, n_test = config.data.n_train, config.data.n_test
    kernels = 8 * (4 * n * n + 2 * n_test * n)
    if math.isinf(float(point["width"])):
        return kernels
    return kernels + int(config.ntk_memory_gb * 2**30)


def _onehot(y: Tensor, n_classes: int) -> Tensor:
    return nn.functional.one_hot(y.long(), n_classes).to(torch.float64)


def _kr_accuracy(k_tt: Tensor, k_st: Tensor, y_train: Tensor, y_test: Tensor, n_classes: int,
                 ridge: float) -> float:
    """Test accuracy of converged kernel regression on one-hot targets, ridge relative to the
    mean diagonal."""
    pred = kernel_regression(k_tt, k_st, _onehot(y_train, n_classes).to(k_tt.device),
                             ridge=ridge * float(k_tt.diagonal().mean()))
    return float((pred.argmax(dim=1) == y_test.to(pred.device)).double().mean())


def run_point(config: NTKWidthConfig, point: dict, progress: Progress) -> list[dict]:
    """The kernel of one width (or the infinite-width one) and how it compares with the
    infinite-width NTK: one ``kernel`` row, then its eigen-spectrum."""
    width, seed = float(point["width"]), int(point["seed"])
    device = _device(config.device)
    n, n_test = config.data.n_train, config.data.n_test
    data = load_mnist1d(n_train=n, n_test=n_test, seed=seed)
    x, y = data.x_train[:n].to(device), data.y_train[:n]
    x_test, y_test = data.x_test[:n_test].to(device), data.y_test[:n_test]
    n_classes, d_in = int(data.n_classes), int(x.shape[1])
    x64, x_test64 = x.to(torch.float64), x_test.to(torch.float64)
    progress.set(2)

    start = time.perf_counter()
    k_inf = infinite_ntk(x64, depth=config.depth, activation="relu")["ntk"]
    inf_seconds = time.perf_counter() - start
    if math.isinf(width):
        k_st = infinite_ntk(x_test64, x64, depth=config.depth, activation="relu")["ntk"]
        k, row = k_inf, {"rel_frobenius": 0.0, "alignment": 1.0, "ntk_seconds": inf_seconds}
        progress.update(2)
    else:
        progress.update()
        torch.manual_seed(seed)
        model = MLP(d_in, [int(width)] * config.depth, n_classes, activation="relu",
                    parametrization="ntk").to(device)
        budget = {"output": "trace", "max_memory_gb": config.ntk_memory_gb}
        empirical_ntk(model, x[:2], **budget)  # warm-up: lazy imports, first-call setup
        start = time.perf_counter()
        k_raw = empirical_ntk(model, x, **budget)
        seconds = time.perf_counter() - start
        k = k_raw.to(torch.float64) / n_classes
        k_st = empirical_ntk(model, x_test, x, **budget).to(torch.float64) / n_classes
        row = {"n_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "rel_frobenius": float(torch.linalg.matrix_norm(k - k_inf)
                                      / torch.linalg.matrix_norm(k_inf)),
               "alignment": float(alignment(k, k_inf)), "ntk_seconds": seconds}
        progress.update()
    row.update(effective_rank=float(effective_rank(k)),
               test_accuracy=_kr_accuracy(k, k_st, y, y_test, n_classes, config.ridge))
    setup = {"n_train": int(x.shape[0]), "n_test": int(x_test.shape[0])}
    eig = spectrum(k).cpu().tolist()
    return [{"kind": "kernel", **row, **setup},
            *({"kind": "spectrum", "index": i, "eigenvalue": v, **setup}
              for i, v in enumerate(eig, 1))]


# --------------------------------------------------------------------------- figures


def _kernels(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["kind"] == "kernel"]


def figures(df: pd.DataFrame, config: NTKWidthConfig, out_dir: Path) -> list[Path]:
    """``ntk_width.png``: (a) relative distance of the empirical to the infinite NTK by width,
    with the ``width**-1/2`` slope of the fluctuations; (b) their alignment; (c) the test
    accuracy of converged kernel regression with each kernel, the infinite one as a dashed
    line. ``ntk_width_spectra.png``: the eigen-spectra of the first seed's kernels."""
    kern = _kernels(df)
    finite, inf = kern[np.isfinite(kern["width"])], kern[np.isinf(kern["width"])]
    widths = sorted(finite["width"].unique())
    paths = []
    with fg.paper_style():
        fig, axes = fg.new_figure(1, 3)
        for ax, col, label in ((axes[0, 0], "rel_frobenius", "||K - K_inf||_F / ||K_inf||_F"),
                               (axes[0, 1], "alignment", "centered alignment with K_inf"),
                               (axes[0, 2], "test_accuracy", "kernel-regression test accuracy")):
            if widths:
                fg.plot_mean_spread(ax, finite, "width", col, label="empirical NTK",
                                    color=fg.COLORS["network"])
                fg.log_axis(ax, "x", base=2, ticks=fg.sparse_ticks(widths))
            ax.set_xlabel("hidden width")
            ax.set_ylabel(label)
        if widths:
            ax = axes[0, 0]
            fg.log_axis(ax, "y")
            start = finite[finite["width"] == widths[0]]["rel_frobenius"].mean()
            ax.plot(widths, [start * (w / widths[0]) ** -0.5 for w in widths], ls=":",
                    color=fg.COLORS["linearized"], label="slope width^-1/2")
            ax.legend()
        if not inf.empty:
            ax = axes[0, 2]
            ax.axhline(float(inf["test_accuracy"].mean()), ls="--", color=fg.COLORS["telescoping"],
                       label="infinite-width NTK")
            ax.legend()
        for ax, letter in zip(axes[0], "abc", strict=True):
            fg.panel_label(ax, letter)
        paths.append(fg.save_figure(fig, out_dir, "ntk_width"))

        spec = df[(df["kind"] == "spectrum") & (df["seed"] == df["seed"].min())
                  & (df["eigenvalue"] > 0)]
        fig, axes = fg.new_figure(1, 1, panel_size=(4.2, 3.2))
        ax = axes[0, 0]
        for i, (width, sub) in enumerate(spec.groupby("width", sort=True)):
            if math.isinf(width):
                style = {"color": "black", "ls": "--", "lw": 1.6, "label": "infinite"}
            else:
                style = {"color": fg.color_cycle(i), "lw": 1.2, "label": f"width {width:g}"}
            ax.plot(sub["index"], sub["eigenvalue"], **style)
        fg.log_axis(ax, "y")
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue")
        ax.set_title(f"eigen-spectra (seed {int(df['seed'].min())})")
        ax.legend()
        paths.append(fg.save_figure(fig, out_dir, "ntk_width_spectra"))
    return paths


# --------------------------------------------------------------------------- headline


def headline(df: pd.DataFrame, config: NTKWidthConfig) -> dict:
    """At the widest width (mean over seeds): the distance to and alignment with the infinite
    NTK, and the kernel-regression test accuracy against the infinite NTK's; the slope of the
    log distance against the log width (``-1/2`` for fluctuations of order ``width**-1/2``)."""
    kern = _kernels(df)
    if kern.empty:
        return {}
    finite = kern[np.isfinite(kern["width"])]
    inf = kern[np.isinf(kern["width"])]
    out: dict = {}
    if not finite.empty:
        by_width = finite.groupby("width")[["rel_frobenius", "alignment", "test_accuracy"]].mean()
        widest = float(by_width.index.max())
        w = f"width {widest:g}"
        out[f"relative distance to the infinite NTK, {w}"] = float(
            by_width.loc[widest, "rel_frobenius"])
        out[f"alignment with the infinite NTK, {w}"] = float(by_width.loc[widest, "alignment"])
        out[f"kernel-regression test accuracy, {w}"] = float(
            by_width.loc[widest, "test_accuracy"])
        if len(by_width) > 1:
            slope = np.polyfit(np.log(by_width.index.to_numpy(float)),
                               np.log(by_width["rel_frobenius"].to_numpy(float)), 1)[0]
            out["slope of log distance vs log width"] = float(slope)
    if not inf.empty:
        out["kernel-regression test accuracy, infinite NTK"] = float(inf["test_accuracy"].mean())
    out["seeds"] = int(kern["seed"].nunique())
    return out


GUIDE = """
The tangent kernel of NTK-parametrized ReLU MLPs on MNIST-1D at initialization, against the
infinite-width NTK it converges to (Jacot et al. 2018). Kernels are on the training points; the
empirical one is summed over the 10 outputs and divided by them.

- **Panel a**: relative Frobenius distance to the infinite-width NTK by width, log-log; the
  dotted line is the `width^-1/2` slope of the kernel's fluctuations at initialization.
- **Panel b**: centered kernel alignment with the infinite-width NTK (1: the same up to scale).
- **Panel c**: test accuracy of converged kernel regression on one-hot labels with each kernel,
  what NTK theory predicts for the network trained to convergence with the squared loss; the
  dashed line is the infinite-width kernel's.
- `ntk_width_spectra.png`: the eigenvalues of every kernel, largest first, log scale.

Everything is in `results.parquet`: per (width, seed) one `kind = "kernel"` row (`width` is
`inf` for the infinite-width NTK) and one `kind = "spectrum"` row per eigenvalue.
"""

STUDY = Study(
    name="ntk-width",
    description="empirical vs infinite-width NTK of ReLU MLPs on MNIST-1D by width: distance, "
                "alignment, spectra, kernel-regression accuracy",
    config_cls=NTKWidthConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
    estimate_memory=estimate_memory,
)
