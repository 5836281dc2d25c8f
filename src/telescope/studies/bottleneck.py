"""``bottleneck``: wide networks with one narrow bottleneck against the infinite-width NTK.

Littwin, Saremi, Zhai, Thilak, Goh, Susskind & Yang (2021), "Implicit Acceleration and Feature
Learning in Infinitely Wide Neural Networks with Bottlenecks" (arXiv:2107.00364). The claims, as
the abstract states them and as this study tests them:

- **C1, feature learning**: unlike the NTK limit, a finite bottleneck in an otherwise infinitely
  wide network learns data-dependent features: the network's NTK moves during training (kernel
  distance between the NTK at initialization and at the end, :class:`telescope.lens.
  KernelEvolution`), and it moves less as the bottleneck widens (``k -> infinity`` is the NTK
  limit, a fixed kernel).
- **C2, implicit acceleration**: a bottleneck "dramatically accelerates training" compared with
  the purely infinite network (kernel gradient descent with the infinite-width NTK).
- **C3, performance**: with "improved overall performance" (test error at the same training
  time).
- **C4, deep linear theory**: in infinitely wide deep *linear* networks the acceleration of a
  bottleneck is understood in closed form (:mod:`telescope.models.bottleneck`: the ODE of the
  end-to-end factors and the solved scalar model).

The sweep has three parts (the ``part`` key of a point).

``mlp`` (C1-C3). A binary task: the bundled digits (or MNIST-1D), label ``+s`` for the digits
5-9 and ``-s`` for 0-4, ``s = target_scale``. A :class:`telescope.models.BottleneckMLP` in NTK
parametrization, ``in -> width -> k -> width -> 1`` (ReLU; ``k = bottleneck``, ``0``: no
bottleneck, ``k = width``), is trained by full-batch gradient descent (:func:`telescope.train.fit`)
on ``(1/2N) sum_i (F(x_i) - y_i)^2``, the convention of :func:`telescope.kernel_regression`, so
that ``t = lr * step`` is its time. Its companion (``kind = "ntk"``) is kernel gradient flow with
the infinite-width NTK of the same architecture without a bottleneck (``telescope.infinite``)
from the *same* initial function ``f_0`` (``kernel_regression(..., f0_train=f_0(X))``): what this
network would do were every layer infinitely wide. Rows hold the train and test loss, the test
classification error, the kernel distance and kernel-target alignment of the empirical NTK on
``n_probe`` training points (:class:`telescope.lens.KernelEvolution`) and ``gap = ||f_t - f^NTK_t||
/ ||y - f_0||`` on the training set; for ``k = 0`` that gap is the check that the comparison is
fair (the wide network must follow the infinite NTK).

``linear`` (C4). Gaussian inputs ``x ~ N(0, I_d)``, a linear teacher ``y = s w^T x`` (``||w|| =
1``), a deep linear :class:`~telescope.models.BottleneckMLP` (``activation="identity"``) of width
``linear.width`` with a bottleneck ``k`` trained by gradient descent at a small learning rate
(close to gradient flow); ``kind = "ode"`` is :func:`telescope.models.deep_linear_bottleneck_flow`
started from the network's own end-to-end factors (the infinite-width prediction: ``gap`` of the
network rows is the distance to it) and ``kind = "ntk"`` the kernel flow with the fixed infinite
kernel ``(L1 + L2) x^T x' / d``.

``scalar`` (C4, the simplified model). ``d = k = 1``, whitened inputs ``x = +-1``, ``y = s x``: the
width-``linear.width`` deep linear network against the closed form
:func:`telescope.models.scalar_bottleneck_trajectory` (``kind = "closed_form"``) and the kernel
flow; the closed form's ratio of the final to the initial rate ``R(s)/R(u_0)`` is the predicted
acceleration (column ``closed_form_speedup``).

The headline's *speedup* of a curve is ``t_ntk / t_curve``, the times at which the curve and its
NTK companion first reach ``loss_threshold`` times their common initial loss (interpolated in
log-log between measured steps; NaN if not reached): above 1 the bottleneck trains faster.

The target scale is the knob that decides C2: it sets how large the learned function is
compared with the network's function at initialization (whose scale the NTK parametrization fixes
at about 1). In the scalar model the rate of learning moves from about ``L1 + L2`` (the NTK's) at
initialization to ``R(s) >= 2 sqrt(L1 L2) s`` at the end, so a bottleneck accelerates large
targets and can slow small ones down; with ``k < d`` the deep linear bottleneck also starts with
its kernel concentrated on ``k`` directions and can sit on a saddle (a plateau) before it escapes.

The ``quick`` preset (digits, 128 training points, width 512, ``k`` in 1, 4, 16 and none, target
scales 1 and 4, two seeds; deep linear width 1024, ``d = 16``, ``k`` in 1, 4, 16) runs in about a
minute on one CPU thread; ``full`` (MNIST-1D, 1000 points, width 2048, eight bottlenecks, five
scales, five seeds, deep linear width 4096 at a smaller learning rate) is meant for a GPU.
"""

from __future__ import annotations

import math
from dataclasses import field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from telescope import infinite as inf
from telescope import plotting as fg
from telescope.data import load_digits, load_mnist1d
from telescope.errors import UsageError
from telescope.kernels import kernel_distance, kernel_regression
from telescope.lens import KernelEvolution
from telescope.models import (
    BottleneckMLP,
    deep_linear_bottleneck_flow,
    scalar_bottleneck_trajectory,
)
from telescope.studies.base import Progress, Study, check_device, check_range, resolve_device
from telescope.studies.constraints import (
    NonEmpty,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
)
from telescope.train import fit, log_spaced_steps

__all__ = ["BinaryData", "LinearPart", "BottleneckConfig", "half_mse", "infinite_architecture",
           "points", "run_point", "figures", "headline", "STUDY"]


# --------------------------------------------------------------------------- config


@config_dataclass
class BinaryData:
    """The binary task of the ``mlp`` part: ``+target_scale`` for the digits 5-9, ``-`` for 0-4
    (:func:`telescope.data.load_digits` or :func:`telescope.data.load_mnist1d`, standardized;
    the seed also draws the split)."""

    name: Literal["digits", "mnist1d"] = "digits"
    n_train: PositiveInt = 128
    n_test: PositiveInt = 400


@config_dataclass
class LinearPart:
    """The deep linear parts (``linear`` and ``scalar``): ``x ~ N(0, I_d)``, ``y = s w^T x``."""

    d: PositiveInt = 16
    n_train: PositiveInt = 64
    width: PositiveInt = 1024
    bottlenecks: NonEmpty[PositiveInt] = (1, 4, 16)
    lr: PositiveFloat = 0.03                 # small: gradient descent close to gradient flow
    steps: PositiveInt = 2000
    scalar: bool = True                      # also run the solved scalar model
    scalar_lr: PositiveFloat = 0.005         # its rate grows to ~2 sqrt(L1 L2) x target scale
    scalar_steps: PositiveInt = 1000


@config_dataclass
class BottleneckConfig:
    """Config of the ``bottleneck`` study; e.g. ``--set bottlenecks=1,2,4 target_scales=4``."""

    data: BinaryData = field(default_factory=BinaryData)
    linear: LinearPart = field(default_factory=LinearPart)
    width: PositiveInt = 512                 # every wide hidden layer of the mlp part
    bottlenecks: NonEmpty[NonNegativeInt] = (1, 4, 16, 0)   # 0: no bottleneck (k = width)
    depth_before: NonNegativeInt = 0         # extra wide hidden layers below the bottleneck
    depth_after: NonNegativeInt = 0          # ... and above it
    activation: Literal["relu", "erf", "tanh"] = "relu"
    target_scales: NonEmpty[PositiveFloat] = (1.0, 4.0)
    lr: PositiveFloat = 0.5
    steps: PositiveInt = 800
    evals: PositiveInt = 14                  # log-spaced measurement steps (plus step 0)
    n_probe: PositiveInt = 64                # training points the empirical NTK is taken on
    loss_threshold: PositiveFloat = 0.01     # speedup: time to reach this x the initial loss
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"                      # "cpu", "cuda", ... or "auto"
    seeds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("loss_threshold", self.loss_threshold, 0, 1, low_open=True, high_open=True)
        check_range("n_probe", self.n_probe, 1, self.data.n_train)
        check_device("device", self.device)
        if len(set(self.bottlenecks)) != len(self.bottlenecks):
            raise UsageError(f"bottlenecks must be distinct, got {self.bottlenecks}")
        if len(set(self.target_scales)) != len(self.target_scales):
            raise UsageError(f"target_scales must be distinct, got {self.target_scales}")
        if len(set(self.linear.bottlenecks)) != len(self.linear.bottlenecks):
            raise UsageError(f"linear.bottlenecks must be distinct, got "
                             f"{self.linear.bottlenecks}")
        big = [k for k in self.bottlenecks if k > self.width]
        if big:
            raise UsageError(f"bottlenecks {big} are wider than width = {self.width}; a "
                             "bottleneck is at most as wide as the other layers (0: none)")
        if self.data.name == "digits" and self.data.n_train + self.data.n_test > 1797:
            raise UsageError(f"data.n_train + data.n_test = "
                             f"{self.data.n_train + self.data.n_test} exceeds the 1797 bundled "
                             "digits; lower them or use data.name=mnist1d")


PRESETS = {
    "quick": {},
    "full": {"data.name": "mnist1d", "data.n_train": 1000, "data.n_test": 1000,
             "width": 2048, "bottlenecks": (1, 2, 4, 8, 16, 32, 64, 128, 0),
             "target_scales": (0.5, 1.0, 2.0, 4.0, 8.0), "steps": 5000, "lr": 0.5,
             "evals": 20, "n_probe": 128, "linear.width": 4096,
             "linear.bottlenecks": (1, 2, 4, 8, 16, 64), "linear.lr": 0.01,
             "linear.steps": 7500, "linear.scalar_lr": 0.002, "linear.scalar_steps": 2500,
             "seeds": 5, "device": "auto"},
}


def points(config: BottleneckConfig) -> list[dict]:
    """The sweep: every (part, bottleneck, target scale) for every seed."""
    seeds = range(config.seed, config.seed + config.seeds)
    out = []
    for s in seeds:
        for scale in config.target_scales:
            out += [{"part": "mlp", "bottleneck": int(k), "target_scale": float(scale),
                     "seed": s} for k in config.bottlenecks]
            out += [{"part": "linear", "bottleneck": int(k), "target_scale": float(scale),
                     "seed": s} for k in config.linear.bottlenecks]
            if config.linear.scalar:
                out.append({"part": "scalar", "bottleneck": 1, "target_scale": float(scale),
                            "seed": s})
    return out


# --------------------------------------------------------------------------- pieces


def half_mse(output: Tensor, target: Tensor) -> Tensor:
    """``(1/2N) sum_i ||output_i - target_i||^2``: the loss of :func:`telescope.kernel_regression`
    (half the squared error, summed over outputs, averaged over points)."""
    return 0.5 * ((output - target) ** 2).sum(-1).mean()


_INF_ACTIVATIONS = {"relu": inf.Relu, "erf": inf.Erf, "tanh": inf.Tanh, "identity": inf.Identity}


def infinite_architecture(model: BottleneckMLP) -> inf.Layer:
    """The ``telescope.infinite`` description of ``model`` with every hidden layer, the
    bottleneck included, infinitely wide: the ``k -> infinity`` limit, whose NTK is fixed
    (``.kernel(x)["ntk"]``; for a deep linear ``model`` it is ``(L1 + L2) x^T x' / d`` plus the
    bias terms). A finite bottleneck has no such description: its features move
    (:mod:`telescope.models.bottleneck`)."""
    act, w, ws, bs = (_INF_ACTIVATIONS[model.activation], model.width, model.weight_std,
                      model.bias_std)

    def side(hidden: int, out: int) -> list[inf.Layer]:
        layers: list[inf.Layer] = [inf.Dense(w, 1.0, bs), act()]
        for _ in range(hidden):
            layers += [inf.Dense(w, ws, bs), act()]
        return [*layers, inf.Dense(out, ws, bs)]

    return inf.serial(*side(model.depth_before, w), *side(model.depth_after, model.out_features))


def _dtype(config: BottleneckConfig) -> torch.dtype:
    return torch.float64 if config.dtype == "float64" else torch.float32


def _binary_task(config: BottleneckConfig, seed: int,
                 scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and test inputs (float64) and targets ``+-scale`` ``[N, 1]`` (the upper half of the
    classes ``+``)."""
    d = config.data
    load = load_digits if d.name == "digits" else load_mnist1d
    ds = load(d.n_train, d.n_test, seed=seed)
    half = (ds.n_classes or 10) // 2

    def target(labels: Tensor) -> Tensor:
        return (scale * (2.0 * (labels >= half).to(torch.float64) - 1.0))[:, None]

    return ds.x_train.double(), target(ds.y_train), ds.x_test.double(), target(ds.y_test)


def _linear_task(config: BottleneckConfig, seed: int, scale: float) -> tuple[Tensor, Tensor]:
    lin = config.linear
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(lin.n_train, lin.d, generator=gen, dtype=torch.float64)
    w = torch.randn(lin.d, generator=gen, dtype=torch.float64)
    return x, (scale * x @ (w / w.norm()))[:, None]


def _residual_gap(f: Tensor, ref: Tensor, scale: float) -> float:
    return float((f.double() - ref.double()).norm() / scale)


class _Tracker:
    """The per-step measurements of a network: losses, test error, and the gap to a reference
    trajectory ``ref[i]`` at ``eval_at[i]`` (``||f_t - ref_t|| / ||y - f_0||`` on the training
    set)."""

    def __init__(self, x: Tensor, y: Tensor, x_test: Tensor | None, y_test: Tensor | None,
                 eval_at: list[int], ref: Tensor, residual0: float) -> None:
        self.x, self.y, self.x_test, self.y_test = x, y, x_test, y_test
        self.index = {s: i for i, s in enumerate(eval_at)}
        self.ref, self.residual0 = ref, residual0

    def measure(self, state) -> dict:
        with torch.no_grad():
            f = state.model(self.x).double()
            row = {"train_loss": float(half_mse(f, self.y.double())),
                   "gap": _residual_gap(f, self.ref[self.index[state.step]], self.residual0)}
            if self.x_test is not None and self.y_test is not None:
                ft = state.model(self.x_test).double()
                row["test_loss"] = float(half_mse(ft, self.y_test.double()))
                row["test_error"] = float(((ft > 0) != (self.y_test > 0)).double().mean())
            else:
                row["test_loss"] = row["test_error"] = math.nan
        return row


def _row(point: dict, kind: str, step: int, t: float, **values: float) -> dict:
    base = {"train_loss": math.nan, "test_loss": math.nan, "test_error": math.nan,
            "kernel_distance": math.nan, "kernel_alignment": math.nan, "gap": math.nan,
            "closed_form_speedup": math.nan}
    return {**point, "kind": kind, "step": int(step), "t": float(t), **base, **values}


def _network_rows(point: dict, history, lr: float) -> list[dict]:
    out = []
    for r in history.rows:
        out.append(_row(point, "network", r["step"], lr * r["step"],
                        train_loss=r["train_loss"], test_loss=r["test_loss"],
                        test_error=r["test_error"], gap=r["gap"],
                        kernel_distance=r.get("kernel_distance", math.nan),
                        kernel_alignment=r.get("kernel_target_alignment", math.nan)))
    return out


# --------------------------------------------------------------------------- the parts


def _run_mlp(config: BottleneckConfig, point: dict, progress: Progress) -> list[dict]:
    seed, scale, k = point["seed"], point["target_scale"], point["bottleneck"]
    device, dtype = resolve_device(config.device), _dtype(config)
    x, y, xt, yt = _binary_task(config, seed, scale)
    torch.manual_seed(seed)
    model = BottleneckMLP(x.shape[1], config.width, k or None, 1,
                          depth_before=config.depth_before, depth_after=config.depth_after,
                          activation=config.activation)
    model = model.to(device=device, dtype=dtype)
    xd, yd, xtd, ytd = (v.to(device=device, dtype=dtype) for v in (x, y, xt, yt))
    with torch.no_grad():
        f0, f0t = model(xd).double().cpu(), model(xtd).double().cpu()
    eval_at = log_spaced_steps(config.steps, config.evals, zero=True)
    times = [config.lr * s for s in eval_at]
    arch = infinite_architecture(model)
    k_train = arch.kernel(x)["ntk"]
    k_test = arch.kernel(xt, x)["ntk"]
    ntk_test, ntk_train = kernel_regression(k_train, k_test, y, f0_train=f0, f0_test=f0t,
                                            t=times, return_train=True)
    residual0 = float((y - f0).norm())
    tracker = _Tracker(xd, yd, xtd, ytd, eval_at, ntk_train.to(device), residual0)
    lens = KernelEvolution(model, xd[:config.n_probe], yd[:config.n_probe])
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    history = fit(model, opt, xd, yd, steps=config.steps, loss=half_mse, batch_size=None,
                  eval_at=eval_at, callbacks=[lens, tracker], progress=progress)
    rows = _network_rows(point, history, config.lr)
    for i, (s, t) in enumerate(zip(eval_at, times, strict=True)):
        rows.append(_row(point, "ntk", s, t, train_loss=float(half_mse(ntk_train[i], y)),
                         test_loss=float(half_mse(ntk_test[i], yt)),
                         test_error=float(((ntk_test[i] > 0) != (yt > 0)).double().mean()),
                         kernel_distance=0.0, gap=0.0))
    return rows


def _linear_model(config: BottleneckConfig, d: int, k: int, seed: int) -> BottleneckMLP:
    torch.manual_seed(seed)
    return BottleneckMLP(d, config.linear.width, k, 1, activation="identity").to(_dtype(config))


def _linear_kernel_flow(model: BottleneckMLP, x: Tensor, y: Tensor, f0: Tensor,
                        times: list[float]) -> Tensor:
    """Train predictions ``[T, N, 1]`` of kernel flow with the infinite linear NTK
    ``(L1 + L2) x^T x' / d`` (:func:`infinite_architecture`) from ``f0``."""
    kernel = infinite_architecture(model).kernel(x)["ntk"]
    out = kernel_regression(kernel, kernel, y, f0_train=f0, f0_test=f0, t=times)
    assert isinstance(out, Tensor)
    return out


def _run_linear(config: BottleneckConfig, point: dict, progress: Progress) -> list[dict]:
    lin, seed, scale, k = config.linear, point["seed"], point["target_scale"], point["bottleneck"]
    x, y = _linear_task(config, seed, scale)
    model = _linear_model(config, lin.d, k, seed)
    xd, yd = x.to(_dtype(config)), y.to(_dtype(config))
    with torch.no_grad():
        f0 = model(xd).double()
    a0, b0 = model.linear_factors()
    eval_at = log_spaced_steps(lin.steps, config.evals, zero=True)
    times = [lin.lr * s for s in eval_at]
    flow = deep_linear_bottleneck_flow(x, y, a0, b0, times, lower_layers=model.lower_layers,
                                       upper_layers=model.upper_layers)
    ode_train = flow.predict(x)
    ode_ntk = flow.ntk(x, lower_layers=model.lower_layers, upper_layers=model.upper_layers)
    ntk_train = _linear_kernel_flow(model, x, y, f0, times)
    residual0 = float((y - f0).norm())
    tracker = _Tracker(xd, yd, None, None, eval_at, ode_train, residual0)
    lens = KernelEvolution(model, xd, yd)
    opt = torch.optim.SGD(model.parameters(), lr=lin.lr)
    history = fit(model, opt, xd, yd, steps=lin.steps, loss=half_mse, batch_size=None,
                  eval_at=eval_at, callbacks=[lens, tracker], progress=progress)
    rows = _network_rows(point, history, lin.lr)
    k0 = ode_ntk[0, :, :, 0, 0]
    for i, (s, t) in enumerate(zip(eval_at, times, strict=True)):
        kt = ode_ntk[i, :, :, 0, 0]
        rows.append(_row(point, "ode", s, t, train_loss=float(flow.loss[i]),
                         kernel_distance=kernel_distance(kt, k0), gap=0.0))
        rows.append(_row(point, "ntk", s, t, train_loss=float(half_mse(ntk_train[i], y)),
                         kernel_distance=0.0,
                         gap=_residual_gap(ntk_train[i], ode_train[i], residual0)))
    return rows


def _run_scalar(config: BottleneckConfig, point: dict, progress: Progress) -> list[dict]:
    lin, seed, scale = config.linear, point["seed"], point["target_scale"]
    x = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)      # whitened: mean x^2 = 1
    y = scale * x
    model = _linear_model(config, 1, 1, seed)
    xd, yd = x.to(_dtype(config)), y.to(_dtype(config))
    with torch.no_grad():
        f0 = model(xd).double()
    a, b = model.linear_factors()
    a0, b0 = float(a.double()), float(b.double())
    l1, l2 = model.lower_layers, model.upper_layers
    eval_at = log_spaced_steps(lin.scalar_steps, config.evals, zero=True)
    times = [lin.scalar_lr * s for s in eval_at]
    u = scalar_bottleneck_trajectory(times, a0=a0, b0=b0, target=scale, lower_layers=l1,
                                     upper_layers=l2)
    closed = u[:, None, None] * x                                 # [T, 2, 1]
    ntk_train = _linear_kernel_flow(model, x, y, f0, times)
    c = b0 * b0 / l2 - a0 * a0 / l1
    rate0, rate_end = l1 * b0 * b0 + l2 * a0 * a0, math.sqrt((l1 * l2 * c) ** 2
                                                             + 4 * l1 * l2 * scale * scale)
    residual0 = float((y - f0).norm())
    tracker = _Tracker(xd, yd, None, None, eval_at, closed, residual0)
    opt = torch.optim.SGD(model.parameters(), lr=lin.scalar_lr)
    history = fit(model, opt, xd, yd, steps=lin.scalar_steps, loss=half_mse, batch_size=None,
                  eval_at=eval_at, callbacks=[tracker], progress=progress)
    rows = _network_rows(point, history, lin.scalar_lr)
    for i, (s, t) in enumerate(zip(eval_at, times, strict=True)):
        rows.append(_row(point, "closed_form", s, t,
                         train_loss=0.5 * (float(u[i]) - scale) ** 2, gap=0.0,
                         closed_form_speedup=rate_end / rate0))
        rows.append(_row(point, "ntk", s, t, train_loss=float(half_mse(ntk_train[i], y)),
                         gap=_residual_gap(ntk_train[i], closed[i], residual0)))
    return rows


def run_point(config: BottleneckConfig, point: dict, progress: Progress) -> list[dict]:
    """One network (and its references) at one bottleneck, target scale and seed; one row per
    (kind, measured step), see the module docstring."""
    part = point["part"]
    if part == "mlp":
        return _run_mlp(config, point, progress)
    if part == "linear":
        return _run_linear(config, point, progress)
    if part == "scalar":
        return _run_scalar(config, point, progress)
    raise UsageError(f"unknown part {part!r}; the parts are 'mlp', 'linear' and 'scalar'")


def estimate_memory(config: BottleneckConfig, point: dict) -> int:
    """About the peak bytes of a point: the wide network's parameters with their gradients and
    activations, and the float64 kernels of the infinite NTK (``[N, N]`` and ``[M, N]`` with the
    temporaries of their recursion, about 15 of each)."""
    if point["part"] != "mlp":
        w, n = config.linear.width, config.linear.n_train
        return 8 * (4 * w * (w if point["bottleneck"] > w // 2 else 4 * config.linear.d)
                    + 16 * n * w) + 8 * 15 * n * n
    w, n, m = config.width, config.data.n_train, config.data.n_test
    k = point["bottleneck"] or w
    params = w * (64 + 2 * k + 1) + w * w * (config.depth_before + config.depth_after)
    return 8 * (4 * params + 8 * (n + m) * w) + 8 * 15 * n * (n + m)


# --------------------------------------------------------------------------- analysis


def time_to_level(t: np.ndarray, loss: np.ndarray, level: float) -> float:
    """The first time at which the piecewise curve ``(t, loss)`` reaches ``level``: linear
    interpolation in ``(log t, log loss)`` between the two measured steps around it (linear in
    ``t`` from ``t = 0``); ``t[0]`` if it starts there, NaN if it never gets there."""
    order = np.argsort(t)
    t, loss = np.asarray(t, float)[order], np.asarray(loss, float)[order]
    below = np.nonzero(loss <= level)[0]
    if len(below) == 0:
        return math.nan
    i = int(below[0])
    if i == 0:
        return float(t[0])
    t0, t1, l0, l1 = t[i - 1], t[i], loss[i - 1], loss[i]
    if t0 <= 0 or l1 <= 0:
        frac = (l0 - level) / (l0 - l1)
        return float(t0 + frac * (t1 - t0))
    frac = (math.log(l0) - math.log(level)) / (math.log(l0) - math.log(l1))
    return float(math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))))


_KEYS = ["part", "bottleneck", "target_scale", "seed"]


def speedups(df: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per point and kind other than ``ntk``: ``t_ntk / t_kind``, the ratio of the times the
    point's NTK companion and the curve take to reach ``threshold`` times their initial loss
    (columns ``_KEYS``, ``kind``, ``t_reach``, ``t_reach_ntk``, ``speedup``)."""
    out = []
    for key, sub in df.groupby(_KEYS, sort=True):
        curves = {kind: c.sort_values("t") for kind, c in sub.groupby("kind")}
        if "ntk" not in curves:
            continue
        start = float(curves["ntk"]["train_loss"].iloc[0])
        t_ntk = time_to_level(curves["ntk"]["t"].to_numpy(), curves["ntk"]["train_loss"]
                              .to_numpy(), threshold * start)
        for kind, c in curves.items():
            if kind == "ntk":
                continue
            t_k = time_to_level(c["t"].to_numpy(), c["train_loss"].to_numpy(),
                                threshold * float(c["train_loss"].iloc[0]))
            out.append({**dict(zip(_KEYS, key, strict=True)), "kind": kind, "t_reach": t_k,
                        "t_reach_ntk": t_ntk, "speedup": t_ntk / t_k if t_k > 0 else math.nan})
    return pd.DataFrame(out, columns=[*_KEYS, "kind", "t_reach", "t_reach_ntk", "speedup"])


def _final(df: pd.DataFrame) -> pd.DataFrame:
    """The last measured row of every (point, kind)."""
    idx = df.groupby([*_KEYS, "kind"])["step"].idxmax()
    return df.loc[idx]


_FLOOR = 1e-9   # the lowest relative loss the figures show (float32 networks end near 1e-12)


def _k_label(k: int) -> str:
    return "none" if k == 0 else f"k={k}"


def _relative(df: pd.DataFrame) -> pd.DataFrame:
    """``rel_loss``: train loss over the curve's initial loss."""
    df = df.copy()
    first = df.sort_values("step").groupby([*_KEYS, "kind"])["train_loss"].transform("first")
    df["rel_loss"] = df["train_loss"] / first
    return df


def _spread(values: pd.Series) -> str:
    """``mean (min-max)`` over seeds, saying how many seeds have no value (NaN: the curve never
    reached the threshold)."""
    v = values.dropna()
    missing = len(values) - len(v)
    note = f"; {missing} of {len(values)} seeds never reached it" if missing else ""
    if len(v) == 0:
        return "not reached" if missing else "n/a"
    if len(v) == 1:
        return f"{v.iloc[0]:.3g}" + (f" ({note[2:]})" if note else "")
    return f"{v.mean():.3g} ({v.min():.3g}-{v.max():.3g}{note})"


# --------------------------------------------------------------------------- figures


def figures(df: pd.DataFrame, config: BottleneckConfig, out_dir: Path) -> list[Path]:
    """``bottleneck_loss`` (C2): relative train loss against step for every bottleneck and the
    infinite NTK, one panel per target scale. ``bottleneck_kernel`` (C1, C3): kernel distance at
    the end and test error against the bottleneck width. ``bottleneck_linear`` (C4): the deep
    linear networks against the ODE and the kernel flow, the speedups, and the solved scalar
    model."""
    paths = []
    df = _relative(df)
    mlp = df[df["part"] == "mlp"]
    with fg.paper_style():
        if len(mlp):
            scales = sorted(mlp["target_scale"].unique())
            fig, axes = fg.new_figure(1, len(scales), sharey=True)
            for j, s in enumerate(scales):
                ax = axes[0, j]
                sub = mlp[(mlp["target_scale"] == s) & (mlp["step"] > 0)]
                ks = sorted(sub["bottleneck"].unique(), key=lambda k: (k == 0, k))
                for i, k in enumerate(ks):
                    net = sub[(sub["bottleneck"] == k) & (sub["kind"] == "network")]
                    fg.plot_mean_spread(ax, net, "step", "rel_loss", label=_k_label(int(k)),
                                        color=fg.color_cycle(i), marker=None)
                ref = sub[(sub["kind"] == "ntk") & (sub["bottleneck"] == ks[-1])]
                fg.plot_mean_spread(ax, ref, "step", "rel_loss", label="infinite NTK",
                                    color=fg.COLORS["network"], marker=None, linestyle="--")
                fg.log_axis(ax, "x")
                fg.log_axis(ax, "y")
                ax.set_ylim(bottom=max(_FLOOR, float(sub["rel_loss"].min()) / 2))
                ax.axhline(config.loss_threshold, color="#999999", linewidth=0.8, linestyle=":")
                ax.set_xlabel("step")
                ax.set_title(f"target scale {s:g}")
                fg.panel_label(ax, "abcdefgh"[j % 8])
            axes[0, 0].set_ylabel("train loss / initial loss")
            axes[0, 0].legend()
            paths.append(fg.save_figure(fig, out_dir, "bottleneck_loss"))

            fin = _final(mlp)
            fig, axes = fg.new_figure(1, 2)
            for col, (what, label) in enumerate((("kernel_distance", "kernel distance at end"),
                                                 ("test_error", "test error at end"))):
                ax = axes[0, col]
                for i, s in enumerate(scales):
                    net = fin[(fin["target_scale"] == s) & (fin["kind"] == "network")].copy()
                    net["k"] = net["bottleneck"].where(net["bottleneck"] > 0, config.width)
                    fg.plot_mean_spread(ax, net, "k", what, label=f"scale {s:g}",
                                        color=fg.color_cycle(i))
                    if what == "test_error":
                        ref = fin[(fin["target_scale"] == s) & (fin["kind"] == "ntk")]
                        ax.axhline(float(ref[what].mean()), color=fg.color_cycle(i),
                                   linestyle="--", linewidth=1.0)
                fg.log_axis(ax, "x", base=2)
                ax.set_xlabel(f"bottleneck width k (k = {config.width}: none)")
                ax.set_ylabel(label + (" (dashed: infinite NTK)" if what == "test_error" else ""))
                fg.panel_label(ax, "ab"[col])
            axes[0, 0].legend()
            paths.append(fg.save_figure(fig, out_dir, "bottleneck_kernel"))

        lin = df[df["part"] == "linear"]
        sca = df[df["part"] == "scalar"]
        if len(lin) or len(sca):
            fig, axes = fg.new_figure(1, 3)
            ax = axes[0, 0]
            if len(lin):
                s = max(lin["target_scale"].unique())
                sub = lin[(lin["target_scale"] == s) & (lin["step"] > 0)]
                for i, k in enumerate(sorted(sub["bottleneck"].unique())):
                    c = fg.color_cycle(i)
                    one = sub[sub["bottleneck"] == k]
                    fg.plot_mean_spread(ax, one[one["kind"] == "ode"], "t", "rel_loss",
                                        label=f"k={k}", color=c, marker=None)
                    fg.plot_mean_spread(ax, one[one["kind"] == "network"], "t", "rel_loss",
                                        color=c, marker="o", linestyle="none")
                ref = sub[(sub["kind"] == "ntk") & (sub["bottleneck"] == sub["bottleneck"].max())]
                fg.plot_mean_spread(ax, ref, "t", "rel_loss", label="infinite NTK",
                                    color=fg.COLORS["network"], marker=None, linestyle="--")
                fg.log_axis(ax, "x")
                fg.log_axis(ax, "y")
                ax.set_ylim(bottom=_FLOOR)
                ax.set_xlabel("time lr x step")
                ax.set_ylabel("train loss / initial loss")
                ax.set_title(f"deep linear, target scale {s:g}")
                ax.legend(title=f"lines: ODE, dots: width {config.linear.width}",
                          title_fontsize=6, fontsize=6)
            fg.panel_label(ax, "a")

            ax = axes[0, 1]
            sp = speedups(df[df["part"].isin(["linear", "mlp"])], config.loss_threshold)
            sp = sp[np.isfinite(sp["speedup"]) & (sp["speedup"] > 0)]
            for i, (part, kind) in enumerate((("linear", "ode"), ("linear", "network"),
                                              ("mlp", "network"))):
                for j, s in enumerate(sorted(sp["target_scale"].unique())):
                    one = sp[(sp["part"] == part) & (sp["kind"] == kind)
                             & (sp["target_scale"] == s) & (sp["bottleneck"] > 0)]
                    if len(one):
                        fg.plot_mean_spread(ax, one, "bottleneck", "speedup",
                                            label=f"{part} {kind}, scale {s:g}",
                                            color=fg.color_cycle(j),
                                            marker="os^"[i], linestyle="-:-."[i] if i < 2 else
                                            "-.")
            ax.axhline(1.0, color="#999999", linewidth=0.8)
            if len(sp):
                fg.log_axis(ax, "x", base=2)
                fg.log_axis(ax, "y")
                ax.legend(fontsize=6)
            else:
                ax.text(0.5, 0.5, f"no curve reached {config.loss_threshold:g}\nof its initial "
                        "loss", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel("bottleneck width k")
            ax.set_ylabel("speedup over the infinite NTK")
            fg.panel_label(ax, "b")

            ax = axes[0, 2]
            if len(sca):
                for j, s in enumerate(sorted(sca["target_scale"].unique())):
                    sub = sca[(sca["target_scale"] == s) & (sca["step"] > 0)]
                    c = fg.color_cycle(j)
                    fg.plot_mean_spread(ax, sub[sub["kind"] == "closed_form"], "t", "rel_loss",
                                        label=f"closed form, scale {s:g}", color=c, marker=None)
                    fg.plot_mean_spread(ax, sub[sub["kind"] == "network"], "t", "rel_loss",
                                        color=c, marker="o", linestyle="none")
                    fg.plot_mean_spread(ax, sub[sub["kind"] == "ntk"], "t", "rel_loss",
                                        color=c, marker=None, linestyle="--")
                fg.log_axis(ax, "x")
                fg.log_axis(ax, "y")
                ax.set_ylim(bottom=_FLOOR)
                ax.set_xlabel("time lr x step")
                ax.set_ylabel("train loss / initial loss")
                ax.set_title("solved scalar model")
                ax.legend(title="dots: network, dashed: NTK", title_fontsize=6, fontsize=6)
            fg.panel_label(ax, "c")
            paths.append(fg.save_figure(fig, out_dir, "bottleneck_linear"))
    return paths


# --------------------------------------------------------------------------- headline


def headline(df: pd.DataFrame, config: BottleneckConfig) -> dict:
    """Per target scale and bottleneck (means over seeds): the speedup over the infinite NTK
    and over the same-width network without a bottleneck (C2), the final kernel distance (C1)
    and test error (C3); the fairness check (the largest gap of the no-bottleneck network to the
    infinite NTK); the deep linear speedups of the networks and of the ODE and the largest gap
    between them (C4); the scalar model's closed-form and measured speedups and its final /
    initial rate ratio; and the answer in words, with the spread over seeds."""
    thr = config.loss_threshold
    out: dict = {"seeds": int(df["seed"].nunique()), "loss threshold": float(thr)}
    sp = speedups(df, thr)
    fin = _final(df)
    words, partial = [], []
    mlp_sp = sp[(sp["part"] == "mlp") & (sp["kind"] == "network")]
    mlp_fin = fin[(fin["part"] == "mlp")]
    for s in sorted(df["target_scale"].unique()):
        at = mlp_sp[mlp_sp["target_scale"] == s]
        none = at[at["bottleneck"] == 0].set_index("seed")["t_reach"]
        ks = sorted(at["bottleneck"].unique(), key=lambda k: (k == 0, k))
        said, errs = [], []
        for k in ks:
            lab = _k_label(int(k))
            one = at[at["bottleneck"] == k]
            out[f"speedup over the NTK, scale {s:g}, {lab}"] = float(one["speedup"].mean())
            vs_none = none.reindex(one["seed"]).to_numpy() / one["t_reach"].to_numpy()
            if k != 0 and len(none):
                finite = vs_none[np.isfinite(vs_none)]
                out[f"speedup over no bottleneck, scale {s:g}, {lab}"] = (
                    float(finite.mean()) if len(finite) else math.nan)
            net = mlp_fin[(mlp_fin["target_scale"] == s) & (mlp_fin["bottleneck"] == k)
                          & (mlp_fin["kind"] == "network")]
            out[f"kernel distance, scale {s:g}, {lab}"] = float(net["kernel_distance"].mean())
            out[f"test error, scale {s:g}, {lab}"] = float(net["test_error"].mean())
            said.append(f"{lab} {_spread(one['speedup'])}")
            missing = int(one["speedup"].isna().sum())
            if missing:
                partial.append(f"scale {s:g} {lab}: {missing} of {len(one)}")
            errs.append(f"{lab} {_spread(net['test_error'])}")
        if ks:
            ref = mlp_fin[(mlp_fin["target_scale"] == s) & (mlp_fin["kind"] == "ntk")]
            out[f"test error, scale {s:g}, infinite NTK"] = float(ref["test_error"].mean())
            gap = df[(df["part"] == "mlp") & (df["bottleneck"] == 0) & (df["kind"] == "network")
                     & (df["target_scale"] == s)]["gap"]
            if len(gap):
                out[f"no-bottleneck gap to the NTK, scale {s:g}"] = float(gap.max())
            words.append(f"target scale {s:g}: speedup over the infinite NTK "
                         + ", ".join(said) + "; test error " + ", ".join(errs)
                         + f" against the NTK's {_spread(ref['test_error'])}")
        lin = sp[(sp["part"] == "linear") & (sp["target_scale"] == s)]
        lin_words = []
        for k in sorted(lin["bottleneck"].unique()):
            one = lin[lin["bottleneck"] == k]
            ode = one[one["kind"] == "ode"]["speedup"]
            net = one[one["kind"] == "network"]["speedup"]
            out[f"deep linear ODE speedup, scale {s:g}, k={k}"] = float(ode.mean())
            out[f"deep linear network speedup, scale {s:g}, k={k}"] = float(net.mean())
            lin_words.append(f"k={k} {_spread(ode)} (networks {_spread(net)})")
        if lin_words:
            words.append(f"deep linear, target scale {s:g}: ODE speedup " + ", ".join(lin_words))
        sca = df[(df["part"] == "scalar") & (df["target_scale"] == s)]
        if len(sca):
            ratio = sca[sca["kind"] == "closed_form"].groupby("seed")["closed_form_speedup"].first()
            out[f"scalar model: final/initial rate, scale {s:g}"] = float(ratio.mean())
            ssp = sp[(sp["part"] == "scalar") & (sp["target_scale"] == s)]
            cf, net = (ssp[ssp["kind"] == kind]["speedup"] for kind in ("closed_form", "network"))
            out[f"scalar model: closed-form speedup, scale {s:g}"] = float(cf.mean())
            out[f"scalar model: network speedup, scale {s:g}"] = float(net.mean())
            words.append(f"scalar model, target scale {s:g}: closed-form speedup {_spread(cf)}, "
                         f"network {_spread(net)}")
    if len(mlp_sp):
        out["seeds that never reached the threshold"] = ", ".join(partial) or "none"
    lin_net = df[(df["part"].isin(["linear", "scalar"])) & (df["kind"] == "network")]
    if len(lin_net):
        out["deep linear: max gap network vs infinite-width theory"] = float(lin_net["gap"].max())
    if words:
        out["answer"] = (f"Speedup = time for the infinite NTK to reach {thr:g} of the initial "
                         "train loss / time for the network, both from the network's initial "
                         f"function (mean, min-max over {out['seeds']} seeds). "
                         + ". ".join(words) + ".")
    return out


GUIDE = """
Wide networks with one narrow bottleneck of width k (Littwin et al. 2021) against the
infinite-width NTK. Every curve of a network is paired with kernel gradient flow with the infinite
NTK started from that network's own initial function, so both start at the same loss.

# Why a bottleneck is not a kernel

With every other layer infinitely wide, the sub-network below the bottleneck and the one above are
each a kernel machine with a fixed NTK; but the upper one is evaluated at the bottleneck features
z_t(x), which move, so the network's NTK changes by O(1) during training: a finite bottleneck
learns features in the infinite-width limit. Only k -> infinity recovers the NTK limit, which is
what `telescope.infinite` describes.

- **bottleneck_loss** (claim C2, acceleration): train loss relative to its start against the step,
  one line per k (mean over seeds, band: min-max), the infinite NTK dashed (the companion of the
  no-bottleneck network; each network's speedup is taken against its own companion), the
  threshold of the speedup dotted. A bottleneck line below the NTK line trains faster.
- **bottleneck_kernel** (C1, C3): a, the kernel distance between the NTK at initialization and at
  the end (Fort et al. 2020) against k; feature learning shows as a large distance, the NTK limit
  as 0. b, the test error at the end, the infinite NTK's dashed.
- **bottleneck_linear** (C4): a, deep linear networks (dots) against the infinite-width ODE
  (lines) and the fixed-kernel flow (dashed) at the largest target scale; b, speedups over the
  NTK against k; c, the solved scalar model, closed form against the trained network.

The acceleration depends on how large the learned function is compared with the network at
initialization (the target scale): in the scalar model the rate of learning grows from about
L1 + L2 to at least 2 sqrt(L1 L2) times the target, so small targets see no acceleration, or a
slowdown. A speedup is NaN (and the answer says "never reached") when a curve does not reach the
threshold within the run.

The headline's no-bottleneck gap, `||f_t - f_t^NTK|| / ||y - f_0||` at its largest, says how
closely the finite wide network follows the infinite NTK (the fairness of the comparison; it
grows with the target scale, since a finite width learns features too when the targets are
large); compare the bottlenecks with the no-bottleneck network of the same width as well
(`speedup over no bottleneck`). The deep-linear gap says how closely the trained linear networks
follow the infinite-width theory; it includes the gradient-descent discretization, and it peaks
where a narrow bottleneck escapes a plateau, whose timing small perturbations shift.
"""

STUDY = Study(
    name="bottleneck",
    description="wide networks with a narrow bottleneck vs the infinite NTK: acceleration, "
                "kernel movement and test error by bottleneck width (Littwin et al. 2021)",
    config_cls=BottleneckConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
    estimate_memory=estimate_memory,
)
