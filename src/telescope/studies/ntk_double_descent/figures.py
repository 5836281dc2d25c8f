"""The figures of ``ntk-double-descent``: test MSE, effective parameters and kernel distances by
width (one column per model), and the network's test MSE by width at each measurement step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from telescope import plotting as fg
from telescope.studies.ntk_double_descent.analysis import (
    MODELS,
    PREDICTIONS,
    compare,
    final_rows,
    mse_column,
)

__all__ = ["STYLES", "figures"]


STYLES = {  # prediction -> (color, linestyle, marker)
    "network": (fg.COLORS["network"], "-", "o"),
    "lazy": (fg.COLORS["linearized"], "--", "s"),
    "after": (fg.COLORS["net"], "-.", "^"),
    "telescoping": (fg.COLORS["telescoping"], ":", "x"),
}


def figures(df: pd.DataFrame, config: Any, out_dir: Path) -> list[Path]:
    """``ntk_double_descent.png``: one column per model row; (a) test MSE of the network and the
    three predictions by width (log y), (b) effective parameters of the kernel smoothers (and of
    the network, if tracked), (c) kernel distance ``K_T`` vs ``K_0`` and the lazy prediction's
    relative distance to the network. ``ntk_double_descent_steps.png``: the network's test MSE by
    width at each measurement step. The shaded span in (a) covers the widths whose mean network
    error is within noise of its peak (:func:`compare`, ``peak_widths``)."""
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
                                       fg.COLORS["telescoping"])):
                if col in part and part[col].notna().any():
                    fg.plot_mean_spread(ax, part.dropna(subset=[col]), "width", col, label=label,
                                        color=color)
            ax.set_yscale("log")
            axes[2, j].set_xlabel("d_model" if kind == "transformer" else "hidden neurons")
            for i in range(3):
                fg.log_axis(axes[i, j], "x", base=2, ticks=fg.sparse_ticks(widths))
            for i, letter in enumerate("abc"):
                fg.panel_label(axes[i, j], letter)
        axes[0, 0].set_ylabel("test MSE")
        axes[1, 0].set_ylabel("effective parameters")
        axes[2, 0].set_ylabel("distance")
        for i in range(2):
            axes[i, -1].legend(fontsize=7)
        axes[2, 0].legend(fontsize=7, loc="upper right")
        paths.append(fg.save_figure(fig, out_dir, "ntk_double_descent"))

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
    return paths
