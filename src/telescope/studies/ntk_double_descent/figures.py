"""The figures of ``ntk-double-descent``: test MSE, effective parameters and kernel distances by
width (one column per model, with the infinite-width limit as horizontal bands where the row has
one), the network's test MSE by width at each measurement step, and the sample-wise view (test
MSE and error against the number of training points, the limit beside trained networks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from telescope import plotting as fg
from telescope.studies.ntk_double_descent.analysis import (
    LIMITS,
    MODELS,
    PREDICTIONS,
    compare,
    final_rows,
    mse_column,
    width_rows,
)
from telescope.studies.ntk_double_descent.limit import SampleBootstrap

__all__ = ["STYLES", "LIMIT_STYLES", "figures"]


STYLES = {  # prediction -> (color, linestyle, marker)
    "network": (fg.COLORS["network"], "-", "o"),
    "lazy": (fg.COLORS["linearized"], "--", "s"),
    "after": (fg.COLORS["net"], "-.", "^"),
    "telescoping": (fg.COLORS["telescoping"], ":", "x"),
}
LIMIT_STYLES = {  # infinite-width column -> (label, color, linestyle)
    "infinite_ntk_test_mse": ("infinite-width NTK (converged)", "#2ca02c", "-"),
    "infinite_ntk_t_test_mse": ("infinite-width NTK (trained as long)", "#2ca02c", ":"),
    "infinite_nngp_test_mse": ("infinite-width NNGP (converged)", "#8c564b", "--"),
}


def _band(ax, part: pd.DataFrame, col: str, label: str, color: str, ls: str) -> None:
    """A width-independent quantity as a horizontal line (mean over seeds) and band (min-max
    over seeds)."""
    per_seed = part.groupby("seed")[col].mean().dropna()
    if per_seed.empty:
        return
    ax.axhline(float(per_seed.mean()), color=color, linestyle=ls, linewidth=1.2, label=label)
    ax.axhspan(float(per_seed.min()), float(per_seed.max()), color=color, alpha=0.12,
               linewidth=0)


def figures(df: pd.DataFrame, config: Any, out_dir: Path) -> list[Path]:
    """``ntk_double_descent.png``: one column per model row; (a) test MSE of the network and the
    three predictions by width (log y), (b) effective parameters of the kernel smoothers (and of
    the network, if tracked), (c) kernel distance ``K_T`` vs ``K_0`` and the lazy prediction's
    relative distance to the network; for the rows with an infinite-width limit, (a) adds its
    test MSE (NTK and NNGP, converged; the NTK trained as long as the network under gradient
    descent) as horizontal bands over seeds and (c) the network's distances to it.
    ``ntk_double_descent_steps.png``: the network's test MSE by width at each measurement step.
    ``ntk_double_descent_samples.png`` (when the sample-wise view ran): test MSE and sign error
    against the number of training points. The shaded span in (a) covers the widths whose mean
    network error is within noise of its peak (:func:`compare`, ``peak_widths``)."""
    full = df
    final = final_rows(df)
    kinds = [k for k in MODELS if k in set(final["model"])]
    paths = []
    with fg.paper_style():
        fig, axes = fg.new_figure(3, len(kinds), sharex="col", panel_size=(3.6, 2.5))
        for j, kind in enumerate(kinds):
            part = final[final["model"] == kind]
            widths = sorted(part["width"].unique())
            ax = axes[0, j]
            for pred, label in PREDICTIONS.items():
                col = mse_column(pred)
                if col in part and part[col].notna().any():
                    color, ls, marker = STYLES[pred]
                    fg.plot_mean_spread(ax, part.dropna(subset=[col]), "width", col, label=label,
                                        color=color, linestyle=ls, marker=marker)
            for col, (label, color, ls) in LIMIT_STYLES.items():
                if col in part and part[col].notna().any():
                    _band(ax, part, col, label, color, ls)
            net = compare(final, kind).get("network")
            if net is not None and len(net["peak_widths"]) > 1:
                ax.axvspan(min(net["peak_widths"]), max(net["peak_widths"]),
                           color=fg.COLORS["network"], alpha=0.08, linewidth=0,
                           label="network peak within noise")
            ax.set_yscale("log")
            # pseudo-inverse blow-ups at a kernel's rank threshold would squash the rest:
            # at most 20x the network's worst test error is shown (results.parquet has all)
            low, high = ax.get_ylim()
            ax.set_ylim(low, min(high, 20 * float(part["test_mse"].max())))
            ax.set_title(f"{kind} (n = {int(part['n_train'].iloc[0])}, "
                         f"{config.label_noise:.0%} label noise)")
            ax = axes[1, j]
            for prefix, ls in (("lazy", "--"), ("after", "-."), ("network", "-")):
                for which in ("train", "test"):
                    col = f"{prefix}_p_{which}"
                    if col in part and part[col].notna().any():
                        fg.plot_mean_spread(ax, part.dropna(subset=[col]), "width", col,
                                            label=f"{prefix} p_{which}",
                                            color=fg.COLORS[f"p_{which}"], linestyle=ls)
            ax.axhline(int(part["n_train"].iloc[0]), color="#999999", linestyle=":",
                       linewidth=1)
            ax.set_yscale("log")
            ax = axes[2, j]
            for col, label, color in (("kernel_distance", "kernel distance K_T vs K_0", "#444444"),
                                      ("lazy_gap", "lazy vs network (relative)",
                                       fg.COLORS["linearized"]),
                                      ("telescoping_gap", "telescoping vs network (relative)",
                                       fg.COLORS["telescoping"]),
                                      ("infinite_init_gap", "NTK theory for its init vs network",
                                       "#2ca02c"),
                                      ("infinite_gap", "infinite ensemble mean vs network",
                                       "#17becf")):
                if col in part and part[col].notna().any():
                    fg.plot_mean_spread(ax, part.dropna(subset=[col]), "width", col, label=label,
                                        color=color)
            if "infinite_gap_floor" in part and part["infinite_gap_floor"].notna().any():
                _band(ax, part, "infinite_gap_floor", "one infinite network vs the mean",
                      "#17becf", ":")
            ax.set_yscale("log")
            axes[2, j].set_xlabel("hidden neurons" if kind == "mlp" else "d_model")
            for i in range(3):
                fg.log_axis(axes[i, j], "x", base=2, ticks=fg.sparse_ticks(widths))
            for i, letter in enumerate("abc"):
                fg.panel_label(axes[i, j], letter)
        axes[0, 0].set_ylabel("test MSE")
        axes[1, 0].set_ylabel("effective parameters")
        axes[2, 0].set_ylabel("distance")
        # one legend per row: (a) on the first column with a limit (it has every entry), (b)
        # on the last, (c) the sweep's entries on the first column, the limit's on its own
        limit_cols = [j for j, kind in enumerate(kinds) if kind in LIMITS]
        axes[0, limit_cols[0] if limit_cols else -1].legend(fontsize=6.5, framealpha=0.8)
        axes[1, -1].legend(fontsize=7)
        axes[2, 0].legend(fontsize=7, loc="upper right")
        if limit_cols:
            ax = axes[2, limit_cols[0]]
            handles, labels = ax.get_legend_handles_labels()
            keep = [(h, lab) for h, lab in zip(handles, labels, strict=True)
                    if "infinite" in lab or "NTK theory" in lab]
            if keep and limit_cols[0] != 0:
                ax.legend(*zip(*keep, strict=True), fontsize=6.5, framealpha=0.8)
        paths.append(fg.save_figure(fig, out_dir, "ntk_double_descent"))

        df = width_rows(df)
        steps = sorted(df["step"].unique())
        fig, axes = fg.new_figure(1, len(kinds), panel_size=(3.6, 2.6))
        for j, kind in enumerate(kinds):
            part = df[df["model"] == kind]
            for i, step in enumerate(steps):
                fg.plot_mean_spread(axes[0, j], part[part["step"] == step], "width", "test_mse",
                                    label=f"step {step}", color=fg.color_cycle(i))
            fg.log_axis(axes[0, j], "x", base=2,
                        ticks=fg.sparse_ticks(sorted(part["width"].unique())))
            axes[0, j].set_title(kind)
            axes[0, j].set_xlabel("width")
        axes[0, 0].set_ylabel("network test MSE")
        axes[0, -1].legend(fontsize=7)
        paths.append(fg.save_figure(fig, out_dir, "ntk_double_descent_steps"))
        samples = _samples_figure(full, config, out_dir)
        if samples is not None:
            paths.append(samples)
    return paths


def _samples_figure(df: pd.DataFrame, config: Any, out_dir: Path) -> Path | None:
    """``ntk_double_descent_samples.png``: one column per row with a limit; (a) test MSE, (b)
    sign error against the number of training points ``n`` (log x): the limit's NTK and NNGP
    predictors (converged, ridgeless; lines: means over seeds, bands: 95 % bootstrap intervals)
    and the networks trained on the first ``n`` points at the sample widths (markers, with the
    intervals as error bars), a dotted vertical line where a width's parameter count equals
    ``n``."""
    views = {kind: SampleBootstrap(df, kind) for kind in LIMITS}
    views = {k: v for k, v in views.items() if not v.empty}
    if not views:
        return None
    fig, axes = fg.new_figure(2, len(views), sharex="col", panel_size=(3.6, 2.5))
    for j, (kind, view) in enumerate(views.items()):
        sizes = [int(v) for v in view.sizes]
        for i, (metric, ylabel) in enumerate((("test_mse", "test MSE"),
                                              ("test_error", "test sign error"))):
            ax = axes[i, j]
            for pred, label, color, ls in (("ntk", "infinite-width NTK", "#2ca02c", "-"),
                                           ("nngp", "infinite-width NNGP", "#8c564b", "--")):
                c = view.curve(f"infinite_{pred}_{metric}")
                if len(c):
                    ax.plot(c.index, c["mean"], color=color, linestyle=ls, label=label)
                    ax.fill_between(c.index, c["lo"], c["hi"], color=color, alpha=0.15,
                                    linewidth=0)
            for k, w in enumerate(view.widths):
                c = view.curve(metric, width=w)
                if not len(c):
                    continue
                color = fg.color_cycle(k)
                ax.errorbar(c.index, c["mean"], yerr=[c["mean"] - c["lo"], c["hi"] - c["mean"]],
                            color=color, marker="o", markersize=3, linestyle="-", linewidth=0.8,
                            capsize=2, label=f"network, width {w}")
                params = view.networks.loc[view.networks["width"] == w, "n_params"]
                if len(params) and min(sizes) <= float(params.iloc[0]) <= max(sizes):
                    ax.axvline(float(params.iloc[0]), color=color, linestyle=":", linewidth=0.8)
            ax.set_ylabel(ylabel if j == 0 else "")
            fg.log_axis(ax, "x", base=2, ticks=_spread_ticks(sizes))
            fg.panel_label(ax, "ab"[i])
        axes[0, j].set_title(f"{kind} ({config.label_noise:.0%} label noise)")
        axes[1, j].set_xlabel("training points n")
    axes[0, -1].legend(fontsize=7)
    return fg.save_figure(fig, out_dir, "ntk_double_descent_samples")


def _spread_ticks(values: list[int], factor: float = 1.6) -> list[int]:
    """Ticks from ``values`` at least ``factor`` apart (so log-axis labels do not collide),
    always keeping the first and the last."""
    ticks = [values[0]]
    for v in values[1:]:
        if v >= factor * ticks[-1]:
            ticks.append(v)
    if ticks[-1] != values[-1]:
        if len(ticks) > 1 and values[-1] < factor * ticks[-1]:
            ticks[-1] = values[-1]      # too close to the last tick: the last value replaces it
        else:
            ticks.append(values[-1])
    return ticks
