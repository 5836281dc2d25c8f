"""``mode-connectivity``: linear mode connectivity and gradient stabilization (paper Fig 6).

A small CNN (:class:`telescope.models.ConvNet1d`) is trained on MNIST-1D
(:func:`telescope.data.load_mnist1d`) with SGD from its initialization. At a spawn step ``t'``
the network (and its optimizer state) is copied into two children that train ``k`` more steps
each on a different data order. Along the linear path ``alpha theta_a + (1 - alpha) theta_b``
the test accuracy is measured; the *accuracy drop* is the mean of the endpoints' accuracies minus
the lowest accuracy on the path (0: linearly mode connected). The *gradient change* of a layer is
``||g_{t'+k} - g_{t'}|| / ||g_{t'}||`` for the full-batch gradient ``g`` of the training loss
restricted to that layer's parameters (``g_{t'+k}`` of each child, averaged over the two). The
paper links the spawn step from which averaging works to the step from which gradients stabilize.
"""

from __future__ import annotations

import copy
from dataclasses import field
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from annotated_types import Ge, Lt
from torch import nn

from telescope import plotting as fg
from telescope.data import load_mnist1d
from telescope.models import ConvNet1d
from telescope.studies.base import Progress, Study
from telescope.studies.constraints import (
    NonEmpty,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
)
from telescope.train import fit


@config_dataclass
class Mnist1dData:
    """MNIST-1D (:func:`telescope.data.load_mnist1d`)."""

    n_train: PositiveInt = 4000
    n_test: PositiveInt = 1000
    seed: int = 0                 # the data set's seed (the same for every point)


@config_dataclass
class ModeConnectivityConfig:
    """Config of ``mode-connectivity``; ``--set spawn_steps=0,10,100``, ``--set k=500``."""

    data: Mnist1dData = field(default_factory=Mnist1dData)
    channels: PositiveInt = 32
    spawn_steps: NonEmpty[NonNegativeInt] = (0, 10, 30, 100, 300, 1000, 3000)
    k: PositiveInt = 3000         # steps each child trains after the spawn
    lr: PositiveFloat = 0.05
    momentum: Annotated[float, Ge(0), Lt(1)] = 0.9
    batch_size: PositiveInt = 64
    n_alpha: Annotated[int, Ge(3)] = 11   # points on the path, endpoints included
    seeds: int = 3
    seed: int = 0


PRESETS = {
    "quick": {"data.n_train": 2000, "data.n_test": 1000, "channels": 16,
              "spawn_steps": (0, 5, 20, 50, 100, 200, 500), "k": 500, "seeds": 2},
    "full": {"data.n_train": 4000, "data.n_test": 1000, "channels": 32,
             "spawn_steps": (0, 10, 30, 100, 300, 1000, 3000), "k": 3000, "seeds": 3},
}


def points(config: ModeConnectivityConfig) -> list[dict]:
    """The sweep: every spawn step for every seed."""
    seeds = range(config.seed, config.seed + config.seeds)
    return [{"spawn": int(t), "seed": s} for t in config.spawn_steps for s in seeds]


def _layers(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names grouped by the module that owns them (``conv1``, ``conv2``, ``head``)."""
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return groups


def _full_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return {n: g.detach() for n, g in zip(params, grads, strict=True)}


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _train(model, opt, data, steps: int, config, gen: torch.Generator,
           progress: Progress) -> None:
    """``steps`` SGD steps on minibatches drawn with replacement from ``gen``."""
    fit(model, opt, data.x_train, data.y_train, steps=steps, loss="cross_entropy",
        batch_size=config.batch_size, sampler="replacement", generator=gen, progress=progress)


def _optimizer(model, config):
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


def run_point(config: ModeConnectivityConfig, point: dict, progress: Progress) -> list[dict]:
    """Train to the spawn step, train two children ``k`` steps, interpolate, compare grads."""
    d = config.data
    data = load_mnist1d(d.n_train, d.n_test, seed=d.seed)
    t_spawn, seed = point["spawn"], point["seed"]
    progress.set(t_spawn + 2 * config.k)
    torch.manual_seed(seed)                      # ConvNet1d init draws from torch's generator
    parent = ConvNet1d(length=data.x_train.shape[-1], channels=config.channels,
                       out_features=data.n_classes)
    opt = _optimizer(parent, config)
    _train(parent, opt, data, t_spawn, config,
           torch.Generator().manual_seed(1_000_003 * seed), progress)
    g_spawn = _full_gradient(parent, data.x_train, data.y_train)

    children = []
    for c in (1, 2):                             # same state, different data orders
        child = copy.deepcopy(parent)
        child_opt = _optimizer(child, config)
        # a copy: load_state_dict keeps same-device tensors, so the children would share
        # (and both advance) the parent's momentum buffers
        child_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        _train(child, child_opt, data, config.k, config,
               torch.Generator().manual_seed(1_000_003 * seed + 7919 * c), progress)
        children.append(child)

    layers = _layers(parent)
    change: dict[str, float] = {}
    for layer, names in [*layers.items(), ("all", [n for ns in layers.values() for n in ns])]:
        ref = torch.cat([g_spawn[n].flatten() for n in names])
        rel = []
        for child in children:
            g = _full_gradient(child, data.x_train, data.y_train)
            new = torch.cat([g[n].flatten() for n in names])
            rel.append(float((new - ref).norm() / ref.norm().clamp_min(1e-30)))
        change[f"grad_change_{layer}"] = float(np.mean(rel))

    sa, sb = children[0].state_dict(), children[1].state_dict()
    mixed = copy.deepcopy(children[0])
    curve = []
    for a in np.linspace(0.0, 1.0, config.n_alpha):
        mixed.load_state_dict({n: a * sa[n] + (1 - a) * sb[n] for n in sa})
        curve.append((float(a), _accuracy(mixed, data.x_test, data.y_test)))
    acc_b, acc_a = curve[0][1], curve[-1][1]
    drop = 0.5 * (acc_a + acc_b) - min(acc for _, acc in curve)
    return [{**point, "alpha": a, "test_acc": acc, "acc_a": acc_a, "acc_b": acc_b,
             "acc_drop": float(drop), "parent_acc": _accuracy(parent, data.x_test, data.y_test),
             **change} for a, acc in curve]


def _per_point(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop_duplicates(["spawn", "seed"])


def _symlog(ax) -> None:
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)


def figures(df: pd.DataFrame, config: ModeConnectivityConfig, out_dir: Path) -> list[Path]:
    """Accuracy drop vs spawn step; gradient change per layer vs spawn step; the paths."""
    pts = _per_point(df)
    layer_cols = [c for c in df.columns if c.startswith("grad_change_") and c != "grad_change_all"]
    with fg.paper_style():
        fig, axes = fg.new_figure(1, 3)
        ax = axes[0, 0]
        fg.plot_mean_spread(ax, pts, "spawn", "acc_drop", color=fg.COLORS["network"])
        _symlog(ax)
        ax.set_xlabel("spawn step t'")
        ax.set_ylabel("accuracy drop along the path")
        fg.panel_label(ax, "a")

        ax = axes[0, 1]
        for i, col in enumerate([*layer_cols, "grad_change_all"]):
            fg.plot_mean_spread(ax, pts, "spawn", col, label=col.removeprefix("grad_change_"),
                                color="#222222" if col.endswith("_all") else fg.color_cycle(i))
        _symlog(ax)
        fg.log_axis(ax, "y")
        ax.set_xlabel("spawn step t'")
        ax.set_ylabel(f"||g(t'+{config.k}) - g(t')|| / ||g(t')||")
        ax.legend()
        fg.panel_label(ax, "b")

        ax = axes[0, 2]
        for i, (t, sub) in enumerate(df.groupby("spawn")):
            fg.plot_mean_spread(ax, sub, "alpha", "test_acc", label=f"t'={t}", marker=None,
                                color=fg.color_cycle(i))
        ax.set_xlabel("alpha (weight of child a)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=6)
        fg.panel_label(ax, "c")
        return [fg.save_figure(fig, out_dir, "mode_connectivity")]


def headline(df: pd.DataFrame, config: ModeConnectivityConfig) -> dict:
    """Accuracy drop and gradient change at each spawn step (mean over seeds)."""
    pts = _per_point(df).groupby("spawn").mean(numeric_only=True)
    out: dict = {}
    for t, row in pts.iterrows():
        out[f"t'={t}: accuracy drop"] = round(float(row["acc_drop"]), 4)
        out[f"t'={t}: gradient change"] = round(float(row["grad_change_all"]), 4)
    small = pts.index[pts["acc_drop"] <= 0.01]
    out["first spawn step with drop <= 1%"] = int(small[0]) if len(small) else None
    out["endpoint accuracy (mean)"] = round(float(((pts["acc_a"] + pts["acc_b"]) / 2).mean()), 4)
    return out


GUIDE = """
Linear mode connectivity and gradient stabilization (paper Fig 6), with a small CNN on MNIST-1D.

- **Panel a**: the accuracy drop on the linear path between two children spawned at step t' and
  trained k more steps on different data orders (mean of the endpoints minus the path's minimum;
  0 means the average of the weights is as good as the children). Early spawns give a large drop,
  later spawns a drop near zero.
- **Panel b**: per layer, how much the full-batch gradient changed over the k steps after the
  spawn, relative to its size at the spawn. The paper's observation: weight averaging starts to
  work once the gradients stabilize (the change is small).
- **Panel c**: test accuracy along the path for each spawn step.

Everything is in `results.parquet`: one row per (spawn step, seed, alpha on the path).
"""

STUDY = Study(
    name="mode-connectivity",
    description="Linear mode connectivity: accuracy drop of weight averages and per-layer "
                "gradient change vs spawn step (CNN on MNIST-1D)",
    config_cls=ModeConnectivityConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
)
