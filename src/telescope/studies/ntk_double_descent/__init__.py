"""``ntk-double-descent``: can NTK theory predict double descent in transformers?

A width sweep of small transformers trained with the squared loss on a sequence task with label
noise, at a fixed training-set size. For every width four predictions of the test error are set
side by side with the trained network's:

(a) the **trained network** (Adam, full batch, as transformers are trained);
(b) the **NTK-theory (lazy) prediction**: gradient flow with the empirical NTK at
    initialization, converged, ``f_lazy(x) = f_0(x) + K_0(x, X) K_0(X, X)^+ (y - f_0(X))``
    (Jacot et al. 2018; Lee et al. 2019: what a network in the lazy/NTK regime would do);
(c) the **after-kernel** prediction: the same formula with the empirical NTK of the trained
    network ``K_T`` (Long 2021, "After-kernel"; Atanasov et al. 2022), i.e. the kernel the
    network has *learned*, used as a fixed kernel;
(d) the **telescoping model** of Jeffares, Curth & van der Schaar (NeurIPS 2024),
    ``f~_T(x) = f_0(x) + sum_t grad f_{t-1}(x)^T (theta_t - theta_{t-1})``, recorded during
    training by :class:`telescope.Telescope` (each step's own tangent kernel) on the first
    ``telescoping`` test points (100 by default: its JVP per step costs about a forward pass
    over them, so fewer points keep training cheap);
(e) **effective parameters** ``p(I) = n/|I| sum_{j in I} ||s(x_j)||^2`` (the paper's Sec. 4.1) of
    the two kernel smoothers, ``s(x)^T = K(x, X) K(X, X)^+`` on train and test points, and --
    with ``smoother=true`` (the ``full`` preset) -- of the trained network itself through
    :class:`telescope.Smoother` (exact for the optimizer really used; costly: ``O(P n)`` memory
    and ``O(P (n + m) n)`` per Adam step, hence off in the quick preset and, in the full preset,
    only for models with at most ``smoother_max_params`` parameters; NaN above).

A one-hidden-layer MLP on the same (flattened) data, trained the same way, is the contrast row:
the model for which the paper measured double descent.

**The infinite-width limit.** A third row, ``ntk-transformer``, trains the transformer family of
:func:`telescope.infinite.families.transformer` (pre-LN encoder, linear-scaling attention,
LayerNorm without learned parameters, residual ReLU MLP blocks, mean readout, NTK
parametrization; the tokens carry a fixed one-hot position block,
:func:`~telescope.infinite.families.with_positions`) whose infinite-width NNGP ``K`` and NTK
``Theta`` exist in closed form (Hron, Bahri, Sohl-Dickstein & Novak 2020; Lee et al. 2019). By
default it is trained by full-batch gradient descent (``ntk_optimizer="gd"``), the dynamics NTK
theory describes. For it and for the MLP (the one-hidden-layer ReLU network's limit on the
flattened inputs, :func:`~telescope.infinite.families.mlp`) every point also records what the
limit predicts (:func:`.predictions.limit_columns`, :func:`.predictions.limit_gaps`): the test
error of the infinite network's ensemble mean, converged, NTK (all layers trained) and NNGP
(readout only), and how far the trained network is from it -- from the ensemble mean, from
the floor a single infinitely wide network would have (its random initial function stays in
its outputs), and from NTK theory's prediction for that very network (its own initial function
plus the infinite-NTK regression of its residual, at the network's own training time under
gradient descent). The kernels do not depend on the width and are computed once per worker and
data set. The standard ``transformer`` row (``TinyTransformer``: standard parametrization,
learned positions, ``1/sqrt(d_k)`` softmax attention) has no closed-form limit: its infinite
columns are NaN.

**The sample-wise view** (``sample_sizes``): test error against the number of training points
``n`` (the first ``n`` of the training set) of the limit's ridgeless NTK and NNGP predictors,
which have a peak of their own in ``n`` (kernel "ridgeless" regression interpolates the label
noise; e.g. Belkin et al. 2019, Nakkiran et al. 2021 for sample-wise double descent, Canatar,
Bordelon & Pehlevan 2021 for kernels), beside networks trained on ``sample_trained`` of those
``n`` at the widths ``sample_widths``.

Why this task: MNIST-1D read as a sequence of 10 patches of 4 samples
(:func:`telescope.data.mnist1d_patches`; see its docstring) is generated offline, small enough
to sweep widths and compute exact empirical NTKs on a CPU, its classes are shapes that sit
anywhere in the sequence (attention across positions is useful), and it is the data set of the
paper's MLP double descent. Two classes (3 vs 5) with ``+1/-1`` targets give one output, so every
kernel is ``n x n``; 20 % of the training targets are flipped, which makes the interpolation peak
pronounced.

The transformer is :class:`telescope.models.TinyTransformer` as an encoder (bidirectional
attention, mean-pooled readout, learned positions, pre-LN), ``d_model`` = the width, one head by
default so that any width is allowed. Its parameter count is about ``12 w^2 + 25 w``: with
``n = 200`` the parameter-count threshold ``P = n`` is near width 3.

This module is the experiment: its config, what one point does (:func:`run_point`), the
headline and the guide. Beside it: :mod:`.figures`, :mod:`.predictions` (the kernel predictions,
the infinite-width predictions and error measures of a point), :mod:`.limit` (the infinite-width
and sample-wise statistics),
:mod:`.analysis` (the statistics and the verdict the headline leads with, on the seed bootstrap
of :mod:`.bootstrap`), :mod:`.words` (the answer in words) and :mod:`.formatting`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import field
from typing import Annotated, Literal

import pandas as pd
import torch
from annotated_types import Ge, Le, Lt

from telescope.data import add_label_noise, binary_subset, sequence_task
from telescope.data.synthetic import SEQUENCE_TASKS
from telescope.errors import DivergedError, UsageError
from telescope.infinite import families
from telescope.kernels import kernel_distance
from telescope.lens import Smoother, Telescope
from telescope.models import MLP, TinyTransformer
from telescope.studies._binary import sign_error
from telescope.studies.base import Progress, Study, check_device
from telescope.studies.base import resolve_device as _device
from telescope.studies.constraints import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
)
from telescope.studies.ntk_double_descent.analysis import (
    AGREEMENT,
    LEVEL,
    LIMITS,
    MODELS,
    PEAK_RATIO,
    PREDICTIONS,
    RESAMPLE_SEED,
    RESAMPLES,
    SeedBootstrap,
    curve_row,
    final_rows,
    half_verdicts,
    lazy_valid_from,
)
from telescope.studies.ntk_double_descent.figures import figures
from telescope.studies.ntk_double_descent.formatting import (
    fmt_corr,
    fmt_estimate,
    fmt_peak,
    fmt_share,
    fmt_stat,
    fmt_widths,
)
from telescope.studies.ntk_double_descent.limit import limit_headline
from telescope.studies.ntk_double_descent.predictions import (
    kernel_prediction,
    limit_columns,
    limit_ensemble,
    limit_gaps,
    limit_kernels,
    limit_setup,
    mse,
    relative_distance,
)
from telescope.studies.ntk_double_descent.words import answer
from telescope.train import evenly_spaced_steps, fit

__all__ = ["BinarySequenceData", "NTKDoubleDescentConfig", "PRESETS", "load_task",
           "build_model", "model_inputs", "limit_architecture", "flow_time", "points",
           "run_point", "figures", "headline", "GUIDE", "STUDY"]


@config_dataclass
class BinarySequenceData:
    """A binary sequence task (``+1`` / ``-1`` targets) from
    :func:`telescope.data.sequence_task`."""

    kind: Literal["mnist1d-patches", "digits-rows"] = "mnist1d-patches"
    classes: tuple[int, int] = (3, 5)     # the first becomes +1
    n_train: Annotated[int, Ge(2)] = 200
    n_test: PositiveInt = 400
    patch: int = 4                        # mnist1d-patches: samples per token (divides 40)
    seed: int = 0                         # the data draw and train/test split

    def __post_init__(self) -> None:
        if self.kind not in SEQUENCE_TASKS:
            raise UsageError(f"data.kind must be one of {SEQUENCE_TASKS}, got {self.kind!r}")
        if len(self.classes) != 2 or self.classes[0] == self.classes[1]:
            raise UsageError(f"data.classes must be two different classes, got {self.classes}")
        if self.kind == "mnist1d-patches" and (self.patch < 1 or 40 % self.patch):
            raise UsageError(f"data.patch must divide MNIST-1D's 40 samples (1, 2, 4, 5, 8, 10, "
                             f"20 or 40), got {self.patch}")


@config_dataclass
class NTKDoubleDescentConfig:
    """Config of ``ntk-double-descent``; e.g. ``--set widths=2,4,8 mlp_widths=2,8 steps=300``."""

    data: BinarySequenceData = field(default_factory=BinarySequenceData)
    label_noise: Annotated[float, Ge(0), Le(1)] = 0.2   # fraction of flipped training targets
    models: tuple[str, ...] = MODELS          # rows: transformer, ntk-transformer and/or mlp
    widths: tuple[int, ...] = (3, 4, 6, 8, 12, 16, 32, 64)   # transformer d_model (>= 3)
    ntk_widths: tuple[int, ...] = (4, 8, 16, 64)             # ntk-transformer widths (>= 3)
    mlp_widths: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 256)   # hidden neurons
    n_layers: PositiveInt = 1
    n_heads: PositiveInt = 1
    mlp_ratio: PositiveInt = 4
    optimizer: Literal["adam", "sgd"] = "adam"   # transformer and mlp rows
    lr: PositiveFloat = 3e-3
    momentum: Annotated[float, Ge(0), Lt(1)] = 0.9   # sgd only
    ntk_optimizer: Literal["gd", "adam"] = "gd"  # ntk-transformer: full-batch gradient descent
    ntk_lr: PositiveFloat = 0.5               # ... its learning rate (NTK parametrization)
    ntk_seeds: PositiveInt = 4                # ... its seeds: the first min(this, seeds)
    positions: NonNegativeFloat = 1.0         # ntk-transformer: scale of the one-hot positions
    warmup: NonNegativeInt = 200              # linear learning-rate warmup steps
    steps: PositiveInt = 2000
    evals: PositiveInt = 4                    # measurements at evenly spaced steps
    ridge: NonNegativeFloat = 0.0             # of the kernel regressions (0: pseudo-inverse)
    telescoping: NonNegativeInt = 100         # test points the telescoping model tracks (0: off)
    smoother: bool = False                    # the network's own effective parameters (costly)
    smoother_max_params: int = 200_000        # ... only for models with at most this many
    # the sample-wise view of the ntk-transformer and mlp rows (sample_sizes empty: off): the
    # limit's predictors at every n of sample_sizes (the first n training points), every seed;
    # networks trained at sample_trained x sample_widths on the first sample_network_seeds seeds
    sample_sizes: tuple[int, ...] = (10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 80, 100, 120,
                                     140, 160, 180, 200)
    sample_trained: tuple[int, ...] = (20, 60, 160)
    sample_widths: tuple[int, ...] = (4, 16)
    sample_network_seeds: NonNegativeInt = 4
    dtype: Literal["float32", "float64"] = "float32"   # training; kernels are float64
    device: str = "cpu"
    seeds: int = 8    # with 4 the verdict flipped between machines (see the README's check)
    seed: int = 0

    def __post_init__(self) -> None:
        check_device("device", self.device)
        unknown = [m for m in self.models if m not in MODELS]
        if not self.models or unknown:
            raise UsageError(f"models must be a non-empty subset of {MODELS}, got {self.models}")
        for name, kind in (("widths", "transformer"), ("ntk_widths", "ntk-transformer"),
                           ("mlp_widths", "mlp")):
            values = getattr(self, name)     # only the widths of the models that run
            if kind in self.models and (not values or min(values) < 1):
                raise UsageError(f"{name} must be positive integers, got {values}")
        for name, kind in (("widths", "transformer"), ("ntk_widths", "ntk-transformer")):
            bad = [w for w in getattr(self, name) if w % self.n_heads]
            if kind in self.models and bad:
                raise UsageError(f"every {kind} width must be divisible by n_heads="
                                 f"{self.n_heads}; not {bad} (in {name})")
        if self.sample_sizes and any(m in self.models for m in LIMITS):
            n = self.data.n_train
            for name in ("sample_sizes", "sample_trained"):
                bad = [v for v in getattr(self, name) if not 1 <= v <= n]
                if bad:
                    raise UsageError(f"{name} must lie in 1..data.n_train={n}; not {bad}")
            trains = self.sample_trained and self.sample_network_seeds
            if trains and (not self.sample_widths or min(self.sample_widths) < 1):
                raise UsageError(f"sample_widths must be positive integers, got "
                                 f"{self.sample_widths}")
            bad = [w for w in self.sample_widths if w % self.n_heads]
            if "ntk-transformer" in self.models and trains and bad:
                raise UsageError(f"every sample width must be divisible by n_heads="
                                 f"{self.n_heads}; not {bad}")


PRESETS = {
    "quick": {},
    "full": {
        "data.n_train": 1000, "data.n_test": 2000, "label_noise": 0.2,
        "widths": (4, 6, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128, 256),
        "mlp_widths": (1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64, 128, 256, 1024),
        "ntk_widths": (4, 8, 16, 32, 64, 128, 256), "ntk_seeds": 5,
        "n_layers": 2, "n_heads": 2, "steps": 10000, "evals": 10, "seeds": 5,
        "sample_sizes": (10, 20, 30, 40, 50, 60, 80, 100, 150, 200, 300, 400, 600, 800, 1000),
        "sample_trained": (50, 200, 500), "sample_widths": (4, 64), "sample_network_seeds": 5,
        "smoother": True, "device": "auto",
    },
}


# --------------------------------------------------------------------------- data and models


@functools.lru_cache(maxsize=4)
def _task(data: tuple, noise: float, seed: int, dtype_name: str):
    kind, classes, n_train, n_test, patch, data_seed = data
    dtype = getattr(torch, dtype_name)
    kwargs = {"patch": patch} if kind == "mnist1d-patches" else {}
    ds = sequence_task(kind, n_train, n_test, seed=data_seed, classes=tuple(classes),
                       dtype=dtype, **kwargs)
    ds = binary_subset(ds, (0, 1), targets="pm1")   # the loader relabeled classes to 0, 1
    if noise > 0:
        ds = add_label_noise(ds, noise, seed=seed)
    return ds


def load_task(config: NTKDoubleDescentConfig, seed: int):
    """The point's data set: sequences ``[N, S, D]``, targets ``[N, 1]`` in ``{+1, -1}``, the
    training targets noisy (drawn with ``seed``), the test targets clean."""
    d = config.data
    key = (d.kind, tuple(d.classes), d.n_train, d.n_test, d.patch, d.seed)
    return _task(key, float(config.label_noise), int(seed), config.dtype)


def model_inputs(config: NTKDoubleDescentConfig, kind: str, x: torch.Tensor) -> torch.Tensor:
    """What a model row's network (and its limit) reads: the sequences ``[N, S, D]``
    themselves; for ``ntk-transformer`` with the one-hot position block appended to every token
    (``[N, S, D + S]``, :func:`telescope.infinite.families.with_positions`, scale
    ``positions``: its attention and mean readout are otherwise blind to token order)."""
    if kind == "ntk-transformer":
        return families.with_positions(x, config.positions)
    return x


def _ntk_transformer(config: NTKDoubleDescentConfig, width: int):
    return families.transformer(width, n_layers=config.n_layers, n_heads=config.n_heads,
                                mlp_ratio=config.mlp_ratio)


def build_model(config: NTKDoubleDescentConfig, kind: str, width: int, shape: tuple[int, ...]
                ) -> torch.nn.Module:
    """The transformer (encoder, mean readout, one output), the NTK-parametrized transformer of
    :func:`telescope.infinite.families.transformer` or the one-hidden-layer ReLU MLP on the
    flattened sequence, for inputs of per-example ``shape`` (:func:`model_inputs`). PyTorch's
    default initialization for the first and the last; ``N(0, 1)`` weights with NTK scaling
    for the second (all drawn from the global seed)."""
    seq_len, dim = shape
    if kind == "transformer":
        return TinyTransformer(d_model=width, n_heads=config.n_heads, n_layers=config.n_layers,
                               seq_len=seq_len, out_features=1, mlp_ratio=config.mlp_ratio,
                               causal=False, readout="mean", input_dim=dim)
    if kind == "ntk-transformer":
        return _ntk_transformer(config, width).module((seq_len, dim))
    return torch.nn.Sequential(torch.nn.Flatten(),
                               MLP(seq_len * dim, [width], 1, activation="relu"))


def limit_architecture(config: NTKDoubleDescentConfig, kind: str):
    """The :mod:`telescope.infinite` description whose kernel is the row's infinite-width limit,
    and whether its inputs are flattened: ``(arch, flatten)``; ``(None, False)`` for the
    standard transformer, which has none in closed form. ``ntk-transformer``: its own family
    (the kernel does not depend on the width); ``mlp``: the one-hidden-layer ReLU network in NTK
    parametrization (``W_std = 1``, no bias) on the flattened sequence, the limit of Jacot et
    al. (2018)."""
    if kind == "ntk-transformer":
        return _ntk_transformer(config, config.n_heads), False
    if kind == "mlp":
        return families.mlp([1], activation="relu"), True
    return None, False


def _warmup(config: NTKDoubleDescentConfig):
    warmup = config.warmup
    return lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0


def flow_time(config: NTKDoubleDescentConfig, kind: str) -> float | None:
    """The kernel-regression time of the row's training where it is plain gradient descent:
    ``t = 2 sum_s lr_s`` over the steps, with the warmup's learning rates (``fit``'s loss is the
    plain mean of squared errors, twice the ``0.5 * mean`` of
    :mod:`telescope.kernels.regression`); ``None`` (converged) for Adam or momentum, whose
    infinite-width dynamics is not kernel gradient flow."""
    if kind != "ntk-transformer" or config.ntk_optimizer != "gd":
        return None
    schedule = _warmup(config)
    return 2.0 * config.ntk_lr * sum(schedule(s) for s in range(config.steps))


def _optimizer(config: NTKDoubleDescentConfig, kind: str, model: torch.nn.Module
               ) -> torch.optim.Optimizer:
    if kind == "ntk-transformer":
        if config.ntk_optimizer == "adam":
            return torch.optim.Adam(model.parameters(), lr=config.ntk_lr)
        return torch.optim.SGD(model.parameters(), lr=config.ntk_lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


_LIMIT_KERNELS: dict[tuple, tuple[torch.Tensor, torch.Tensor, dict]] = {}


def _limit_kernels(config: NTKDoubleDescentConfig, kind: str, x: torch.Tensor,
                   x_test: torch.Tensor) -> dict | None:
    """The row's infinite-width kernels on its inputs ``x``, ``x_test`` (:func:`model_inputs`;
    :func:`.predictions.limit_kernels`), computed once per worker process for each model row
    and data set: they depend on neither the width nor the seed's label noise. ``None`` for a
    row without a limit."""
    arch, flatten = limit_architecture(config, kind)
    if arch is None:
        return None
    d = config.data
    key = (kind, config.n_layers, config.mlp_ratio, config.positions, d.kind, tuple(d.classes),
           d.n_train, d.n_test, d.patch, d.seed, config.dtype)
    cached = _LIMIT_KERNELS.get(key)
    cpu, cpu_test = x.detach().cpu(), x_test.detach().cpu()
    if (cached is not None and torch.equal(cached[0], cpu)   # the same inputs, to be safe
            and torch.equal(cached[1], cpu_test)):
        return cached[2]
    a, b = (x.flatten(1), x_test.flatten(1)) if flatten else (x, x_test)
    kernels = limit_kernels(arch, a, b)
    if len(_LIMIT_KERNELS) >= 4:
        _LIMIT_KERNELS.pop(next(iter(_LIMIT_KERNELS)))
    _LIMIT_KERNELS[key] = (cpu.clone(), cpu_test.clone(), kernels)
    return kernels


# --------------------------------------------------------------------------- one point


def _widths(config: NTKDoubleDescentConfig, kind: str) -> tuple[int, ...]:
    return {"transformer": config.widths, "ntk-transformer": config.ntk_widths,
            "mlp": config.mlp_widths}[kind]


def points(config: NTKDoubleDescentConfig) -> list[dict]:
    """Every width of each model row, for every seed (``ntk-transformer``: the first
    ``ntk_seeds``, its points being the costliest); then, for the rows with an
    infinite-width limit, one sample-wise point (``view="samples"``) per seed (unless
    ``sample_sizes`` is empty)."""
    seeds = range(config.seed, config.seed + config.seeds)
    out = []
    for kind in config.models:
        row_seeds = seeds[:config.ntk_seeds] if kind == "ntk-transformer" else seeds
        out += [{"model": kind, "width": int(w), "seed": int(s)}
                for w in _widths(config, kind) for s in row_seeds]
    for kind in config.models:
        if kind in LIMITS and config.sample_sizes:
            out += [{"model": kind, "view": "samples", "seed": int(s)} for s in seeds]
    return out


#: What is measured at every measurement step (the network; the telescoping model, if tracked).
_MEASURED = ("train_mse", "test_mse", "train_error", "test_error", "train_error_clean",
             "telescoping_test_mse", "telescoping_network_test_mse", "telescoping_gap")
#: The infinite-width columns of a width-sweep point (NaN for a row without a limit).
LIMIT_COLUMNS = ("infinite_ntk_test_mse", "infinite_ntk_test_error", "infinite_nngp_test_mse",
                 "infinite_nngp_test_error", "infinite_ntk_draw_test_mse", "infinite_gap",
                 "infinite_gap_floor", "infinite_init_gap", "infinite_time",
                 "infinite_ntk_t_test_mse", "infinite_ntk_t_draw_test_mse",
                 "infinite_ntk_rank", "infinite_ridge")


def _diverged(history, what: str, knob: str) -> None:
    if history.diverged_at is not None:
        raise DivergedError(
            f"{what}: the training loss is {history.diverged_loss} at step "
            f"{history.diverged_at}; lower the learning rate (--set {knob}=...) or add warmup")


def run_point(config: NTKDoubleDescentConfig, point: dict, progress: Progress) -> list[dict]:
    """One width of one model row at one seed: the lazy prediction at initialization, then
    training (:func:`telescope.train.fit`: full batch, squared loss, linear warmup) with the
    telescoping lens (and the smoother) attached, then the after-kernel prediction and, for a
    row with an infinite-width limit, the limit's predictions and the network's distances to
    them (:data:`LIMIT_COLUMNS`). One row per measurement step; the kernel columns are filled in
    the last row (NaN before). A point with ``view="samples"`` is the sample-wise view
    (:func:`run_samples`)."""
    if point.get("view") == "samples":
        return run_samples(config, point, progress)
    kind, width, seed = str(point["model"]), int(point["width"]), int(point["seed"])
    device, dtype = _device(config.device), getattr(torch, config.dtype)
    ds = load_task(config, seed)
    x, y = model_inputs(config, kind, ds.x_train).to(device), ds.y_train.to(device)
    x_test, y_test = model_inputs(config, kind, ds.x_test).to(device), ds.y_test.to(device)
    y_clean = ds.meta.get("y_train_clean", ds.y_train).to(device)
    n = x.shape[0]
    limit = _limit_kernels(config, kind, x, x_test)   # cached: once per worker and data set

    torch.manual_seed(seed)
    model = build_model(config, kind, width, tuple(x.shape[1:])).to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    with torch.no_grad():
        f0, f0_test = model(x), model(x_test)
    lazy = kernel_prediction(model, x, y, x_test, f0, f0_test, config.ridge)

    opt = _optimizer(config, kind, model)
    probe = x_test[:config.telescoping]
    lens = (Telescope(model, opt, {"test": probe}, every=config.steps, track_linearized=False)
            if config.telescoping > 0 else None)
    # Adam/AdamW use the Smoother's weight-space path: O(P n) memory, O(P (n + m) n) per step
    smoother = (Smoother(model, opt, x, y, probes={"test": x_test}, every=config.steps)
                if config.smoother and n_params <= config.smoother_max_params else None)
    network: dict[str, torch.Tensor] = {}   # the network's test outputs at the last measurement

    def evaluate(model: torch.nn.Module) -> dict:
        f, f_test = model(x), model(x_test)
        network["test"] = f_test
        row = {"train_mse": mse(f, y), "test_mse": mse(f_test, y_test),
               "train_error": sign_error(f, y), "test_error": sign_error(f_test, y_test),
               "train_error_clean": sign_error(f, y_clean)}
        if lens is not None:
            tel, m = lens.telescoping("test"), probe.shape[0]
            row.update(telescoping_test_mse=mse(tel, y_test[:m]),
                       telescoping_network_test_mse=mse(f_test[:m], y_test[:m]),
                       telescoping_gap=relative_distance(tel, f_test[:m]))
        return row

    progress.set(config.steps)
    try:
        history = fit(model, opt, x, y, steps=config.steps, loss="mse",
                      schedule=_warmup(config),
                      eval_at=evenly_spaced_steps(config.steps, config.evals),
                      evaluate=evaluate, callbacks=[c for c in (smoother, lens) if c is not None],
                      on_nonfinite="stop", progress=progress)
    finally:
        for callback in (lens, smoother):
            if callback is not None:
                callback.close()
    _diverged(history, f"{kind} width {width} seed {seed}",
              "ntk_lr" if kind == "ntk-transformer" else "lr")

    setup = {"n_train": n, "n_test": int(x_test.shape[0]), "n_params": n_params,
             "params_per_example": n_params / n}
    rows = [{"step": r["step"], **{k: r[k] for k in _MEASURED if k in r}, **setup}
            for r in history.rows]
    after = kernel_prediction(model, x, y, x_test, f0, f0_test, config.ridge)
    f_test = network["test"]
    final = rows[-1]
    final.update(
        lazy_test_mse=mse(lazy["test"], y_test), lazy_test_error=sign_error(lazy["test"], y_test),
        lazy_train_mse=mse(lazy["train"], y), lazy_gap=relative_distance(lazy["test"], f_test),
        lazy_p_train=lazy["p_train"], lazy_p_test=lazy["p_test"],
        after_test_mse=mse(after["test"], y_test),
        after_test_error=sign_error(after["test"], y_test),
        after_train_mse=mse(after["train"], y), after_gap=relative_distance(after["test"], f_test),
        after_p_train=after["p_train"], after_p_test=after["p_test"],
        kernel_distance=kernel_distance(after["k"], lazy["k"]),
        ntk_rank_init=int(torch.linalg.matrix_rank(lazy["k"])),
        seconds=time.perf_counter() - start,
    )
    if config.smoother:   # NaN where the model is too large to track
        final.update(
            network_p_train=(smoother.effective_parameters("train") if smoother is not None
                             else float("nan")),
            network_p_test=(smoother.effective_parameters("test") if smoother is not None
                            else float("nan")))
    final.update(dict.fromkeys(LIMIT_COLUMNS, float("nan")))
    if limit is not None:
        ens = limit_ensemble(limit, y, config.ridge)
        final.update(limit_columns(ens, y_test))
        final.update(limit_setup(limit, n, config.ridge))
        t = flow_time(config, kind)
        final.update(limit_gaps(limit, ens, y, f_test, f0, f0_test, config.ridge, t))
        final.update(_at_time(limit, y, y_test, config.ridge, t))
    return rows


def _at_time(limit: dict, y: torch.Tensor, y_test: torch.Tensor, ridge: float,
             t: float | None) -> dict[str, float]:
    """For a row trained by gradient descent (kernel-regression time ``t``): the limit's NTK
    ensemble at that time, the test MSE of its mean and one infinitely wide network's expected
    test MSE (``infinite_ntk_t_*``); NaN otherwise."""
    if t is None:
        return {"infinite_ntk_t_test_mse": float("nan"),
                "infinite_ntk_t_draw_test_mse": float("nan")}
    cols = limit_columns(limit_ensemble(limit, y, ridge, t), y_test)
    return {"infinite_ntk_t_test_mse": cols["infinite_ntk_test_mse"],
            "infinite_ntk_t_draw_test_mse": cols["infinite_ntk_draw_test_mse"]}


def run_samples(config: NTKDoubleDescentConfig, point: dict, progress: Progress) -> list[dict]:
    """The sample-wise view of one model row (with an infinite-width limit) at one seed.

    For every ``n`` of ``sample_sizes``, the first ``n`` training points: the limit's converged
    predictions (:func:`.predictions.limit_columns`; one row, no ``width``). On the first
    ``sample_network_seeds`` seeds, for every ``n`` of ``sample_trained`` and width of
    ``sample_widths``, also a network trained on those ``n`` points
    exactly as in the width sweep (same seed, optimizer, schedule and steps; no kernels or
    lenses), its train and test error and its distances to the limit's predictions from the
    same points (:func:`.predictions.limit_gaps`; one row with ``width``)."""
    kind, seed = str(point["model"]), int(point["seed"])
    device, dtype = _device(config.device), getattr(torch, config.dtype)
    ds = load_task(config, seed)
    x, y = model_inputs(config, kind, ds.x_train).to(device), ds.y_train.to(device)
    x_test, y_test = model_inputs(config, kind, ds.x_test).to(device), ds.y_test.to(device)
    limit = _limit_kernels(config, kind, x, x_test)
    if limit is None:
        raise UsageError(f"the sample-wise view needs a row with an infinite-width limit "
                         f"({', '.join(LIMITS)}), not {kind!r}")
    ensembles = {}
    rows = []
    for size in sorted(set(config.sample_sizes) | set(config.sample_trained)):
        start = time.perf_counter()
        ensembles[size] = limit_ensemble(limit, y[:size], config.ridge)
        if size in config.sample_sizes:
            rows.append({"sample_size": size, **limit_columns(ensembles[size], y_test),
                         **limit_setup(limit, size, config.ridge),
                         "seconds": time.perf_counter() - start})
    networks = seed < config.seed + config.sample_network_seeds
    trained = [(size, w) for size in sorted(config.sample_trained)
               for w in sorted(config.sample_widths)] if networks else []
    progress.set(len(trained) * config.steps)
    for size, width in trained:
        xs, ys = x[:size], y[:size]
        start = time.perf_counter()
        torch.manual_seed(seed)
        model = build_model(config, kind, width, tuple(x.shape[1:])).to(device=device,
                                                                        dtype=dtype)
        with torch.no_grad():
            f0, f0_test = model(xs), model(x_test)
        out: dict[str, torch.Tensor] = {}

        def evaluate(model: torch.nn.Module, xs=xs, ys=ys, out=out) -> dict:
            f, out["test"] = model(xs), model(x_test)
            return {"train_mse": mse(f, ys), "test_mse": mse(out["test"], y_test),
                    "train_error": sign_error(f, ys),
                    "test_error": sign_error(out["test"], y_test)}

        history = fit(model, _optimizer(config, kind, model), xs, ys, steps=config.steps,
                      loss="mse", schedule=_warmup(config), eval_at=[config.steps],
                      evaluate=evaluate, on_nonfinite="stop", progress=progress)
        _diverged(history, f"{kind} width {width} seed {seed} on {size} points",
                  "ntk_lr" if kind == "ntk-transformer" else "lr")
        n_params = sum(p.numel() for p in model.parameters())
        last = history.rows[-1]
        rows.append({"sample_size": size, "width": width, "step": last["step"],
                     "n_params": n_params, "params_per_example": n_params / size,
                     **{k: last[k] for k in ("train_mse", "test_mse", "train_error",
                                             "test_error")},
                     **limit_gaps(limit, ensembles[size], ys, out["test"], f0, f0_test,
                                  config.ridge, flow_time(config, kind)),
                     **_at_time(limit, ys, y_test, config.ridge, flow_time(config, kind)),
                     "seconds": time.perf_counter() - start})
    return rows


# --------------------------------------------------------------------------- headline and figures


def headline(df: pd.DataFrame, config: NTKDoubleDescentConfig) -> dict:
    """For each model row: the robust verdict with the share of seed resamples behind each
    answer and the verdicts on two disjoint halves of the seeds; the network's peak (with the
    widths within noise of it) and the predictions' peaks, rank correlations and distances, each
    with its 95 % bootstrap interval over seeds; the width from which the lazy prediction holds;
    for the rows with an infinite-width limit, what the limit predicts, the networks' distances
    to it by width, the sample-wise view and whether the network's peak width has a counterpart
    in the limit (:func:`.limit.limit_headline`); and the answer in words."""
    final = final_rows(df)
    if final.empty:
        return {}
    boots = {kind: SeedBootstrap(final, kind) for kind in MODELS}
    out: dict = {"answer": answer(final, boots, df)}
    for kind in MODELS:
        boot = boots[kind]
        stats = boot.compare()
        if not stats:
            continue
        sweep = boot.sweep
        d = boot.verdict_details()
        out[f"{kind}: can NTK theory (at init) predict its double descent?"] = d["verdict"]
        if d["shares"]:
            out[f"{kind}: verdicts of the seed resamples"] = ", ".join(
                f"{k} {fmt_share(s)}" for k, s in d["shares"].items())
        halves = half_verdicts(final, kind)
        if halves is not None:
            out[f"{kind}: verdict on each half of the seeds"] = " / ".join(
                f"{h['category']} (seeds {fmt_widths(h['seeds'], h['seeds'])})" for h in halves)
        for pred, st in stats.items():
            label = f"{kind}: {PREDICTIONS[pred]}"
            out[f"{label}: peak width"] = fmt_peak(st, sweep)
            out[f"{label}: peak test MSE"] = fmt_stat(st, "peak")
            out[f"{label}: test MSE at width {st['largest_width']}"] = fmt_stat(st, "at_largest")
            if pred != "network":
                out[f"{label}: rank correlation with the network"] = fmt_corr(st, "rho")
                out[f"{label}: rank correlation past the network's peak"] = fmt_corr(
                    st, "rho_past_peak")
                out[f"{label}: median relative distance to the network"] = fmt_stat(st, "gap")
        valid = lazy_valid_from(final, kind)
        out[f"{kind}: lazy prediction within 25 % from width"] = (
            "never" if valid is None else valid)
        kd = boot.curve_intervals("kernel_distance")
        if len(kd):
            out[f"{kind}: kernel distance K_T vs K_0 at width {int(kd.index[-1])}"] = (
                fmt_estimate(*curve_row(kd, -1)))
    out.update(limit_headline(final, df, boots))
    out["n_train"] = int(final["n_train"].iloc[0])
    out["label noise"] = float(config.label_noise)
    out["seeds"] = int(final["seed"].nunique())
    out["intervals"] = (f"{fmt_share(LEVEL)} percentile bootstrap over seeds ({RESAMPLES} "
                        f"resamples, seed {RESAMPLE_SEED}); verdicts need "
                        f"{fmt_share(AGREEMENT)} agreement")
    return out


_LEVEL, _AGREE = fmt_share(LEVEL), fmt_share(AGREEMENT)
GUIDE = f"""
The question: can NTK theory predict double descent in transformers? Transformers of increasing
width (d_model, log x axis) and, for contrast, one-hidden-layer MLPs are trained with the squared
loss on MNIST-1D read as 10 patches (3 vs 5, +1/-1 targets, 20 % of the training targets flipped;
Adam with warmup, full batch; the NTK-parametrized transformer of the middle column by gradient
descent, see below); lines are means over seeds, bands min-max; the grey span in row a covers the
widths whose mean network error is within noise of its peak (see below).

- **Row a** sets four test errors side by side: the trained network (black); the NTK-theory
  prediction, converged kernel regression with the empirical NTK at initialization (grey dashed:
  what the network would do in the lazy regime); the same with the NTK of the trained network
  (the after-kernel, purple); and the telescoping model, which sums every step's own linearized
  update (red dotted; on the first 100 test points). Kernel regression without ridge blows up
  where the kernel's rank reaches n, so its peak is where the *initial kernel* interpolates;
  the axis stops at 20x the network's worst error (curves leaving the top are off scale).
- **Row b**: effective parameters p = n/|I| sum ||s(x)||^2 of the kernel smoothers (dashed: at
  init, dash-dot: after training; dotted line: n). For min-norm kernel interpolation p_train is
  the rank of the kernel, which reaches n at the kernel's interpolation threshold, where p_test
  peaks.
- **Row c**: how far the kernel moved (kernel distance 1 - cos(K_T, K_0)), how far the lazy
  prediction and the telescoping model are from the trained network (relative distance of test
  predictions). A shrinking kernel distance with width is the lazy regime setting in.

The headline leads with the verdict per model row -- **yes**: the NTK-at-init prediction peaks at
the network's peak width, ranks the widths past the peak alike (Spearman >= 0.8) and comes
within 25 % of the network from some width on; **partly**: it finds the peak's location (within
one sweep width) but not the rest; **no**: otherwise -- then the numbers behind it, and `answer`
says it in words. Every number carries its uncertainty over seeds: a bootstrap resamples the seeds
with replacement (the same draw at every width; {RESAMPLES} resamples, fixed seed) and recomputes
the mean curves; brackets are {_LEVEL} percentile intervals, and a width is "within noise" of
the peak when the {_LEVEL} interval of the difference of their mean errors reaches 0. A
verdict is given only when at least {_AGREE} of the resamples give the same verdict as
all seeds together and so does every pair of peak widths within noise (network x NTK at init);
otherwise it is **undetermined (within noise: ...)**, naming what the noise leaves open. The
verdicts on two disjoint halves of the seeds are shown beside it.

**The infinite-width limit.** The middle column (`ntk-transformer`) is a transformer whose limit
is known in closed form: `telescope.infinite.families.transformer` (pre-LN encoder, attention with
linear scaling (queries tied to keys, logits / (width d_k)), LayerNorm without learned
parameters, residual ReLU MLP blocks, mean readout, NTK parametrization, a fixed one-hot position
block appended to every token), trained by full-batch gradient descent -- the dynamics NTK
theory describes -- on the first `ntk_seeds` seeds. For it and for the MLP (the one-hidden-layer
ReLU network's limit on the flattened inputs) row a adds the limit's own test MSE as horizontal
bands over seeds (green: the infinite-width NTK, converged, ridgeless -- kernel regression with
the infinite-width NTK, i.e. the ensemble mean of infinitely wide networks trained to
convergence; dotted green: the same trained only as long as the network, for gradient descent;
brown: the NNGP, only the readout trained). They do not depend on the width: **the limit has
no width axis, hence no width-wise peak**. Row c adds how far the trained network's test outputs
are from NTK theory's prediction *for that network* (green: its own initial function plus the
infinite-NTK regression of its residual, at its own training time under gradient descent,
converged under Adam) and from the ensemble mean (cyan), with the floor one infinitely wide
network would itself be from that mean (dotted cyan: its random initial function stays in its
outputs). The standard transformer (left column: PyTorch's initialization in standard
parametrization, learned positions, 1/sqrt(d_k) softmax attention) has no closed-form limit --
its NTK does not converge to a fixed kernel as it widens -- so its infinite-width columns are
NaN.

**Sample-wise** (`ntk_double_descent_samples.png`): test MSE and sign error against the number n
of training points (the first n of the training set) of the limit's ridgeless NTK and NNGP
predictors (lines, 95 % bootstrap bands over seeds) beside networks trained on the same points
at a few widths (markers; dotted vertical lines where a width's parameter count equals n). The
headline's "largest rise" is the pair n1 < n2 where the limit's mean test MSE rises most; as
that pair is picked from many, it counts as a sample-wise peak only if the rise picked on either
half of the seeds recurs on the other half (its 95 % interval there above 0) and it is at least
{PEAK_RATIO}x. The network's width-wise peak sits where its parameter count is of order n (its
initial NTK reaching rank n); the headline's "counterpart" line says whether the limit has a
resolved sample-wise peak at the sweep's n.

Widths 1 and 2 are left out of the transformer sweeps: LayerNorm over one or two features leaves
every token one or two possible values (0, or +-(1, -1)).
`ntk_double_descent_steps.png` shows the network's peak forming during training.
"""

STUDY = Study(
    name="ntk-double-descent",
    description="can NTK theory predict double descent in transformers? width sweep with label "
                "noise: trained net vs NTK-at-init, after-kernel and telescoping predictions",
    config_cls=NTKDoubleDescentConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
)
