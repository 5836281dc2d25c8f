"""Shared matplotlib helpers for the studies' figures, in the style of the paper.

They sit at the bottom of the layers (they import only :mod:`telescope.errors` and
:mod:`telescope._io`), so every study can use them without importing the report or run machinery
above it.

The paper's figures are small multiples: panels side by side with shared axes, widths on a log
axis, and for every curve the mean over seeds as a line with the spread over seeds (min-max, or
+-1 std) shaded around it. A study's ``figures`` function typically reads::

    from telescope import plotting as fg

    def figures(df, config, out_dir):
        with fg.paper_style():
            fig, axes = fg.new_figure(1, 2, sharey=True)
            for label, sub in df.groupby("label_noise"):
                fg.plot_mean_spread(axes[0, 0], sub, "width", "test_error",
                                    label=f"noise {label}")
            fg.log_axis(axes[0, 0], "x", base=2)
            axes[0, 0].legend()
            return [fg.save_figure(fig, out_dir, "test_error")]

Figures are plain :class:`matplotlib.figure.Figure` objects rendered with the Agg canvas: no
pyplot, no display, no global state, so they are safe in worker processes and leak nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from telescope._io import atomic_write
from telescope.errors import UsageError

__all__ = ["STYLE", "COLORS", "paper_style", "new_figure", "seed_summary", "plot_mean_spread",
           "log_axis", "panel_label", "save_figure", "color_cycle"]

STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "axes.linewidth": 0.8,
    "lines.linewidth": 1.6,
    "lines.markersize": 3.5,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "svg.fonttype": "none",
    "svg.hashsalt": "telescope",
}
"""rcParams of the paper style (applied by :func:`paper_style`)."""

COLORS: dict[str, str] = {
    "network": "#222222",
    "telescoping": "#d62728",
    "linearized": "#8c8c8c",
    "train": "#1f77b4",
    "test": "#ff7f0e",
    "p_train": "#1f77b4",
    "p_test": "#ff7f0e",
    "trees": "#2ca02c",
    "net": "#9467bd",
}
"""Colors of the recurring quantities, so every study draws them alike."""

_CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]


def color_cycle(i: int) -> str:
    """The ``i``-th color of the default cycle (wraps around)."""
    return _CYCLE[i % len(_CYCLE)]


@contextlib.contextmanager
def paper_style(**overrides: Any) -> Iterator[None]:
    """Context manager applying :data:`STYLE` (plus ``overrides``) to the figures made in it."""
    with rc_context({**STYLE, **overrides}):
        yield


def new_figure(nrows: int = 1, ncols: int = 1, *, panel_size: tuple[float, float] = (3.2, 2.6),
               sharex: bool | str = False, sharey: bool | str = False,
               **subplot_kw: Any) -> tuple[Figure, np.ndarray]:
    """A figure of ``nrows x ncols`` panels of ``panel_size`` inches, constrained layout.

    Returns ``(fig, axes)`` with ``axes`` always a 2-d array (``axes[row, col]``).
    """
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=False,
                        subplot_kw=subplot_kw or None)
    return fig, axes


def seed_summary(df: pd.DataFrame, x: str, y: str, *, by: str | Sequence[str] = (),
                 spread: Literal["minmax", "std", "sem"] = "minmax") -> pd.DataFrame:
    """Mean and spread of ``y`` over seeds (all rows sharing ``by`` and ``x``).

    Returns a DataFrame with the ``by`` columns, ``x``, ``mean``, ``lo``, ``hi`` and ``n``,
    sorted by ``x``: ``lo``/``hi`` are the min and max over seeds (``"minmax"``), or mean -+ one
    standard deviation (``"std"``, ``ddof=0``) or standard error (``"sem"``). NaNs are ignored.
    """
    keys = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*keys, x, y] if c not in df.columns]
    if missing:
        raise UsageError(f"columns {missing} not in the results (columns: {list(df.columns)})")
    if spread not in ("minmax", "std", "sem"):
        raise UsageError(f"spread must be 'minmax', 'std' or 'sem', got {spread!r}")
    grouped = df.groupby([*keys, x], sort=True, dropna=False)[y]
    out = grouped.agg(["mean", "min", "max", "std", "count"]).reset_index()
    out = out.rename(columns={"count": "n"})
    if spread == "minmax":
        out["lo"], out["hi"] = out["min"], out["max"]
    else:
        std = grouped.std(ddof=0).to_numpy()
        if spread == "sem":
            std = std / np.sqrt(np.maximum(out["n"].to_numpy(), 1))
        out["lo"], out["hi"] = out["mean"] - std, out["mean"] + std
    return out[[*keys, x, "mean", "lo", "hi", "n"]].sort_values([*keys, x], ignore_index=True)


def plot_mean_spread(ax: Axes, df: pd.DataFrame, x: str, y: str, *,
                     spread: Literal["minmax", "std", "sem"] = "minmax",
                     label: str | None = None, color: str | None = None,
                     marker: str | None = "o", alpha: float = 0.2, **line_kw: Any):
    """Draw the mean of ``y`` over seeds against ``x`` with the spread shaded.

    ``df`` holds one curve (filter or group it first); rows with the same ``x`` are the seeds.
    Returns the mean line.
    """
    s = seed_summary(df, x, y, spread=spread)
    (line,) = ax.plot(s[x], s["mean"], label=label, color=color, marker=marker, **line_kw)
    if (s["n"] > 1).any():
        ax.fill_between(s[x], s["lo"], s["hi"], color=line.get_color(), alpha=alpha,
                        linewidth=0)
    return line


def sparse_ticks(values: Sequence[float], most: int = 8) -> list[float]:
    """At most about ``most`` of the sorted ``values`` (every k-th, and always the last), as
    tick positions for a sweep axis."""
    values = list(values)
    if not values:
        return []
    stride = max(1, math.ceil(len(values) / most))
    ticks = values[::stride]
    if values[-1] not in ticks:
        ticks.append(values[-1])
    return ticks


def log_axis(ax: Axes, axis: Literal["x", "y"] = "x", *, base: float = 10,
             ticks: Sequence[float] | None = None) -> None:
    """Log scale on ``axis``; with ``base=2`` (widths) the ticks are plain integers.

    ``ticks``: put the major ticks exactly there (e.g. the widths of the sweep).
    """
    set_scale = ax.set_xscale if axis == "x" else ax.set_yscale
    target = ax.xaxis if axis == "x" else ax.yaxis
    set_scale("log", base=base)
    if ticks is not None:
        target.set_major_locator(_FixedTicks(ticks))
    elif base == 2:
        target.set_major_locator(LogLocator(base=2, numticks=12))
    if base == 2 or ticks is not None:
        target.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        target.set_minor_formatter(NullFormatter())


class _FixedTicks(LogLocator):
    def __init__(self, ticks: Sequence[float]) -> None:
        super().__init__()
        self._ticks = np.asarray(sorted(ticks), dtype=float)

    def tick_values(self, vmin: float, vmax: float) -> np.ndarray:
        return self._ticks

    def __call__(self) -> np.ndarray:
        return self._ticks


def panel_label(ax: Axes, text: str) -> None:
    """A bold panel letter (``"a"``, ``"b"``, ...) at the top left outside the axes."""
    ax.text(-0.02, 1.04, text, transform=ax.transAxes, fontweight="bold", ha="right",
            va="bottom")


def save_figure(fig: Figure, out_dir: str | os.PathLike, name: str) -> Path:
    """Save ``fig`` as ``out_dir/name.png`` and ``out_dir/name.svg`` (atomically, reproducible
    metadata); returns the PNG path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(name).stem
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    with rc_context({"savefig.dpi": STYLE["savefig.dpi"], "svg.hashsalt": "telescope",
                     "svg.fonttype": "none"}):
        png = atomic_write(out / f"{stem}.png",
                           lambda tmp: fig.savefig(tmp, format="png",
                                                   metadata={"Software": None}))
        atomic_write(out / f"{stem}.svg",
                     lambda tmp: fig.savefig(tmp, format="svg", metadata={"Date": None}))
    return png
