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
headline and the guide. Beside it: :mod:`.figures`, :mod:`.predictions` (the kernel predictions
and error measures of a point),
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
    MODELS,
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
from telescope.studies.ntk_double_descent.predictions import (
    kernel_prediction,
    mse,
    relative_distance,
)
from telescope.studies.ntk_double_descent.words import answer
from telescope.train import evenly_spaced_steps, fit

__all__ = ["BinarySequenceData", "NTKDoubleDescentConfig", "PRESETS", "load_task",
           "build_model", "points", "run_point", "figures", "headline", "GUIDE", "STUDY"]


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
    models: tuple[str, ...] = MODELS          # rows of the study: transformer and/or mlp
    widths: tuple[int, ...] = (3, 4, 6, 8, 12, 16, 32, 64)   # transformer d_model (>= 3)
    mlp_widths: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 256)   # hidden neurons
    n_layers: PositiveInt = 1
    n_heads: PositiveInt = 1
    mlp_ratio: PositiveInt = 4
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: PositiveFloat = 3e-3
    momentum: Annotated[float, Ge(0), Lt(1)] = 0.9   # sgd only
    warmup: NonNegativeInt = 200              # linear learning-rate warmup steps
    steps: PositiveInt = 2000
    evals: PositiveInt = 4                    # measurements at evenly spaced steps
    ridge: NonNegativeFloat = 0.0             # of the kernel regressions (0: pseudo-inverse)
    telescoping: NonNegativeInt = 100         # test points the telescoping model tracks (0: off)
    smoother: bool = False                    # the network's own effective parameters (costly)
    smoother_max_params: int = 200_000        # ... only for models with at most this many
    dtype: Literal["float32", "float64"] = "float32"   # training; kernels are float64
    device: str = "cpu"
    seeds: int = 8    # with 4 the verdict flipped between machines (see the README's check)
    seed: int = 0

    def __post_init__(self) -> None:
        check_device("device", self.device)
        unknown = [m for m in self.models if m not in MODELS]
        if not self.models or unknown:
            raise UsageError(f"models must be a non-empty subset of {MODELS}, got {self.models}")
        for name, kind in (("widths", "transformer"), ("mlp_widths", "mlp")):
            values = getattr(self, name)     # only the widths of the models that run
            if kind in self.models and (not values or min(values) < 1):
                raise UsageError(f"{name} must be positive integers, got {values}")
        bad = [w for w in self.widths if w % self.n_heads]
        if "transformer" in self.models and bad:
            raise UsageError(f"every transformer width must be divisible by n_heads="
                             f"{self.n_heads}; not {bad}")


PRESETS = {
    "quick": {},
    "full": {
        "data.n_train": 1000, "data.n_test": 2000, "label_noise": 0.2,
        "widths": (4, 6, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128, 256),
        "mlp_widths": (1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64, 128, 256, 1024),
        "n_layers": 2, "n_heads": 2, "steps": 10000, "evals": 10, "seeds": 5,
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


def build_model(config: NTKDoubleDescentConfig, kind: str, width: int, shape: tuple[int, ...]
                ) -> torch.nn.Module:
    """The transformer (encoder, mean readout, one output) or the one-hidden-layer ReLU MLP on
    the flattened sequence; PyTorch's default initialization (drawn from the global seed)."""
    seq_len, dim = shape
    if kind == "transformer":
        return TinyTransformer(d_model=width, n_heads=config.n_heads, n_layers=config.n_layers,
                               seq_len=seq_len, out_features=1, mlp_ratio=config.mlp_ratio,
                               causal=False, readout="mean", input_dim=dim)
    return torch.nn.Sequential(torch.nn.Flatten(),
                               MLP(seq_len * dim, [width], 1, activation="relu"))


# --------------------------------------------------------------------------- one point


def points(config: NTKDoubleDescentConfig) -> list[dict]:
    """Every width of each model row, for every seed."""
    seeds = range(config.seed, config.seed + config.seeds)
    out = []
    for kind in config.models:
        widths = config.widths if kind == "transformer" else config.mlp_widths
        out += [{"model": kind, "width": int(w), "seed": int(s)} for w in widths for s in seeds]
    return out


#: What is measured at every measurement step (the network; the telescoping model, if tracked).
_MEASURED = ("train_mse", "test_mse", "train_error", "test_error", "train_error_clean",
             "telescoping_test_mse", "telescoping_network_test_mse", "telescoping_gap")


def run_point(config: NTKDoubleDescentConfig, point: dict, progress: Progress) -> list[dict]:
    """One width of one model row at one seed: the lazy prediction at initialization, then
    training (:func:`telescope.train.fit`: full batch, squared loss, linear warmup) with the
    telescoping lens (and the smoother) attached, then the after-kernel prediction. One row per
    measurement step; the kernel columns are filled in the last row (NaN before)."""
    kind, width, seed = str(point["model"]), int(point["width"]), int(point["seed"])
    device, dtype = _device(config.device), getattr(torch, config.dtype)
    ds = load_task(config, seed)
    x, y = ds.x_train.to(device), ds.y_train.to(device)
    x_test, y_test = ds.x_test.to(device), ds.y_test.to(device)
    y_clean = ds.meta.get("y_train_clean", ds.y_train).to(device)
    n = x.shape[0]

    torch.manual_seed(seed)
    model = build_model(config, kind, width, tuple(x.shape[1:])).to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    with torch.no_grad():
        f0, f0_test = model(x), model(x_test)
    lazy = kernel_prediction(model, x, y, x_test, f0, f0_test, config.ridge)

    if config.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
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

    warmup = config.warmup
    progress.set(config.steps)
    try:
        history = fit(model, opt, x, y, steps=config.steps, loss="mse",
                      schedule=lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0,
                      eval_at=evenly_spaced_steps(config.steps, config.evals),
                      evaluate=evaluate, callbacks=[c for c in (smoother, lens) if c is not None],
                      on_nonfinite="stop", progress=progress)
    finally:
        for callback in (lens, smoother):
            if callback is not None:
                callback.close()
    if history.diverged_at is not None:
        raise DivergedError(
            f"{kind} width {width} seed {seed}: the training loss is {history.diverged_loss} at "
            f"step {history.diverged_at}; lower the learning rate (--set lr=...) or add warmup")

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
    return rows


# --------------------------------------------------------------------------- headline and figures


def headline(df: pd.DataFrame, config: NTKDoubleDescentConfig) -> dict:
    """For each model row: the robust verdict with the share of seed resamples behind each
    answer and the verdicts on two disjoint halves of the seeds; the network's peak (with the
    widths within noise of it) and the predictions' peaks, rank correlations and distances, each
    with its 95 % bootstrap interval over seeds; the width from which the lazy prediction holds;
    and the answer in words."""
    final = final_rows(df)
    if final.empty:
        return {}
    boots = {kind: SeedBootstrap(final, kind) for kind in MODELS}
    out: dict = {"answer": answer(final, boots)}
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
Adam with warmup, full batch); lines are means over seeds, bands min-max; the grey span in row a
covers the widths whose mean network error is within noise of its peak (see below).

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

Widths 1 and 2 are left out of the transformer sweep: LayerNorm over one or two features leaves
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
