"""``collegial-ensembles``: at a fixed parameter budget, many narrow networks trained as one
against one wide network.

Littwin, Myara, Sabah, Susskind, Zhai & Golan (2020), "Collegial Ensembles", NeurIPS. A
collegial ensemble (CE) aggregates ``m`` networks of width ``w`` and trains them as a single
model; its tangent kernel is the mean of the members' (``f = sum_k f_k / sqrt(m)``, see
:mod:`telescope.models.ensemble`), so its fluctuations over initializations shrink like
``Var[Theta_w] / m`` while its parameter count grows only like ``m w^2``: at a fixed budget the
ensemble's kernel can concentrate more than a wide network's (whose variance falls like ``1 /
width`` at a parameter cost of ``width^2``), and its training follows its kernel more closely.
The paper's claim is that the optimization of a CE "resembles the dynamics of wide models, yet
scales much more favorably", with a sweet spot of width against multiplicity.

Setup. A binary task (:func:`telescope.studies._binary.load_binary_task`, ``+1``/``-1``
targets, default MNIST-1D classes 3 vs 5), members ``in -> w (x depth) -> 1`` ReLU MLPs in the
NTK parametrization without biases, built as one network of block-diagonal layers
(:func:`telescope.models.collegial_ensemble`, its kernel by the structured rule of
:class:`telescope.models.BlockDiagonalLinear`). The budget is the parameter count ``P`` of one
network of width ``budget_width``; a member width ``w`` gets ``m = round(P / p(w))`` members
(:func:`telescope.models.ensemble.members_for_budget`), so ``w = budget_width`` is the single
wide network (``m = 1``). A sweep point is ``(width, seed)``:

1. **Kernel concentration.** ``kernel_draws`` independent initializations of the ensemble, of
   one member-sized network (``m = 1``, width ``w``) and of one *wide* network with as many
   hidden units (``m = 1``, width ``m w``, about ``m`` times the budget; skipped, NaN, above
   ``wide_max_params`` parameters) give empirical NTKs
   (float64) on the first ``kernel_points`` training inputs; the ensemble's kernel is divided by
   ``m c_m^2`` (1 for ``normalization="sqrt"``) so that it is on one member's scale. Reported:
   the normalized variance ``V = E ||K - E K||_F^2 / ||E K||_F^2`` of each, estimated from the
   ``D`` draws without bias in numerator and denominator
   (:func:`telescope.kernels.normalized_variance`), the ratio ``m V_ensemble / V_member`` (1 if
   the members are independent: the ``1/m`` law), and the distance of the mean kernel and of a
   single draw to the infinite-width NTK
   (:func:`telescope.infinite_ntk`): the ensemble concentrates around the *width-w* mean
   kernel, which differs from the infinite one by ``O(1 / w)``.
2. **Training dynamics.** The first draw is trained by full-batch gradient descent (learning
   rate ``lr``, ``lr * m`` with ``normalization="mean"``, whose kernel is ``m`` times smaller)
   on ``0.5 * mean (f - y)^2`` for ``steps`` steps, and compared at log-spaced steps ``t`` with
   its linearization at initialization trained the same way: gradient descent with the
   initial empirical NTK from ``f_0`` in function space
   (:func:`telescope.kernels.kernel_descent`, exact; the gradient-flow formula of
   :func:`telescope.kernel_regression` would differ from it by
   ``(1 - u)^t - exp(-u t)`` of a mode's initial residual, ``u = lr lambda / n``: 0.11 at step 1
   for ``u = 0.5``, as large as the gaps measured). Reported per step: the relative
   gap ``||f_t - f_lin,t|| / ||f_lin,t - f_0||`` on the test points (the trained network's
   distance from the kernel prediction, against how far that prediction moved), the kernel
   distance of Fort et al. between ``Theta_t`` and ``Theta_0`` on the kernel points
   (:class:`telescope.lens.KernelEvolution`), and the sign test error of the network, of its
   kernel prediction and (at the end) of the infinite-width NTK's prediction at the same time.
3. **Trade-off.** The test error of the trained networks over the widths at the fixed budget.

The ``quick`` preset (budget of one width-128 network, ~21.6k parameters; widths 4 to 128,
i.e. 120 to 1 members; 256 training points, 400 steps, 2 seeds) runs in about two minutes on
one CPU thread; ``full`` (budget of a width-512 network of depth 3, widths 4 to 512, 1000
training points, 3000 steps, 5 seeds) is meant for a GPU (``device="auto"``).
"""

from __future__ import annotations

import math
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn

from telescope import plotting as fg
from telescope.errors import UsageError
from telescope.infinite import infinite_ntk
from telescope.kernels import kernel_descent, normalized_variance
from telescope.kernels import ntk as empirical_ntk
from telescope.lens import KernelEvolution
from telescope.models import collegial_ensemble
from telescope.models.ensemble import member_parameter_count, members_for_budget
from telescope.studies._binary import BinaryData, check_data, load_binary_task, sign_error
from telescope.studies.base import Progress, Study, check_device, resolve_device
from telescope.studies.constraints import NonEmpty, PositiveFloat, PositiveInt, config_dataclass
from telescope.train import fit, log_spaced_steps

__all__ = ["CollegialConfig", "points", "run_point", "figures", "headline", "STUDY",
           "budget", "members"]


def _default_data() -> BinaryData:
    return BinaryData(n_train=256, n_test=500)


@config_dataclass
class CollegialConfig:
    """Config of ``collegial-ensembles``; e.g. ``--set widths=8,32,128 budget_width=128``."""

    data: BinaryData = field(default_factory=_default_data)
    budget_width: PositiveInt = 128            # the budget: one network of this width (m = 1)
    widths: NonEmpty[PositiveInt] = (4, 8, 16, 32, 64, 128)   # member widths
    depth: PositiveInt = 2                     # hidden layers per member
    activation: Literal["relu", "erf"] = "relu"
    normalization: Literal["sqrt", "mean"] = "sqrt"   # f = sum f_k / sqrt(m) or / m
    kernel_points: Annotated[int, Ge(2)] = 64  # the first training inputs: the kernels' points
    kernel_draws: Annotated[int, Ge(2)] = 8    # initializations per point for the variance
    wide_max_params: PositiveInt = 50_000_000  # skip the width-m*w comparison above this size
    lr: PositiveFloat = 1.0
    steps: PositiveInt = 1000
    evals: PositiveInt = 10                    # log-spaced measurement steps (and step 0)
    device: str = "cpu"                        # "cpu", "cuda", ... or "auto"
    seeds: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if len(set(self.widths)) != len(self.widths):
            raise UsageError(f"widths must not repeat, got {self.widths}")
        if max(self.widths) > self.budget_width:
            raise UsageError(f"every width must be <= budget_width ({self.budget_width}): a "
                             f"member wider than the budget network cannot fit the budget; got "
                             f"widths {self.widths}")
        if self.kernel_points > self.data.n_train:
            raise UsageError(f"kernel_points ({self.kernel_points}) must be <= data.n_train "
                             f"({self.data.n_train}): the kernels are taken on training inputs")
        check_data(self.data)
        check_device("device", self.device)


PRESETS = {
    "quick": {},
    "full": {"data.n_train": 1000, "data.n_test": 1000, "budget_width": 512, "depth": 3,
             "widths": (4, 8, 16, 32, 64, 128, 256, 512), "kernel_points": 128,
             "kernel_draws": 16, "steps": 3000, "evals": 12, "seeds": 5, "device": "auto"},
}


def budget(config: CollegialConfig, in_features: int) -> int:
    """The parameter budget ``P``: one member-architecture network of width ``budget_width``."""
    return member_parameter_count(config.budget_width, in_features, 1, depth=config.depth,
                                  bias=False)


def members(config: CollegialConfig, in_features: int, width: int) -> int:
    """``m`` for member width ``width`` at the budget (:func:`members_for_budget`)."""
    return members_for_budget(budget(config, in_features), width, in_features, 1,
                              depth=config.depth, bias=False)


def points(config: CollegialConfig) -> list[dict]:
    """Every member width, narrowest first, for every seed."""
    seeds = range(config.seed, config.seed + config.seeds)
    return [{"width": int(w), "seed": int(s)} for w in sorted(config.widths) for s in seeds]


def estimate_memory(config: CollegialConfig, point: dict) -> int:
    """The float64 kernels (train-train, test-train, infinite ones, the regression's
    eigendecomposition: about 8 ``[n_train + n_test, n_train]`` arrays) and a 512 MB allowance
    for the structured kernel's blocks and the training activations."""
    n, n_test = config.data.n_train, config.data.n_test
    return 8 * 8 * (n + n_test) * n + 512 * 2**20


# --------------------------------------------------------------------------- one point


def _init_seed(seed: int, draw: int, kind: int) -> int:
    """An independent torch seed for draw ``draw`` of network ``kind`` (0: the ensemble, 1: the
    member-sized network) at point seed ``seed``."""
    return int(np.random.SeedSequence([seed, draw, kind]).generate_state(1)[0])


def _build(config: CollegialConfig, d: int, width: int, m: int, seed: int,
           device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return collegial_ensemble(m, width, d, 1, depth=config.depth, activation=config.activation,
                              normalization=config.normalization,
                              bias=False).to(dtype=torch.float64, device=device)


def _half_mse(out: Tensor, target: Tensor) -> Tensor:
    """``0.5 * mean (f - y)^2``: the loss of :func:`telescope.kernel_regression`'s convention."""
    return 0.5 * F.mse_loss(out, target)


def _rel(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class _KernelGap:
    """At every measured step ``t``: the network against its kernel prediction ``f_lin,t``
    (precomputed for the steps of ``eval_at``) on the test points, and the test errors."""

    def __init__(self, x_test: Tensor, y_test: Tensor, f0_test: Tensor,
                 lin_test: dict[int, Tensor]) -> None:
        self.x_test, self.y_test, self.f0_test, self.lin_test = x_test, y_test, f0_test, lin_test

    def measure(self, state) -> dict:
        with torch.no_grad():
            f = state.model(self.x_test)
        lin = self.lin_test[state.step]
        moved = float(torch.linalg.vector_norm(lin - self.f0_test))
        gap = float(torch.linalg.vector_norm(f - lin))
        return {"test_error": sign_error(f, self.y_test),
                "kernel_test_error": sign_error(lin, self.y_test),
                "test_mse": float(((f - self.y_test) ** 2).mean()),
                "gap": gap / moved if moved > 0 else math.nan,
                "gap_rms": gap / math.sqrt(f.numel())}


def run_point(config: CollegialConfig, point: dict, progress: Progress) -> list[dict]:
    """The kernel statistics of one member width at the budget (one ``kernel`` row), then the
    trained ensemble against its kernel prediction (one ``train`` row per measured step)."""
    width, seed = int(point["width"]), int(point["seed"])
    device = resolve_device(config.device)
    data = load_binary_task(config.data, dtype=torch.float64)
    x, y = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    d = int(x.shape[1])
    m = members(config, d, width)
    scale = 1.0 if config.normalization == "sqrt" else float(m)  # 1 / (m c_m^2)
    xk = x[:config.kernel_points]
    draws = config.kernel_draws
    progress.set(3 * draws + config.steps)
    common = {**point, "members": m, "n_params": m * member_parameter_count(width, d, 1,
                                                                   depth=config.depth,
                                                                   bias=False),
              "budget": budget(config, d)}

    # 1. the kernel over initializations: the ensemble (member scale) and one member-sized net
    k_inf = infinite_ntk(xk, depth=config.depth, activation=config.activation)["ntk"].to(device)
    n_wide = member_parameter_count(m * width, d, 1, depth=config.depth, bias=False)
    shapes = {"ensemble": (width, m), "member": (width, 1), "wide": (m * width, 1)}
    if n_wide > config.wide_max_params:
        del shapes["wide"]
    kernels: dict[str, list[Tensor]] = {name: [] for name in shapes}
    for j in range(draws):
        for kind, (name, (w, k)) in enumerate(shapes.items()):
            net = _build(config, d, w, k, _init_seed(seed, j, kind), device)
            kernels[name].append(empirical_ntk(net, xk) * (scale if name == "ensemble" else 1))
            progress.update()
    kernel_row: dict = {"kind": "kernel", **common, "n_params_wide": n_wide,
                        **{f"{stat}_wide": math.nan for stat in ("var", "bias", "dist")}}
    for name, ks in kernels.items():
        var, mean = normalized_variance(ks)
        kernel_row.update({f"var_{name}": var, f"bias_{name}": _rel(mean, k_inf),
                           f"dist_{name}": float(np.mean([_rel(k, k_inf) for k in ks]))})
    kernel_row["law_ratio"] = kernel_row["var_ensemble"] * m / kernel_row["var_member"]

    # 2. training against the kernel prediction
    model = _build(config, d, width, m, _init_seed(seed, 0, 0), device)
    lr = config.lr * (m if config.normalization == "mean" else 1)
    eval_at = log_spaced_steps(config.steps, config.evals, zero=True)
    with torch.no_grad():
        f0, f0_test = model(x), model(x_test)
    k_tt, k_st = empirical_ntk(model, x), empirical_ntk(model, x_test, x)
    lin = dict(zip(eval_at, kernel_descent(k_tt, k_st, y, f0_train=f0, f0_test=f0_test,
                                           steps=eval_at, lr=lr), strict=True))
    gap = _KernelGap(x_test, y_test, f0_test, lin)
    evolution = KernelEvolution(model, xk)
    history = fit(model, torch.optim.SGD(model.parameters(), lr=lr), x, y, steps=config.steps,
                  loss=_half_mse, eval_at=eval_at, callbacks=[gap, evolution],
                  progress=progress)
    # the infinite-width NTK's prediction after as many steps, from f = 0 (its mean over inits)
    inf_tt = infinite_ntk(x, depth=config.depth, activation=config.activation)["ntk"]
    inf_st = infinite_ntk(x_test, x, depth=config.depth, activation=config.activation)["ntk"]
    inf_pred = kernel_descent(inf_tt, inf_st, y, steps=config.steps, lr=config.lr)
    kernel_row["infinite_test_error"] = sign_error(inf_pred, y_test)
    rows = [kernel_row]
    for row in history.rows:
        rows.append({"kind": "train", **common, "step": int(row["step"]),
                     "train_loss": float(row["loss"]),
                     **{k: float(row[k]) for k in ("test_error", "kernel_test_error",
                                                   "test_mse", "gap", "gap_rms",
                                                   "kernel_distance")}})
    return rows


# --------------------------------------------------------------------------- figures


def _kernel_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["kind"] == "kernel"]


def _final_rows(df: pd.DataFrame) -> pd.DataFrame:
    train = df[df["kind"] == "train"]
    if train.empty:
        return train
    last = train.groupby(["width", "seed"])["step"].transform("max")
    return train[train["step"] == last]


def _members_axis(ax, sub: pd.DataFrame) -> None:
    """The number of members above each width, on a secondary top axis."""
    by_width = sub.groupby("width")["members"].first().sort_index()
    top = ax.secondary_xaxis("top")
    top.set_xticks(list(by_width.index), [str(int(v)) for v in by_width.to_numpy()])
    top.minorticks_off()
    top.set_xlabel("members m")


def figures(df: pd.DataFrame, config: CollegialConfig, out_dir: Path) -> list[Path]:
    """``collegial_ensembles_kernel.png``: (a) the NTK's normalized variance over
    initializations against the member width at the fixed budget, for the ensemble, for one
    member-sized network and that divided by ``m`` (the ``1/m`` law), and for one network of
    width ``m w``; (b) the distance to the infinite-width NTK of the mean kernel and of one
    draw. ``collegial_ensembles_training.png``:
    (a) the trained network's relative gap to its kernel prediction through training, one line
    per width; (b) at the end, that gap and the kernel distance from initialization against the
    width; (c) the test error of the trained networks, of their kernel predictions and of the
    infinite-width NTK against the width (the trade-off curve)."""
    paths = []
    kern = _kernel_rows(df).copy()
    final = _final_rows(df)
    with fg.paper_style():
        fig, axes = fg.new_figure(1, 2)
        if not kern.empty:
            widths = sorted(kern["width"].unique())
            kern["predicted"] = kern["var_member"] / kern["members"]
            ax = axes[0, 0]
            fg.plot_mean_spread(ax, kern, "width", "var_ensemble", label="ensemble at the budget",
                                color=fg.COLORS["network"])
            fg.plot_mean_spread(ax, kern, "width", "var_member", label="one member (m = 1)",
                                color=fg.COLORS["linearized"])
            fg.plot_mean_spread(ax, kern, "width", "predicted", label="member / m (1/m law)",
                                color=fg.COLORS["telescoping"], ls=":", marker=None)
            fg.plot_mean_spread(ax, kern, "width", "var_wide",
                                label="one network of width m w", color=fg.COLORS["test"],
                                ls="--")
            fg.log_axis(ax, "x", base=2, ticks=fg.sparse_ticks(widths))
            fg.log_axis(ax, "y")
            ax.set_xlabel("member width w")
            ax.set_ylabel("normalized NTK variance over inits")
            ax.legend(loc="upper right", fontsize=7)
            _members_axis(ax, kern)
            ax = axes[0, 1]
            fg.plot_mean_spread(ax, kern, "width", "dist_ensemble", label="ensemble, one draw",
                                color=fg.COLORS["network"])
            fg.plot_mean_spread(ax, kern, "width", "bias_ensemble",
                                label="ensemble, mean over draws",
                                color=fg.COLORS["network"], ls="--")
            fg.plot_mean_spread(ax, kern, "width", "dist_member", label="one member, one draw",
                                color=fg.COLORS["linearized"])
            fg.plot_mean_spread(ax, kern, "width", "dist_wide", label="width m w, one draw",
                                color=fg.COLORS["test"], ls="--")
            fg.log_axis(ax, "x", base=2, ticks=fg.sparse_ticks(widths))
            fg.log_axis(ax, "y")
            ax.set_xlabel("member width w")
            ax.set_ylabel("||K - K_inf||_F / ||K_inf||_F")
            ax.legend(loc="upper right", fontsize=7)
            _members_axis(ax, kern)
        for ax, letter in zip(axes[0], "ab", strict=True):
            fg.panel_label(ax, letter)
        paths.append(fg.save_figure(fig, out_dir, "collegial_ensembles_kernel"))

        fig, axes = fg.new_figure(1, 3)
        train = df[(df["kind"] == "train") & (df["step"] > 0)]
        if not train.empty:
            ax = axes[0, 0]
            for i, (width, sub) in enumerate(train.groupby("width", sort=True)):
                m = int(sub["members"].iloc[0])
                fg.plot_mean_spread(ax, sub, "step", "gap", label=f"w {int(width)}, m {m}",
                                    color=fg.color_cycle(i), marker=None)
            fg.log_axis(ax, "x")
            fg.log_axis(ax, "y")
            ax.set_xlabel("gradient-descent step")
            ax.set_ylabel("||f_t - f_lin,t|| / ||f_lin,t - f_0|| (test)")
            ax.legend(fontsize=7)
        if not final.empty:
            widths = sorted(final["width"].unique())
            ax = axes[0, 1]
            fg.plot_mean_spread(ax, final, "width", "gap", label="gap to the kernel prediction",
                                color=fg.COLORS["network"])
            fg.plot_mean_spread(ax, final, "width", "kernel_distance",
                                label="kernel distance from init", color=fg.COLORS["telescoping"])
            fg.log_axis(ax, "x", base=2, ticks=fg.sparse_ticks(widths))
            fg.log_axis(ax, "y")
            ax.set_xlabel("member width w")
            ax.set_ylabel(f"at step {int(final['step'].max())}")
            ax.legend()
            _members_axis(ax, final)
            ax = axes[0, 2]
            fg.plot_mean_spread(ax, final, "width", "test_error", label="trained network",
                                color=fg.COLORS["network"])
            fg.plot_mean_spread(ax, final, "width", "kernel_test_error",
                                label="its kernel prediction", color=fg.COLORS["linearized"])
            if not kern.empty:
                ax.axhline(float(kern["infinite_test_error"].mean()), ls="--",
                           color=fg.COLORS["telescoping"], label="infinite-width NTK")
            fg.log_axis(ax, "x", base=2, ticks=fg.sparse_ticks(widths))
            ax.set_xlabel("member width w")
            ax.set_ylabel("test error (sign)")
            ax.legend()
            _members_axis(ax, final)
        for ax, letter in zip(axes[0], "abc", strict=True):
            fg.panel_label(ax, letter)
        paths.append(fg.save_figure(fig, out_dir, "collegial_ensembles_training"))
    return paths


# --------------------------------------------------------------------------- headline


def _spread(values: pd.Series) -> str:
    """``mean [min, max]`` over seeds, 3 significant digits."""
    return f"{values.mean():.3g} [{values.min():.3g}, {values.max():.3g}]"


def headline(df: pd.DataFrame, config: CollegialConfig) -> dict:
    """At the fixed budget (means over seeds; ``[min, max]`` over seeds where given): the NTK
    variance of the single wide network and of the most concentrated ensemble and their ratio;
    the ``1/m`` law; the gap to the kernel prediction and the kernel's movement at the end for
    the single network and for the most members; the test error of the single network, of the
    best ``(m, w)`` and of the infinite-width NTK; and the answer in words."""
    kern = _kernel_rows(df)
    if kern.empty:
        return {}
    out: dict = {"parameter budget": int(kern["budget"].iloc[0]),
                 "seeds": int(kern["seed"].nunique())}
    by_w = kern.groupby("width")
    var = by_w["var_ensemble"].mean()
    m_of = by_w["members"].first()
    widest, narrowest = int(var.index.max()), int(var.index.min())
    best_var_w = int(var.idxmin())
    out["members by width"] = ", ".join(f"w {int(w)}: m {int(m)}" for w, m in m_of.items())
    single = kern[kern["width"] == widest].set_index("seed")["var_ensemble"]
    best = kern[kern["width"] == best_var_w].set_index("seed")["var_ensemble"]
    label_single = f"width {widest}, m {int(m_of[widest])}"
    label_best = f"width {best_var_w}, m {int(m_of[best_var_w])}"
    out[f"NTK variance, widest ({label_single})"] = float(single.mean())
    out[f"NTK variance, lowest ({label_best})"] = float(best.mean())
    ratio = (single / best).dropna()
    out["variance ratio widest / lowest"] = float(ratio.mean())
    out["variance ratio widest / lowest, seeds [min, max]"] = _spread(ratio)
    at_best = kern[kern["width"] == best_var_w]
    wide_w = int(best_var_w * m_of[best_var_w])
    out[f"NTK variance, one network of width {wide_w} (= m w at the lowest)"] = float(
        at_best["var_wide"].mean())
    out[f"parameters of one network of width {wide_w}"] = int(at_best["n_params_wide"].iloc[0])
    law = kern[kern["members"] > 1]["law_ratio"]
    out["1/m law: m x ensemble variance / member variance (mean over widths, seeds)"] = (
        float(law.mean()) if not law.empty else math.nan)
    out["distance of the mean kernel to the infinite NTK, widest"] = float(
        by_w["bias_ensemble"].mean()[widest])
    out[f"distance of the mean kernel to the infinite NTK, width {narrowest}"] = float(
        by_w["bias_ensemble"].mean()[narrowest])
    final = _final_rows(df)
    if not final.empty:
        f_by = final.groupby("width")
        gap, dist, err = f_by["gap"].mean(), f_by["kernel_distance"].mean(), f_by["test_error"]
        step = int(final["step"].max())
        out["step T of the training numbers below"] = step
        for w in sorted({widest, narrowest, best_var_w}, reverse=True):
            tag = f"width {w}, m {int(m_of[w])}"
            out[f"gap to the kernel prediction at T ({tag})"] = float(gap[w])
            out[f"kernel distance from init at T ({tag})"] = float(dist[w])
        errs = err.mean()
        best_err_w = int(errs.idxmin())
        out[f"test error at T, widest ({label_single})"] = float(errs[widest])
        out["test error at T, widest, seeds [min, max]"] = _spread(
            final[final["width"] == widest]["test_error"])
        out[f"test error at T, best (width {best_err_w}, m {int(m_of[best_err_w])})"] = float(
            errs[best_err_w])
        out["test error at T, best, seeds [min, max]"] = _spread(
            final[final["width"] == best_err_w]["test_error"])
        out["width with the lowest test error"] = best_err_w
        by_seed = final.pivot_table(index="seed", columns="width", values="test_error")
        diff = (by_seed[widest] - by_seed[best_err_w]).dropna()
        out["test error, widest minus best, seeds [min, max]"] = _spread(diff)
        out["seeds where the best width has the lower test error"] = (
            f"{int((diff > 0).sum())} of {len(diff)}")
        out["test error, infinite-width NTK at T"] = float(kern["infinite_test_error"].mean())
        out["answer"] = _answer(out, kern, final, widest, best_var_w, best_err_w, m_of)
    return out


def _answer(h: dict, kern: pd.DataFrame, final: pd.DataFrame, widest: int, best_var_w: int,
            best_err_w: int, m_of: pd.Series) -> str:
    """The headline in words, with its numbers."""
    f_by = final.groupby("width")
    gap = f_by["gap"].mean()
    ratio = h["variance ratio widest / lowest"]
    law = h["1/m law: m x ensemble variance / member variance (mean over widths, seeds)"]
    errs = f_by["test_error"].mean()
    seeds = int(kern["seed"].nunique())
    concentrates = ratio > 1.5
    wide_w = int(best_var_w * m_of[best_var_w])
    wide_var = h[f"NTK variance, one network of width {wide_w} (= m w at the lowest)"]
    wide_params = h[f"parameters of one network of width {wide_w}"]
    parts = [
        f"At a budget of {h['parameter budget']} parameters, the ensemble's NTK "
        + ("concentrates more than the wide network's: " if concentrates else
           "does not concentrate clearly more than the wide network's: ")
        + f"its normalized variance over initializations is {ratio:.3g} times lower at width "
        f"{best_var_w} x {int(m_of[best_var_w])} members than for one width-{widest} network "
        f"(seeds: {h['variance ratio widest / lowest, seeds [min, max]']}), "
        + (f"against {wide_var:.3g} for one network with as many hidden units (width {wide_w}, "
           f"{wide_params} parameters), " if math.isfinite(wide_var) else "")
        + "and m times the ensemble variance "
        + ("matches" if abs(law - 1) < 0.25 else "does not match")
        + f" one member's ({law:.3g} on average, 1 for independent members).",
        f" The trained network stays closer to its kernel prediction with more members: the "
        f"relative gap at step {h['step T of the training numbers below']} is {gap[widest]:.3g} "
        f"for the single network and {gap[best_var_w]:.3g} at width {best_var_w}"
        + (" (smaller)." if gap[best_var_w] < gap[widest] else " (not smaller)."),
        f" Test error (sign, {seeds} seed{'s' if seeds > 1 else ''}) is lowest at width "
        f"{best_err_w} x {int(m_of[best_err_w])} members ({errs[best_err_w]:.3g}) against "
        f"{errs[widest]:.3g} for the single network; the infinite-width NTK gives "
        f"{h['test error, infinite-width NTK at T']:.3g}.",
    ]
    if best_err_w == widest:
        parts.append(" So here the better-concentrated kernel does not buy a lower test error.")
    else:
        wins = h["seeds where the best width has the lower test error"]
        parts.append(f" Paired by seed, the best width is lower in {wins} seeds (differences "
                     f"{h['test error, widest minus best, seeds [min, max]']}); it is picked on "
                     "the same test points, so the difference is an optimistic one.")
    return "".join(parts)


GUIDE = """
Collegial ensembles (Littwin et al. 2020): m networks of width w, averaged (f = sum f_k /
sqrt(m)) and trained as one, built as one network of block-diagonal layers. Every width w is
given as many members m as fit the parameter budget of one network of width `budget_width`;
the widest width is that single network (m = 1). The members' count is on the top axes.

- **Kernel figure, panel a**: the normalized variance of the empirical NTK over
  initializations, E ||K - E K||^2 / ||E K||^2 (Frobenius norms, estimated from the draws
  without bias), for the ensemble at the budget
  (black), for one member-sized network (gray) and that divided by m (red dotted: the 1/m law of
  independent members), and for one network of width m w, as many hidden units as the ensemble
  but about m times its parameters (orange dashed). The paper's claim: at a fixed budget the
  ensemble's kernel concentrates more than the wide network's, because its variance falls like
  1/m while its parameters grow only like m w^2; it concentrates about as a network of width
  m w does.
- **Panel b**: distance to the infinite-width NTK, of one draw (solid) and of the mean kernel
  (dashed). The ensemble concentrates around the mean kernel of width w, which differs from
  the infinite-width kernel by O(1/w): narrow members trade variance for this bias.
- **Training figure, panel a**: the relative gap between the trained network and its
  linearization at initialization trained the same way (kernel gradient descent with the
  initial NTK), through training, per width. **Panel b**: that gap and the kernel distance of
  Fort et al. between the NTK at the end and at initialization, against the width. **Panel c**: the
  trade-off curve: test error of the trained networks (black), of their kernel predictions
  (gray) and of the infinite-width NTK (red dashed) against the width at the fixed budget.

Bands span the seeds' min and max. `results.parquet` holds one `kernel` row per (width, seed)
and one `train` row per measured step.
"""

STUDY = Study(
    name="collegial-ensembles",
    description="Littwin et al. 2020: at a fixed parameter budget, m networks of width w trained "
                "as one (block-diagonal layers): NTK variance, kernel-regime gap, test error",
    config_cls=CollegialConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
    estimate_memory=estimate_memory,
)
