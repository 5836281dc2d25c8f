"""``rank-growth``: the rank of a transformer's weight updates grows step-wise from a small
initialization.

Abbe, Boix-Adsera, Saremi et al. (2023), "incremental learning"; Boix-Adsera, Littwin, Abbe,
Bengio & Susskind (2023), "Transformers learn through gradual rank increase", NeurIPS.
``TinyTransformer(alpha=a)`` multiplies the initial weights by ``a``; the setting is ``a``
(small vs 1). Logged with :class:`telescope.lens.WeightRank` on a log-spaced step grid: for every
weight matrix ``D = W_t - W_0`` and for the per-head bilinear forms ``M_QK^h = W_Q[h]^T
W_K[h]``, ``M_VO^h = W_O[:, h] W_V[h]``, ``D = M_t - M_0``: the stable rank ``||D||_F^2 /
||D||_2^2`` and the numerical rank ``#{k : s_k > threshold * s_1}``. Small initialization should
give low-rank updates whose rank grows step-wise. The default optimizer is full-batch Adam
(``optimizer="sgd"`` for gradient descent, the setting of the theory).

The task is a sequence classification task (:func:`telescope.data.sequence_task`, default
``"digits-rows"``: scikit-learn's bundled 8x8 digits as 8 tokens of 8 pixels, 10 classes). A
sweep point is ``(setting, seed)``. Rows are tidy: ``lens == "train"`` (one per point and logged
step: ``train_loss``, ``train_acc``, ``test_acc``, ``diverged``) and ``lens == "rank"`` (one per
point, logged step, ``matrix`` and ``head``: ``kind`` ``"weight"`` with ``head = -1``, ``"qk"``
or ``"vo"``; ``delta_norm``, ``sigma_max``, ``stable_rank``, ``rank``). A run whose loss is not
finite stops there, with a last ``train`` row marked ``diverged``.

The ``quick`` preset runs on a laptop CPU in a minute; the ``full`` preset sweeps four scales
over longer training of a larger model on MNIST-1D patches and is meant for a GPU
(``device="auto"``).
"""

from __future__ import annotations

import time
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
import torch
from annotated_types import Ge, Lt

from telescope import plotting as fg
from telescope.lens import WeightRank
from telescope.studies._sequence import (
    Columns,
    SequenceData,
    check_training,
    classification_metrics,
    encoder,
    final_step,
    load_sequence,
    per_seed_mean,
    settings,
    sweep,
    train_and_lens_rows,
)
from telescope.studies.base import Progress, Study
from telescope.studies.constraints import NonEmpty, PositiveFloat, PositiveInt, config_dataclass
from telescope.train import fit, log_spaced_steps

__all__ = ["RankGrowthConfig", "COLUMNS", "points", "run_point", "figures", "headline", "STUDY"]


# --------------------------------------------------------------------------- config


@config_dataclass
class RankGrowthConfig:
    """Initialization scale ``alpha`` (small vs 1), full-batch Adam; e.g. ``--set
    alphas=0.001,1 optimizer=sgd lr=0.1``."""

    alphas: NonEmpty[PositiveFloat] = (0.01, 1.0)
    data: SequenceData = field(default_factory=SequenceData)
    d_model: PositiveInt = 32
    n_heads: PositiveInt = 2
    n_layers: PositiveInt = 1
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: PositiveFloat = 1e-3
    steps: PositiveInt = 400
    # numerical rank: s_k > threshold * s_1
    threshold: Annotated[float, Ge(0), Lt(1)] = 0.05
    evals: PositiveInt = 14            # log-spaced measurement steps (the last: the end)
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"                # "cpu", "cuda", ... or "auto" (cuda when available)
    seeds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_training(self)


PRESETS = {
    "quick": {},
    "full": {"data.name": "mnist1d-patches", "data.n_train": 4000, "data.n_test": 1000,
             "alphas": (0.001, 0.01, 0.1, 1.0), "d_model": 64, "n_heads": 4, "n_layers": 2,
             "steps": 5000, "evals": 30, "seeds": 3, "device": "auto"},
}


# --------------------------------------------------------------------------- one point

COLUMNS = Columns(text=("setting_name", "lens", "matrix", "kind"), ints=("step", "head"),
                  floats=("train_loss", "train_acc", "test_acc", "delta_norm", "sigma_max",
                          "stable_rank", "rank", "seconds"),
                  bools=("diverged",))


def points(config: RankGrowthConfig) -> list[dict]:
    """The initialization scale ``alpha`` (``setting``) x seed."""
    return sweep(config.alphas, config)


def run_point(config: RankGrowthConfig, point: dict, progress: Progress) -> list[dict]:
    """Train one encoder from weights scaled by ``alpha`` by full-batch Adam (or GD); train rows
    and the ranks of the updates on the log-spaced grid."""
    start = time.perf_counter()
    seed, alpha = int(point["seed"]), float(point["setting"])
    name = f"alpha={alpha:g}"
    d = config.data
    ds, (x, y, x_test, y_test) = load_sequence(d.name, d.n_train, d.n_test, seed,
                                               config.device, config.dtype)
    torch.manual_seed(seed)
    model = encoder(ds, config.d_model, config.n_heads, config.n_layers, alpha=alpha)
    model = model.to(device=x.device, dtype=x.dtype)
    opt = (torch.optim.Adam(model.parameters(), lr=config.lr) if config.optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=config.lr))

    metrics = classification_metrics(x, y, x_test, y_test)
    history = fit(model, opt, x, y, steps=config.steps, loss="cross_entropy",
                  eval_at=log_spaced_steps(config.steps, config.evals), evaluate=metrics,
                  callbacks=[WeightRank(model, threshold=config.threshold)],
                  on_nonfinite="stop", progress=progress)
    rows = train_and_lens_rows(
        history, COLUMNS, name, "rank", "WeightRank",
        lambda w: {k: w[k] for k in ("matrix", "kind", "head", "delta_norm", "sigma_max",
                                     "stable_rank", "rank")}, model, metrics)
    rows[-1]["seconds"] = time.perf_counter() - start
    return rows


# --------------------------------------------------------------------------- figures


def _rank_groups(rank: pd.DataFrame) -> dict[str, pd.DataFrame]:
    attn_w = rank[(rank["kind"] == "weight") & rank["matrix"].str.contains(r"\.attn\.")]
    return {"attention W_Q, W_K, W_V, W_O": attn_w,
            "per-head M_QK": rank[rank["kind"] == "qk"],
            "per-head M_VO": rank[rank["kind"] == "vo"]}


def figures(df: pd.DataFrame, config: RankGrowthConfig, out_dir: Path) -> list[Path]:
    """``rank_growth``: numerical rank (top) and stable rank (bottom) of the attention weight
    updates and of the per-head ``M_QK``, ``M_VO`` updates by step, per alpha (PNG + SVG)."""
    if df.empty:
        return []
    groups = _rank_groups(df[df["lens"] == "rank"])
    with fg.paper_style():
        fig, axes = fg.new_figure(2, 3, panel_size=(3.0, 2.4), sharex=True)
        for i, (setting, name) in enumerate(settings(df)):
            color = fg.color_cycle(i)
            for j, (label, g) in enumerate(groups.items()):
                g = g[g["setting"] == setting]
                if g.empty:
                    continue
                for r, col in enumerate(("rank", "stable_rank")):
                    m = per_seed_mean(g, [], col)
                    fg.plot_mean_spread(axes[r, j], m, "step", col, color=color, marker=None,
                                        label=name)
                axes[0, j].set_title(label)
        axes[0, 0].set_ylabel("numerical rank of W_t - W_0\n(mean over matrices)")
        axes[1, 0].set_ylabel("stable rank of W_t - W_0")
        for r in range(2):
            for j in range(3):
                fg.log_axis(axes[r, j], "x")
            fg.panel_label(axes[r, 0], "ab"[r])
        for j in range(3):
            axes[1, j].set_xlabel("step")
        for ax in axes[0]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
                break
        return [fg.save_figure(fig, out_dir, "rank_growth")]


# --------------------------------------------------------------------------- headline


def _rank_increase_steps(g: pd.DataFrame) -> list[int]:
    """Logged steps at which the numerical rank (mean over heads / matrices, then over seeds)
    is higher than at the previous logged step."""
    curve = g.groupby(["seed", "step"])["rank"].mean().groupby("step").mean().sort_index()
    values = curve.to_numpy()
    return [int(s) for s, a, b in zip(curve.index[1:], values[:-1], values[1:], strict=True)
            if b > a]


_SHORT = {"attention W_Q, W_K, W_V, W_O": "attn weights", "per-head M_QK": "qk",
          "per-head M_VO": "vo"}


def headline(df: pd.DataFrame, config: RankGrowthConfig) -> dict:
    """At each point's last step, means over seeds, per alpha and group (attention weights,
    per-head qk, vo): the max and mean numerical rank and the mean stable rank of the updates;
    and the logged steps where the vo rank increases."""
    out: dict = {}
    if df.empty:
        return out
    rank = df[df["lens"] == "rank"]
    for setting, name in settings(df):
        for label, g in _rank_groups(rank[rank["setting"] == setting]).items():
            short = _SHORT[label]
            f = final_step(g) if not g.empty else g
            if f.empty:
                continue
            out[f"final max rank, {short} ({name})"] = float(
                f.groupby("seed")["rank"].max().mean())
            out[f"final mean rank, {short} ({name})"] = float(
                f.groupby("seed")["rank"].mean().mean())
            out[f"final mean stable rank, {short} ({name})"] = float(
                f.groupby("seed")["stable_rank"].mean().mean())
            if short == "vo":
                out[f"steps where vo rank increases ({name})"] = _rank_increase_steps(g)
    out["seeds"] = int(df["seed"].nunique())
    return out


GUIDE = """
Rank growth from small initialization (Boix-Adsera et al. 2023): the figure `rank_growth.png`,
rows in `results.parquet` (columns `setting`, `seed`, `step`, `lens`). Curves are means over
seeds, bands their min-max; step axes are logarithmic.

- Numerical rank (top row) and stable rank (bottom row) of `W_t - W_0` for the attention
  projections and of the per-head `M_QK`, `M_VO` updates, small `alpha` vs `alpha = 1`. With a
  small initialization the updates stay low rank and their rank grows in steps; at `alpha = 1`
  the updates are high rank from the first steps.
"""

STUDY = Study(
    name="rank-growth",
    description="small transformer from a small init: rank of the weight and per-head QK/VO "
                "updates grows step-wise (small alpha vs 1)",
    config_cls=RankGrowthConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
)
