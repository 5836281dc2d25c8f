"""``entropy-collapse``: attention entropy collapse at a high learning rate, with and without
sigma-reparametrization.

Zhai et al. (2023), "Stabilizing Transformer Training by Preventing Attention Entropy Collapse",
ICML. An encoder (:class:`telescope.models.TinyTransformer`) is trained at a high Adam learning
rate with no warmup, with plain linear layers (setting 0) or with sigma-reparametrized ones
``W_hat = (gamma / sigma(W)) W`` (setting 1, :class:`telescope.models.SigmaReparamLinear`).
Logged on a log-spaced step grid (and at step 0): the attention entropy of every head,
``H = mean_{n,i} -sum_j A_ij log A_ij``, normalized by its maximum ``mean_i log m_i``
(:class:`telescope.lens.AttentionEntropy` on the test sequences), and train loss / accuracy and
test accuracy. Zhai et al. bound the attention logits by the spectral norms of ``W_Q`` and
``W_K``; without the reparametrization the logits grow and the entropy collapses
(``normalized -> 0``), often with unstable training.

The task is a sequence classification task (:func:`telescope.data.sequence_task`, default
``"digits-rows"``: scikit-learn's bundled 8x8 digits as 8 tokens of 8 pixels, 10 classes). A
sweep point is ``(setting, seed)``. Rows are tidy: ``lens == "train"`` (one per point and logged
step: ``train_loss``, ``train_acc``, ``test_acc``, ``diverged``) and ``lens == "entropy"`` (one
per point, logged step, ``layer`` and ``head``: ``entropy``, ``normalized_entropy``). A run
whose minibatch loss is not finite stops there, with a last ``train`` row marked ``diverged``.

The ``quick`` preset runs on a laptop CPU in a minute; the ``full`` preset trains a deeper,
wider encoder longer on MNIST-1D patches and is meant for a GPU (``device="auto"``).
"""

from __future__ import annotations

import time
from dataclasses import field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from telescope import plotting as fg
from telescope.errors import UsageError
from telescope.lens import AttentionEntropy
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
from telescope.studies.constraints import PositiveFloat, PositiveInt, config_dataclass
from telescope.train import fit, log_spaced_steps

__all__ = ["EntropyCollapseConfig", "COLUMNS", "points", "run_point", "figures", "headline",
           "STUDY"]


# --------------------------------------------------------------------------- config


@config_dataclass
class EntropyCollapseConfig:
    """High-lr Adam, no warmup, with and without sigma-reparametrization; e.g. ``--set
    sigma_reparam=false lr=0.1``."""

    sigma_reparam: tuple[bool, ...] = (False, True)
    data: SequenceData = field(default_factory=SequenceData)
    d_model: PositiveInt = 64
    n_heads: PositiveInt = 4
    n_layers: PositiveInt = 2
    lr: PositiveFloat = 3e-2
    steps: PositiveInt = 300
    batch_size: PositiveInt = 128
    evals: PositiveInt = 12            # log-spaced measurement steps (the last: the end)
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"                # "cpu", "cuda", ... or "auto" (cuda when available)
    seeds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_training(self)
        if not self.sigma_reparam:
            raise UsageError("sigma_reparam must list at least one of true/false")


PRESETS = {
    "quick": {},
    "full": {"data.name": "mnist1d-patches", "data.n_train": 4000, "data.n_test": 1000,
             "d_model": 128, "n_layers": 4, "steps": 3000, "evals": 24, "seeds": 3,
             "device": "auto"},
}


# --------------------------------------------------------------------------- one point

COLUMNS = Columns(text=("setting_name", "lens", "layer"), ints=("step", "head"),
                  floats=("train_loss", "train_acc", "test_acc", "entropy",
                          "normalized_entropy", "seconds"),
                  bools=("diverged",))


def points(config: EntropyCollapseConfig) -> list[dict]:
    """``sigma_reparam`` (as ``setting`` 0.0 / 1.0) x seed."""
    return sweep([float(bool(s)) for s in config.sigma_reparam], config)


def run_point(config: EntropyCollapseConfig, point: dict, progress: Progress) -> list[dict]:
    """Train one encoder by minibatch Adam; train rows and per-head entropy rows at step 0 and
    on the log-spaced grid."""
    start = time.perf_counter()
    seed, sigma = int(point["seed"]), bool(point["setting"])
    name = "sigma-reparam" if sigma else "plain"
    d = config.data
    ds, (x, y, x_test, y_test) = load_sequence(d.name, d.n_train, d.n_test, seed,
                                               config.device, config.dtype)
    torch.manual_seed(seed)
    model = encoder(ds, config.d_model, config.n_heads, config.n_layers, sigma_reparam=sigma)
    model = model.to(device=x.device, dtype=x.dtype)

    metrics = classification_metrics(x, y, x_test, y_test)
    history = fit(model, torch.optim.Adam(model.parameters(), lr=config.lr), x, y,
                  steps=config.steps, loss="cross_entropy",
                  batch_size=min(config.batch_size, x.shape[0]),
                  generator=torch.Generator().manual_seed(seed),
                  eval_at=log_spaced_steps(config.steps, config.evals, zero=True),
                  evaluate=metrics, callbacks=[AttentionEntropy(x_test)], on_nonfinite="stop",
                  progress=progress)
    rows = train_and_lens_rows(
        history, COLUMNS, name, "entropy", "entropy",
        lambda e: {"layer": e["layer"], "head": e["head"], "entropy": e["entropy"],
                   "normalized_entropy": e["normalized"]}, model, metrics)
    rows[-1]["seconds"] = time.perf_counter() - start
    return rows


# --------------------------------------------------------------------------- figures


def figures(df: pd.DataFrame, config: EntropyCollapseConfig, out_dir: Path) -> list[Path]:
    """``entropy_collapse``: normalized entropy per layer (mean over heads, lowest head) and the
    train loss by step, per setting (PNG + SVG)."""
    if df.empty:
        return []
    ent = df[(df["lens"] == "entropy") & (df["step"] > 0)]
    train = df[(df["lens"] == "train") & (df["step"] > 0)]
    with fg.paper_style():
        fig, axes = fg.new_figure(1, 3, panel_size=(3.2, 2.6))
        styles = ("-", "--", ":", "-.")
        for i, (setting, name) in enumerate(settings(df)):
            color = fg.color_cycle(i)
            e = ent[ent["setting"] == setting]
            for j, layer in enumerate(sorted(e["layer"].unique())):
                m = per_seed_mean(e[e["layer"] == layer], [], "normalized_entropy")
                fg.plot_mean_spread(axes[0, 0], m, "step", "normalized_entropy", color=color,
                                    marker=None, ls=styles[j % 4], label=f"{name} {layer}")
                lo = e[e["layer"] == layer].groupby(["seed", "step"], as_index=False)[
                    "normalized_entropy"].min()
                fg.plot_mean_spread(axes[0, 1], lo, "step", "normalized_entropy", color=color,
                                    marker=None, ls=styles[j % 4], label=f"{name} {layer}")
            t = train[train["setting"] == setting]
            fg.plot_mean_spread(axes[0, 2], t, "step", "train_loss", color=color, marker=None,
                                label=name)
        axes[0, 0].set_ylabel("normalized attention entropy\n(mean over heads)")
        axes[0, 1].set_ylabel("normalized attention entropy\n(lowest head)")
        axes[0, 2].set_ylabel("train cross-entropy")
        fg.log_axis(axes[0, 2], "y")
        for k in range(3):
            fg.log_axis(axes[0, k], "x")
            axes[0, k].set_xlabel("step")
            fg.panel_label(axes[0, k], "abc"[k])
        for k in range(2):
            axes[0, k].set_ylim(-0.02, 1.02)
        axes[0, 0].legend(fontsize=6)
        axes[0, 2].legend()
        return [fg.save_figure(fig, out_dir, "entropy_collapse")]


# --------------------------------------------------------------------------- headline


def headline(df: pd.DataFrame, config: EntropyCollapseConfig) -> dict:
    """At each point's last step, means over seeds, per setting: the normalized entropy (mean
    over heads, and of the lowest head), the train loss, and the runs that diverged."""
    out: dict = {}
    if df.empty:
        return out
    ent = final_step(df[df["lens"] == "entropy"])
    train = final_step(df[df["lens"] == "train"])
    for setting, name in settings(df):
        e = ent[ent["setting"] == setting]
        t = train[train["setting"] == setting]
        if not e.empty:
            per_seed = e.groupby("seed")["normalized_entropy"]
            out[f"final normalized entropy, mean over heads ({name})"] = float(
                per_seed.mean().mean())
            out[f"final normalized entropy, lowest head ({name})"] = float(
                per_seed.min().mean())
        if not t.empty:
            out[f"final train loss ({name})"] = float(t["train_loss"].mean())
            out[f"diverged runs ({name})"] = int(t["diverged"].sum())
    out["seeds"] = int(df["seed"].nunique())
    return out


GUIDE = """
Attention entropy collapse (Zhai et al. 2023): the figure `entropy_collapse.png`, rows in
`results.parquet` (columns `setting`, `seed`, `step`, `lens`). Curves are means over seeds, bands
their min-max; step axes are logarithmic.

- **a / b**: normalized attention entropy (1 = uniform attention, 0 = all on one key) per layer,
  mean over heads and lowest head, for plain linear layers and for sigma-reparametrized ones,
  trained by Adam at a high learning rate with no warmup. Look for the plain model's entropy
  falling towards 0 while the sigma-reparam model stays higher.
- **c**: full-train-set loss; an unstable run shows it rising again after its minimum.
"""

STUDY = Study(
    name="entropy-collapse",
    description="small transformer at a high Adam lr: attention entropy collapse, plain vs "
                "sigma-reparametrized layers",
    config_cls=EntropyCollapseConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
)
