"""``transformer-dynamics``: four training phenomena of small transformers, through the lenses.

Four experiments, each a sweep of one setting (a sweep point is experiment x setting x seed);
every point trains a :class:`telescope.models.TinyTransformer` and logs lenses on a step grid.

1. **Entropy collapse** (Zhai et al., 2023, "Stabilizing Transformer Training by Preventing
   Attention Entropy Collapse", ICML). An encoder is trained at a high Adam learning rate with no
   warmup, with plain linear layers (setting 0) or with sigma-reparametrized ones
   ``W_hat = (gamma / sigma(W)) W`` (setting 1, :class:`telescope.models.SigmaReparamLinear`).
   Logged: the attention entropy of every head, ``H = mean_{n,i} -sum_j A_ij log A_ij``,
   normalized by its maximum ``mean_i log m_i`` (:func:`telescope.lens.attention_entropy`),
   and train loss / accuracy. Zhai et al. bound the attention logits by the spectral norms of
   ``W_Q`` and ``W_K``; without the reparametrization the logits grow and the entropy collapses
   (``normalized -> 0``), often with unstable training.
2. **Rank growth from small initialization** (Abbe, Boix-Adsera, Saremi et al., 2023,
   "incremental learning"; Boix-Adsera, Littwin, Abbe, Bengio & Susskind, 2023, "Transformers
   learn through gradual rank increase", NeurIPS). ``TinyTransformer(alpha=a)`` multiplies the
   initial weights by ``a``; the setting is ``a`` (small vs 1). Logged with
   :class:`telescope.lens.WeightRank`: for every weight matrix ``D = W_t - W_0`` and for the
   per-head bilinear forms ``M_QK^h = W_Q[h]^T W_K[h]``, ``M_VO^h = W_O[:, h] W_V[h]``,
   ``D = M_t - M_0``: the stable rank ``||D||_F^2 / ||D||_2^2`` and the numerical rank
   ``#{k : s_k > threshold * s_1}``. Small initialization should give low-rank updates whose rank
   grows step-wise. The default optimizer is full-batch Adam (``rank.optimizer="sgd"`` for
   gradient descent, the setting of the theory).
3. **Slingshot** (Thilak, Littwin, Zhai, Saremi, Paiss & Susskind, 2022, "The Slingshot
   Mechanism: An Empirical Study of Adaptive Optimizers and the Grokking Phenomenon"). A one-layer
   decoder learns ``a + b mod p`` full batch with Adam and no weight decay; the setting is Adam's
   ``epsilon``. Logged every ``every`` steps: the last layer's norm ``||theta_head||_2``
   (:class:`telescope.lens.NormCycles`) and the train loss. Cycles are found by
   :func:`telescope.lens.detect_cycles` (a growth phase of the log-norm rising by at least
   ``min_rise``, followed by a plateau or a drop); loss spikes by :func:`loss_spikes` (the loss
   exceeding ``spike_factor`` times its running minimum). A cycle "has a spike" when a spike peak
   lies in ``[start, end]`` of the cycle. Thilak et al. see cycles with small ``epsilon`` and none
   when ``epsilon`` is large enough to damp Adam's normalization of tiny gradients. The quick
   preset uses ``beta2 = 0.99`` (Thilak et al.: Adam's default 0.999) and a learning rate of
   ``1e-2`` so that the first slingshot comes within 3000 steps; the full preset uses 0.999 and
   ``1e-3`` over 1e5 steps.
4. **Lazy-regime validity** (Chizat, Oyallon & Bach, 2019, "On Lazy Training in Differentiable
   Programming", NeurIPS). ``h = LazyModel(TinyTransformer(...), alpha)``, ``h(x) = alpha (f(x;
   theta) - f(x; theta_0))``, trained by plain gradient descent on ``MSE(h, y) / alpha^2`` at a
   fixed learning rate (the setting is ``alpha``), with a :class:`telescope.Telescope` attached.
   At every logged step ``T`` the gap between the network and its linearization at
   initialization, ``h_lin(x) = h_0(x) + grad_theta h_{theta_0}(x)^T (theta_T - theta_0)``
   (``Telescope.linearized`` vs ``Telescope.actual``) on held-out probe points is recorded as
   ``gap_abs = mean_{x, o} |h_T(x) - h_lin(x)|`` (absolute) and ``gap_rel = gap_abs /
   mean |h_T(x)|`` (relative). With this scaling every step moves ``theta`` by ``O(1 / alpha)``,
   so at a fixed ``T`` the Taylor remainder is ``gap_abs = alpha * O(||theta_T - theta_0||^2) =
   O(1 / alpha)`` and ``alpha * gap_abs`` against ``T`` should collapse onto one curve for large
   ``alpha``. The figure also plots the gap against ``T / alpha``; there the curves need not
   collapse (in the quick preset they do not: the parameter distance at a fixed ``T`` scales
   like ``1 / alpha``, so ``T / alpha`` is not the variable that the remainder depends on).

The entropy, rank and lazy experiments read a sequence classification task
(:func:`telescope.data.sequence_task`, default ``"digits-rows"``: scikit-learn's bundled 8x8
digits as 8 tokens of 8 pixels, 10 classes); the slingshot experiment reads
:func:`telescope.data.modular_arithmetic` (``[a, b, =]``). Rows are tidy: every row has
``step`` and ``lens`` (``"train"``, ``"entropy"``, ``"rank"``, ``"cycle"``, ``"spike"``,
``"lazy"``) and the same columns with the same types in every point (unused ones NaN, ``""`` or
``-1``): one row per (point, step) for ``train`` / ``lazy``, per (point, step, layer, head) for
``entropy``, per (point, step, matrix, head) for ``rank``, per detected cycle / spike.

The ``quick`` preset runs the four experiments (one seed) on a laptop CPU in a few minutes; the
``full`` preset trains longer, sweeps more settings and seeds, and is meant for a GPU
(``device="auto"``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from telescope.data import modular_arithmetic, sequence_task
from telescope.data.synthetic import SEQUENCE_TASKS
from telescope.errors import UsageError
from telescope.lens import NormCycles, WeightRank, attention_entropy
from telescope.lens.telescope import Telescope
from telescope.models import LazyModel, TinyTransformer
from telescope.report import figures as fg
from telescope.studies.base import Progress, Study, check_device, check_range
from telescope.studies.base import resolve_device as _device

__all__ = ["TransformerDynamicsConfig", "SequenceData", "EntropyConfig", "RankConfig",
           "SlingshotConfig", "LazyConfig", "EXPERIMENTS", "points", "run_point", "figures",
           "headline", "loss_spikes", "step_grid", "STUDY"]

EXPERIMENTS = ("entropy", "rank", "slingshot", "lazy")


# --------------------------------------------------------------------------- config


@dataclass
class SequenceData:
    """The sequence classification task (:func:`telescope.data.sequence_task`) of the entropy,
    rank and lazy experiments."""

    name: str = "digits-rows"          # or "mnist1d-patches"
    n_train: int = 512
    n_test: int = 256


@dataclass
class EntropyConfig:
    """Experiment 1: high-lr Adam, no warmup, with and without sigma-reparametrization."""

    sigma_reparam: tuple[bool, ...] = (False, True)
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    lr: float = 3e-2
    steps: int = 300
    batch_size: int = 128
    evals: int = 12                    # log-spaced measurement steps (the last: the end)


@dataclass
class RankConfig:
    """Experiment 2: initialization scale ``alpha`` (small vs 1), full-batch Adam."""

    alphas: tuple[float, ...] = (0.01, 1.0)
    d_model: int = 32
    n_heads: int = 2
    n_layers: int = 1
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    steps: int = 400
    threshold: float = 0.05            # numerical rank: s_k > threshold * s_1
    evals: int = 14


@dataclass
class SlingshotConfig:
    """Experiment 3: Adam's ``eps`` on modular addition, full batch, no weight decay."""

    eps: tuple[float, ...] = (1e-8, 1e-4)
    p: int = 23
    train_fraction: float = 0.5
    d_model: int = 32
    n_heads: int = 4
    lr: float = 1e-2
    beta2: float = 0.99                # shorter second-moment memory: earlier first slingshot
    steps: int = 3000
    every: int = 10                    # log norm and loss every `every` steps
    min_rise: float = 0.05             # detect_cycles: minimal relative rise of a growth phase
    smooth: int = 1                    # detect_cycles: moving-average window (log points)
    spike_factor: float = 10.0         # loss_spikes: loss > factor * running minimum


@dataclass
class LazyConfig:
    """Experiment 4: ``LazyModel(TinyTransformer, alpha)``, GD on ``MSE / alpha^2``."""

    alphas: tuple[float, ...] = (1.0, 4.0, 16.0, 64.0)
    n_train: int = 128
    n_probe: int = 64
    d_model: int = 32
    n_heads: int = 2
    n_layers: int = 1
    lr: float = 0.5
    steps: int = 300
    evals: int = 12


@dataclass
class TransformerDynamicsConfig:
    """Config of ``transformer-dynamics``; e.g. ``--set experiments=entropy,lazy``,
    ``--set lazy.alphas=1,8,64 slingshot.steps=5000``."""

    experiments: tuple[str, ...] = EXPERIMENTS
    data: SequenceData = field(default_factory=SequenceData)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    slingshot: SlingshotConfig = field(default_factory=SlingshotConfig)
    lazy: LazyConfig = field(default_factory=LazyConfig)
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"                # "cpu", "cuda", ... or "auto" (cuda when available)
    seeds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [e for e in self.experiments if e not in EXPERIMENTS]
        if not self.experiments or bad:
            raise UsageError(f"experiments must be a non-empty subset of {EXPERIMENTS}, got "
                             f"{self.experiments}")
        if self.seeds < 1:
            raise UsageError(f"seeds must be >= 1, got {self.seeds}")
        for name in ("entropy", "rank", "slingshot", "lazy"):
            sub = getattr(self, name)
            if sub.steps < 1 or not (sub.lr > 0 and math.isfinite(sub.lr)):
                raise UsageError(f"{name}.steps must be >= 1 and {name}.lr positive, got "
                                 f"{sub.steps} and {sub.lr}")
        if not self.entropy.sigma_reparam:
            raise UsageError("entropy.sigma_reparam must list at least one of true/false")
        for name, values in (("rank.alphas", self.rank.alphas), ("lazy.alphas", self.lazy.alphas),
                             ("slingshot.eps", self.slingshot.eps)):
            if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
                raise UsageError(f"{name} must be positive numbers, got {values}")
        if not 0.0 <= self.rank.threshold < 1.0:
            raise UsageError(f"rank.threshold must lie in [0, 1), got {self.rank.threshold}")
        if self.slingshot.every < 1 or self.slingshot.spike_factor <= 1.0:
            raise UsageError("slingshot.every must be >= 1 and slingshot.spike_factor > 1")

        if self.data.name not in SEQUENCE_TASKS:
            raise UsageError(f"data.name must be one of {', '.join(SEQUENCE_TASKS)}, got "
                             f"{self.data.name!r}")
        check_device("device", self.device)
        check_range("data.n_train", self.data.n_train, 1)
        check_range("data.n_test", self.data.n_test, 1)
        for name in ("entropy", "rank", "slingshot", "lazy"):
            sub = getattr(self, name)
            check_range(f"{name}.d_model", sub.d_model, 1)
            check_range(f"{name}.n_heads", sub.n_heads, 1)
            if sub.d_model % sub.n_heads:
                raise UsageError(f"{name}.d_model ({sub.d_model}) must be a multiple of "
                                 f"{name}.n_heads ({sub.n_heads})")
            if hasattr(sub, "n_layers"):
                check_range(f"{name}.n_layers", sub.n_layers, 1)
            if hasattr(sub, "evals"):
                check_range(f"{name}.evals", sub.evals, 1)
        check_range("entropy.batch_size", self.entropy.batch_size, 1)
        s = self.slingshot
        check_range("slingshot.p", s.p, 3)
        check_range("slingshot.train_fraction", s.train_fraction, 0, 1, low_open=True,
                    high_open=True)
        check_range("slingshot.beta2", s.beta2, 0, 1, high_open=True)
        check_range("slingshot.min_rise", s.min_rise, 0)
        check_range("slingshot.smooth", s.smooth, 1)
        check_range("lazy.n_train", self.lazy.n_train, 1)
        check_range("lazy.n_probe", self.lazy.n_probe, 1)


PRESETS = {
    "quick": {},
    "full": {
        "data.name": "mnist1d-patches", "data.n_train": 4000, "data.n_test": 1000,
        "entropy.d_model": 128, "entropy.n_layers": 4, "entropy.steps": 3000,
        "entropy.evals": 24,
        "rank.alphas": (0.001, 0.01, 0.1, 1.0), "rank.d_model": 64, "rank.n_heads": 4,
        "rank.n_layers": 2, "rank.steps": 5000, "rank.evals": 30,
        "slingshot.eps": (1e-8, 1e-6, 1e-4), "slingshot.p": 97, "slingshot.d_model": 128,
        "slingshot.beta2": 0.999, "slingshot.lr": 1e-3, "slingshot.steps": 100000,
        "slingshot.every": 50, "slingshot.smooth": 3,
        "lazy.alphas": (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0), "lazy.n_train": 512,
        "lazy.n_probe": 256, "lazy.d_model": 64, "lazy.steps": 2000, "lazy.evals": 20,
        "seeds": 3, "device": "auto",
    },
}


# --------------------------------------------------------------------------- the sweep


def points(config: TransformerDynamicsConfig) -> list[dict]:
    """experiment x setting x seed. ``setting`` is a float in every point: ``sigma_reparam``
    (0 / 1), the initialization scale ``alpha``, Adam's ``eps`` or the lazy ``alpha``."""
    seeds = range(config.seed, config.seed + config.seeds)
    settings = {
        "entropy": [float(bool(s)) for s in config.entropy.sigma_reparam],
        "rank": [float(a) for a in config.rank.alphas],
        "slingshot": [float(e) for e in config.slingshot.eps],
        "lazy": [float(a) for a in config.lazy.alphas],
    }
    return [{"experiment": e, "setting": v, "seed": int(s)}
            for e in config.experiments for v in settings[e] for s in seeds]


def step_grid(steps: int, evals: int) -> list[int]:
    """About ``evals`` log-spaced steps in ``[1, steps]`` (integers, deduplicated), with
    ``steps`` last."""
    if evals <= 1:
        return [steps]
    grid = np.unique(np.round(np.geomspace(1, steps, evals)).astype(int))
    return sorted({int(s) for s in grid} | {steps})


def loss_spikes(steps, losses, factor: float = 10.0) -> list[dict]:
    """Spikes of a loss curve: episodes where the loss exceeds ``factor`` times its running
    minimum.

    The running minimum ``m`` starts at the first loss. A spike starts at the first point with
    ``loss > factor * m`` and ends at the first later point with ``loss <= factor * m`` (or at the
    last point); its ``peak`` is the step of its largest loss. After a spike, ``m`` restarts from
    the loss at its end. Non-finite losses count as above any threshold.

    Returns ``[{"start", "peak", "end", "height"}]`` with ``height = max loss / m``.
    """
    steps, losses = list(steps), [float(v) for v in losses]
    out: list[dict] = []
    if not losses:
        return out
    m = losses[0] if math.isfinite(losses[0]) else math.inf
    k = 1
    while k < len(losses):
        v = losses[k]
        if not math.isfinite(v) or v > factor * m:
            start, peak, high = k, k, v
            while k < len(losses) and (not math.isfinite(losses[k]) or losses[k] > factor * m):
                if not math.isfinite(losses[k]) or losses[k] > high:
                    peak, high = k, losses[k]
                k += 1
            end = min(k, len(losses) - 1)
            out.append({"start": steps[start], "peak": steps[peak], "end": steps[end],
                        "height": high / m if m > 0 else math.inf})
            m = losses[end] if math.isfinite(losses[end]) else math.inf
        else:
            m = min(m, v)
        k += 1
    return out


# every row has every column, with one type per column across all points
_TEXT = ("setting_name", "lens", "layer", "matrix", "kind")
_INT = ("step", "head")
_FLOAT = ("train_loss", "train_acc", "test_acc", "entropy", "normalized_entropy",
          "delta_norm", "sigma_max", "stable_rank", "rank", "norm", "growth", "cycle_start",
          "cycle_end", "cycle_rise", "spike_height", "gap_abs", "gap_rel", "output_scale",
          "param_distance", "seconds")
_BOOL = ("diverged", "has_spike")


def _row(name: str, step: int, lens: str, **values) -> dict:
    row: dict = {k: "" for k in _TEXT}
    row.update({"step": -1, "head": -1})
    row.update({k: math.nan for k in _FLOAT})
    row.update({k: False for k in _BOOL})
    row.update(setting_name=name, step=int(step), lens=lens)
    for k, v in values.items():
        if k not in row:
            raise KeyError(f"unknown column {k!r}")
        if k in _FLOAT:
            v = float(v)
        elif k in _INT:
            v = int(v)
        elif k in _BOOL:
            v = bool(v)
        else:
            v = str(v)
        row[k] = v
    return row


def _setting_name(experiment: str, setting: float) -> str:
    if experiment == "entropy":
        return "sigma-reparam" if setting else "plain"
    if experiment == "slingshot":
        return f"eps={setting:g}"
    return f"alpha={setting:g}"


def run_point(config: TransformerDynamicsConfig, point: dict, progress: Progress) -> list[dict]:
    """Run one (experiment, setting, seed); tidy rows (see the module docstring)."""
    experiment = point["experiment"]
    runner = {"entropy": _run_entropy, "rank": _run_rank, "slingshot": _run_slingshot,
              "lazy": _run_lazy}.get(experiment)
    if runner is None:
        raise UsageError(f"unknown experiment {experiment!r}; known: {EXPERIMENTS}")
    start = time.perf_counter()
    name = _setting_name(experiment, float(point["setting"]))
    rows = runner(config, float(point["setting"]), int(point["seed"]), name, progress)
    rows[-1]["seconds"] = time.perf_counter() - start
    return rows


def _sequence_data(config: TransformerDynamicsConfig, seed: int, n_train: int, n_test: int):
    ds = sequence_task(config.data.name, n_train, n_test, seed=seed)
    dev = _device(config.device)
    dtype = getattr(torch, config.dtype)
    return ds, (ds.x_train.to(dev, dtype), ds.y_train.to(dev),
                ds.x_test.to(dev, dtype), ds.y_test.to(dev))


def _encoder(ds, d_model: int, n_heads: int, n_layers: int, **kw) -> TinyTransformer:
    seq_len, features = ds.x_train.shape[1:]
    return TinyTransformer(1, d_model, n_heads, n_layers, int(seq_len), ds.n_classes,
                           input_dim=int(features), causal=False, readout="mean", **kw)


@torch.no_grad()
def _loss_acc(model, x, y) -> tuple[float, float]:
    was = model.training
    model.eval()
    try:
        out = model(x)
    finally:
        model.train(was)
    return float(F.cross_entropy(out, y)), float((out.argmax(-1) == y).double().mean())


def _run_entropy(config, setting, seed, name, progress) -> list[dict]:
    c = config.entropy
    ds, (x, y, x_test, y_test) = _sequence_data(config, seed, config.data.n_train,
                                                config.data.n_test)
    torch.manual_seed(seed)
    model = _encoder(ds, c.d_model, c.n_heads, c.n_layers, sigma_reparam=bool(setting))
    model = model.to(device=x.device, dtype=x.dtype)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    batch = min(c.batch_size, n)
    grid = set(step_grid(c.steps, c.evals))
    rows: list[dict] = []
    progress.set(c.steps)

    def measure(step: int, diverged: bool) -> None:
        loss, acc = _loss_acc(model, x, y)
        _, test_acc = _loss_acc(model, x_test, y_test)
        rows.append(_row(name, step, "train", train_loss=loss, train_acc=acc, test_acc=test_acc,
                         diverged=diverged))
        if diverged:
            return
        for r in attention_entropy(model, x_test):
            rows.append(_row(name, step, "entropy", layer=r["layer"], head=r["head"],
                             entropy=r["entropy"], normalized_entropy=r["normalized"]))

    measure(0, False)
    for step in range(1, c.steps + 1):
        idx = torch.randperm(n, generator=gen)[:batch].to(x.device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            measure(step, True)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update()
        if step in grid:
            measure(step, False)
    return rows


def _run_rank(config, setting, seed, name, progress) -> list[dict]:
    c = config.rank
    ds, (x, y, x_test, y_test) = _sequence_data(config, seed, config.data.n_train,
                                                config.data.n_test)
    torch.manual_seed(seed)
    model = _encoder(ds, c.d_model, c.n_heads, c.n_layers, alpha=setting)
    model = model.to(device=x.device, dtype=x.dtype)
    opt = (torch.optim.Adam(model.parameters(), lr=c.lr) if c.optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=c.lr))
    lens = WeightRank(model, threshold=c.threshold)
    grid = set(step_grid(c.steps, c.evals))
    rows: list[dict] = []
    progress.set(c.steps)
    for step in range(1, c.steps + 1):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update()
        if step in grid:
            train_loss, train_acc = _loss_acc(model, x, y)
            _, test_acc = _loss_acc(model, x_test, y_test)
            rows.append(_row(name, step, "train", train_loss=train_loss, train_acc=train_acc,
                             test_acc=test_acc))
            for r in lens.measure():
                rows.append(_row(name, step, "rank", matrix=r["matrix"], kind=r["kind"],
                                 head=r["head"], delta_norm=r["delta_norm"],
                                 sigma_max=r["sigma_max"], stable_rank=r["stable_rank"],
                                 rank=r["rank"]))
    return rows


def _run_slingshot(config, setting, seed, name, progress) -> list[dict]:
    c = config.slingshot
    dev, dtype = _device(config.device), getattr(torch, config.dtype)
    ds = modular_arithmetic(c.p, op="add", train_fraction=c.train_fraction, seed=seed,
                            equals=True)
    x, y, x_test, y_test = (t.to(dev) for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    torch.manual_seed(seed)
    model = TinyTransformer(c.p + 1, c.d_model, c.n_heads, 1, 3, c.p, causal=True,
                            readout="last").to(device=dev, dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, eps=setting, betas=(0.9, c.beta2),
                           weight_decay=0.0)
    norms = NormCycles(model.head, name="head")
    rows: list[dict] = []
    steps, losses = [], []
    progress.set(c.steps)
    for step in range(1, c.steps + 1):
        loss = F.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            rows.append(_row(name, step, "train", train_loss=loss.item(), diverged=True))
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update()
        if step % c.every == 0:
            # the loss of the step's forward pass (before the update), the norm after it
            norms.update(step)
            steps.append(step)
            losses.append(loss.item())
            _, test_acc = _loss_acc(model, x_test, y_test) if len(x_test) else (0.0, math.nan)
            rows.append(_row(name, step, "train", train_loss=losses[-1], test_acc=test_acc,
                             norm=norms.norms[-1]))
    growth = {r["step"]: r["growth"] for r in norms.rows()}
    for r in rows:
        if r["step"] in growth:
            r["growth"] = float(growth[r["step"]])
    spikes = loss_spikes(steps, losses, c.spike_factor)
    for s in spikes:
        rows.append(_row(name, s["peak"], "spike", cycle_start=s["start"], cycle_end=s["end"],
                         spike_height=s["height"]))
    if len(steps) >= 2:
        for cyc in norms.cycles(min_rise=c.min_rise, smooth=c.smooth):
            has = any(cyc["start"] <= s["peak"] <= cyc["end"] for s in spikes)
            rows.append(_row(name, cyc["peak"], "cycle", cycle_start=cyc["start"],
                             cycle_end=cyc["end"], cycle_rise=cyc["rise"], has_spike=has))
    if not rows:
        rows.append(_row(name, 0, "train"))
    return rows


def _run_lazy(config, setting, seed, name, progress) -> list[dict]:
    c = config.lazy
    ds, (x, y, x_test, _) = _sequence_data(config, seed, c.n_train, c.n_probe)
    targets = F.one_hot(y, ds.n_classes).to(x.dtype)
    torch.manual_seed(seed)
    inner = _encoder(ds, c.d_model, c.n_heads, c.n_layers).to(device=x.device, dtype=x.dtype)
    model = LazyModel(inner, setting)
    opt = torch.optim.SGD(model.parameters(), lr=c.lr)
    theta0 = [p.detach().clone() for p in inner.parameters()]
    grid = set(step_grid(c.steps, c.evals))
    rows: list[dict] = []
    progress.set(c.steps)
    with Telescope(model, opt, {"probe": x_test}, every=c.steps, track_linearized=False) as tel:
        for step in range(1, c.steps + 1):
            loss = F.mse_loss(model(x), targets)
            opt.zero_grad(set_to_none=True)
            model.scale_loss(loss).backward()
            opt.step()   # the Telescope observes it (and stops on non-finite parameters)
            progress.update()
            if step in grid:
                actual = tel.actual("probe").double()
                lin = tel.linearized("probe").double()
                gap = float((actual - lin).abs().mean())
                scale = float(actual.abs().mean())
                with torch.no_grad():
                    dist = math.sqrt(sum(float((p - p0).double().pow(2).sum())
                                         for p, p0 in zip(inner.parameters(), theta0,
                                                          strict=True)))
                    model.eval()
                    train_mse = float(F.mse_loss(model(x), targets))
                    model.train()
                rows.append(_row(name, step, "lazy", train_loss=train_mse, gap_abs=gap,
                                 gap_rel=gap / scale if scale > 0 else math.nan,
                                 output_scale=scale, param_distance=dist))
    return rows


# --------------------------------------------------------------------------- figures


def _of(df: pd.DataFrame, experiment: str, lens: str | None = None) -> pd.DataFrame:
    if df.empty or "experiment" not in df:
        return df.iloc[0:0]
    sub = df[df["experiment"] == experiment]
    if lens is not None and not sub.empty:
        sub = sub[sub["lens"] == lens]
    return sub


def _settings(sub: pd.DataFrame) -> list[tuple[float, str]]:
    pairs = sub[["setting", "setting_name"]].drop_duplicates().sort_values("setting")
    return [(float(s), str(n)) for s, n in pairs.itertuples(index=False)]


def _per_seed_mean(sub: pd.DataFrame, by: list[str], y: str) -> pd.DataFrame:
    """Mean of ``y`` over the rows sharing ``by + [seed, step]`` (e.g. over heads)."""
    return sub.groupby([*by, "seed", "step"], as_index=False)[y].mean()


def figures(df: pd.DataFrame, config: TransformerDynamicsConfig, out_dir: Path) -> list[Path]:
    """One figure per experiment that has rows: ``transformer_dynamics_entropy``, ``_rank``,
    ``_slingshot``, ``_lazy`` (PNG + SVG)."""
    paths: list[Path] = []
    with fg.paper_style():
        for experiment, draw in (("entropy", _fig_entropy), ("rank", _fig_rank),
                                 ("slingshot", _fig_slingshot), ("lazy", _fig_lazy)):
            sub = _of(df, experiment)
            if sub.empty:
                continue
            fig = draw(sub)
            if fig is not None:
                paths.append(fg.save_figure(fig, out_dir, f"transformer_dynamics_{experiment}"))
    return paths


def _fig_entropy(sub: pd.DataFrame):
    ent = sub[(sub["lens"] == "entropy") & (sub["step"] > 0)]
    train = sub[(sub["lens"] == "train") & (sub["step"] > 0)]
    fig, axes = fg.new_figure(1, 3, panel_size=(3.2, 2.6))
    styles = ("-", "--", ":", "-.")
    for i, (setting, name) in enumerate(_settings(sub)):
        color = fg.color_cycle(i)
        e = ent[ent["setting"] == setting]
        for j, layer in enumerate(sorted(e["layer"].unique())):
            m = _per_seed_mean(e[e["layer"] == layer], [], "normalized_entropy")
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
    return fig


def _rank_groups(rank: pd.DataFrame) -> dict[str, pd.DataFrame]:
    attn_w = rank[(rank["kind"] == "weight") & rank["matrix"].str.contains(r"\.attn\.")]
    return {"attention W_Q, W_K, W_V, W_O": attn_w,
            "per-head M_QK": rank[rank["kind"] == "qk"],
            "per-head M_VO": rank[rank["kind"] == "vo"]}


def _fig_rank(sub: pd.DataFrame):
    rank = sub[sub["lens"] == "rank"]
    groups = _rank_groups(rank)
    fig, axes = fg.new_figure(2, 3, panel_size=(3.0, 2.4), sharex=True)
    for i, (setting, name) in enumerate(_settings(sub)):
        color = fg.color_cycle(i)
        for j, (label, g) in enumerate(groups.items()):
            g = g[g["setting"] == setting]
            if g.empty:
                continue
            for r, col in enumerate(("rank", "stable_rank")):
                m = _per_seed_mean(g, [], col)
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
    return fig


def _fig_slingshot(sub: pd.DataFrame):
    train = sub[(sub["lens"] == "train") & sub["norm"].notna()]
    cycles = sub[sub["lens"] == "cycle"]
    spikes = sub[sub["lens"] == "spike"]
    settings = _settings(sub)
    fig, axes = fg.new_figure(2, 1, panel_size=(6.4, 2.3), sharex=True)
    for i, (setting, name) in enumerate(settings):
        color = fg.color_cycle(i)
        for k, (seed, t) in enumerate(train[train["setting"] == setting].groupby("seed")):
            label = name if k == 0 else None
            axes[0, 0].plot(t["step"], t["norm"], color=color, lw=1.0, label=label)
            axes[1, 0].plot(t["step"], t["train_loss"], color=color, lw=1.0, label=label)
            c = cycles[(cycles["setting"] == setting) & (cycles["seed"] == seed)]
            if not c.empty:
                peak_norm = np.interp(c["step"], t["step"], t["norm"])
                axes[0, 0].plot(c["step"], peak_norm, "v", color=color, ms=5)
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
    return fig


def _fig_lazy(sub: pd.DataFrame):
    lazy = sub[sub["lens"] == "lazy"].copy()
    lazy["alpha"] = lazy["setting"]
    lazy["t_over_alpha"] = lazy["step"] / lazy["alpha"]
    lazy["alpha_gap"] = lazy["gap_abs"] * lazy["alpha"]
    fig, axes = fg.new_figure(1, 4, panel_size=(2.9, 2.5))
    panels = (("step", "gap_abs", "step T", "|h_T - h_lin| (mean abs)"),
              ("step", "alpha_gap", "step T", "alpha x gap"),
              ("t_over_alpha", "gap_abs", "T / alpha", "|h_T - h_lin| (mean abs)"),
              ("step", "train_loss", "step T", "train MSE of h"))
    for i, (setting, name) in enumerate(_settings(sub)):
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
    return fig


# --------------------------------------------------------------------------- headline


def _final_step(sub: pd.DataFrame) -> pd.DataFrame:
    last = sub.groupby(["setting", "seed"])["step"].transform("max")
    return sub[sub["step"] == last]


def _headline_entropy(sub: pd.DataFrame, out: dict) -> None:
    ent = _final_step(sub[sub["lens"] == "entropy"])
    train = _final_step(sub[sub["lens"] == "train"])
    for setting, name in _settings(sub):
        e = ent[ent["setting"] == setting]
        t = train[train["setting"] == setting]
        if not e.empty:
            per_seed = e.groupby("seed")["normalized_entropy"]
            out[f"entropy: final normalized entropy, mean over heads ({name})"] = float(
                per_seed.mean().mean())
            out[f"entropy: final normalized entropy, lowest head ({name})"] = float(
                per_seed.min().mean())
        if not t.empty:
            out[f"entropy: final train loss ({name})"] = float(t["train_loss"].mean())
            out[f"entropy: diverged runs ({name})"] = int(t["diverged"].sum())


def _rank_increase_steps(g: pd.DataFrame) -> list[int]:
    """Logged steps at which the numerical rank (mean over heads / matrices, then over seeds)
    is higher than at the previous logged step."""
    curve = g.groupby(["seed", "step"])["rank"].mean().groupby("step").mean().sort_index()
    values = curve.to_numpy()
    return [int(s) for s, a, b in zip(curve.index[1:], values[:-1], values[1:], strict=True)
            if b > a]


def _headline_rank(sub: pd.DataFrame, out: dict) -> None:
    rank = sub[sub["lens"] == "rank"]
    for setting, name in _settings(sub):
        for label, g in _rank_groups(rank[rank["setting"] == setting]).items():
            short = {"attention W_Q, W_K, W_V, W_O": "attn weights", "per-head M_QK": "qk",
                     "per-head M_VO": "vo"}[label]
            f = _final_step(g) if not g.empty else g
            if f.empty:
                continue
            out[f"rank: final max rank, {short} ({name})"] = float(
                f.groupby("seed")["rank"].max().mean())
            out[f"rank: final mean rank, {short} ({name})"] = float(
                f.groupby("seed")["rank"].mean().mean())
            out[f"rank: final mean stable rank, {short} ({name})"] = float(
                f.groupby("seed")["stable_rank"].mean().mean())
            if short == "vo":
                out[f"rank: steps where vo rank increases ({name})"] = _rank_increase_steps(g)


def _headline_slingshot(sub: pd.DataFrame, out: dict) -> None:
    seeds = sub.groupby("setting")["seed"].nunique()
    for setting, name in _settings(sub):
        s = sub[sub["setting"] == setting]
        n = int(seeds.get(setting, 1))
        cyc = s[s["lens"] == "cycle"]
        spk = s[s["lens"] == "spike"]
        out[f"slingshot: cycles per run ({name})"] = len(cyc) / n
        out[f"slingshot: loss spikes per run ({name})"] = len(spk) / n
        if len(cyc):
            out[f"slingshot: fraction of cycles with a loss spike ({name})"] = float(
                cyc["has_spike"].mean())
        tr = _final_step(s[s["lens"] == "train"])
        if not tr.empty:
            out[f"slingshot: final last-layer norm ({name})"] = float(tr["norm"].mean())


def _headline_lazy(sub: pd.DataFrame, out: dict) -> None:
    lazy = sub[sub["lens"] == "lazy"]
    if lazy.empty:
        return
    # the last step every alpha reached
    common = lazy.groupby("setting")["step"].max().min()
    at = lazy[lazy["step"] == common].groupby("setting")[["gap_abs", "gap_rel"]].mean()
    out["lazy: step T of the gaps below"] = int(common)
    for setting, row in at.iterrows():
        out[f"lazy: |h_T - h_lin| at T (alpha={setting:g})"] = float(row["gap_abs"])
        out[f"lazy: relative gap at T (alpha={setting:g})"] = float(row["gap_rel"])
    ok = at[(at["gap_abs"] > 0) & np.isfinite(at["gap_abs"])]
    if len(ok) >= 2:
        slope = np.polyfit(np.log(ok.index.to_numpy(float)), np.log(ok["gap_abs"].to_numpy()), 1)
        out["lazy: gap scaling exponent in alpha (fit, theory -1)"] = float(slope[0])
        (a1, g1), (a2, g2) = list(ok["gap_abs"].items())[-2:]
        out["lazy: gap scaling exponent, two largest alphas"] = float(
            math.log(g2 / g1) / math.log(a2 / a1))


def headline(df: pd.DataFrame, config: TransformerDynamicsConfig) -> dict:
    """Per experiment, at each point's last step, means over seeds: normalized entropy (mean
    and lowest head) and train loss by setting; max numerical rank and mean stable rank of the
    attention updates by alpha and the steps where the vo rank increases; cycles, loss spikes
    and cycles with a spike by eps; the linearization gap by alpha at the last common step and
    its log-log slope in alpha."""
    out: dict = {}
    for experiment, fn in (("entropy", _headline_entropy), ("rank", _headline_rank),
                           ("slingshot", _headline_slingshot), ("lazy", _headline_lazy)):
        sub = _of(df, experiment)
        if not sub.empty:
            fn(sub, out)
    if not df.empty and "seed" in df:
        out["seeds"] = int(df["seed"].nunique())
    return out


GUIDE = """
Four small-transformer experiments; each has a figure `transformer_dynamics_<experiment>.png`
and rows in `results.parquet` (column `experiment`, `setting`, `seed`, `step`, `lens`). Curves are
means over seeds, bands their min-max; step axes are logarithmic.

# Entropy collapse (Zhai et al. 2023)

- **a / b**: normalized attention entropy (1 = uniform attention, 0 = all on one key) per layer,
  mean over heads and lowest head, for plain linear layers and for sigma-reparametrized ones,
  trained by Adam at a high learning rate with no warmup. Look for the plain model's entropy
  falling towards 0 while the sigma-reparam model stays higher.
- **c**: full-train-set loss; an unstable run shows it rising again after its minimum.

# Rank growth from small initialization (Boix-Adsera et al. 2023)

- Numerical rank (top row) and stable rank (bottom row) of `W_t - W_0` for the attention
  projections and of the per-head `M_QK`, `M_VO` updates, small `alpha` vs `alpha = 1`. With a
  small initialization the updates stay low rank and their rank grows in steps; at `alpha = 1`
  the updates are high rank from the first steps.

# Slingshot (Thilak et al. 2022)

- **a**: last-layer norm through training for each Adam `eps` (triangles: completed growth
  cycles by `detect_cycles`). **b**: train loss (triangles: loss spikes). Slingshots appear once
  the loss is tiny: the norm jumps while the loss spikes, then plateaus. A large `eps` damps
  Adam's normalization of tiny gradients and suppresses them.

# Lazy regime (Chizat et al. 2019)

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
    name="transformer-dynamics",
    description="small transformers: attention entropy collapse vs sigma-reparam, rank growth "
                "from small init, slingshot norm cycles, lazy-regime linearization gap",
    config_cls=TransformerDynamicsConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
)
