"""``autoencoder-rank``: greedy learning of the latent rank by an autoencoder whose bottleneck
holds a depth-``L`` linear sub-network.

Sun, Thilak, Littwin, Saremi & Susskind (2021), "Implicit greedy rank learning in autoencoders
via overparameterized linear networks" (ICML 2021 workshop on overparameterization,
arXiv:2107.01301). The abstract's claims, as this study reads and tests them:

- **C1 (greedy)**: gradient descent learns the latent codes' singular values one at a time,
  in the order of the data's singular values, so the rank of the codes climbs a staircase.
- **C2 (sensitivity)**: how fast, and whether within a training budget, the rank reaches the
  data's latent rank ``r`` depends on the spectral prior (the profile of the data's singular
  values) and on the depth ``L``: under a standard (Gaussian-like) initialization of the
  factors a deeper sub-network learns later and more greedily (a stronger low-rank bias), and
  a steeper spectrum delays its small modes more.
- **C3 (remedy)**: orthogonal initialization of the factors with a depth-adjusted learning rate
  makes the dynamics insensitive to ``L``, and a *linear* autoencoder on synthetic data then
  converges stably to the ground-truth rank ``r``.
- **C4 (nonlinear)**: with nonlinear encoder and decoder around the sub-network the method
  still converges to a low latent rank. (The paper's measure there, downstream
  classification and image sampling, is not reproduced; we report the codes' rank against the
  data's latent rank.)

The abstract gives no formula for the learning-rate adjustment. We use ``eta / (L s^(2(L-1)))``
for each of the ``L`` factors (``s`` their scale), which makes one gradient step move the
product ``W_L ... W_1`` exactly like a single matrix trained at ``eta`` at an orthogonal
initialization (derivation: :mod:`telescope.models.autoencoder`,
:meth:`~telescope.models.LinearBottleneckAutoencoder.param_groups`).

Setting. Data: :func:`telescope.data.low_rank_data`, ``n`` points on a random ``r``-dimensional
subspace of ``R^d`` with singular values ``s`` (``profiles``: ``flat``, ``linear``,
``geometric``, ``power``; ``s_1 / s_r = condition``). Model:
:class:`telescope.models.LinearBottleneckAutoencoder` with ``code_dim > r``, encoder and decoder
at a small scale ``io_scale`` (the small-initialization regime; for one seed they are the same
for every depth and method: a paired comparison), trained by full-batch gradient descent on
the mean squared reconstruction error. A *method* is the factors' initialization
(``default``: PyTorch's ``nn.Linear`` init; ``gaussian``: ``N(0, 1/code_dim)``;
``orthogonal``), with ``+lr`` for the adjusted learning rate; ``plain`` is ``L = 0``.

Measured at log-spaced steps: the codes' singular values and ranks on the training set
(:class:`telescope.lens.CodeRank`: numerical rank at ``rank_rtol``, effective rank), and the
*gain matrix* of the reconstruction on the data's modes, the least-squares fit of the
reconstruction's mode coordinates ``X_hat V`` on the data's ``X V``,

    G = (V^T X^T X V)^{-1} V^T X^T X_hat V        (r x r; V: the data's directions),

``G = V^T M^T V`` for a linear network with end-to-end map ``M`` (``x_hat = M x``); it goes
from about 0 to the identity as the modes are learned. ``gain_k = G_kk`` is the gain of mode
``k`` and its *learning step* the first measured step where ``gain_k > learned_gain`` (for
distinct singular values; a flat prior has no preferred basis, so its per-mode steps mean
little). The *learned rank* is basis-free: the number of singular values of ``G`` above
``learned_gain``. For the linear network, ``pca_distance = ||(M - V V^T) V||_F / sqrt(r)``
compares the learned map with the closed-form optimum, the rank-``r`` projection onto the
data's principal subspace (Baldi & Hornik, 1989); it is 0 at convergence (with
``data.noise > 0`` the data are full rank: the optimum is then the top-``code_dim`` principal
projection and ``pca_distance`` only compares it on the signal subspace, where it is the
identity up to the noise).

Presets: ``quick`` (``r = 4`` in ``R^32``, ``n = 256``, ``s_1 / s_r = 8``, flat and geometric
priors, ``L`` in 0, 1, 2, 4, 8, the four methods ``default``, ``gaussian``, ``orthogonal``,
``orthogonal+lr``, 2000 steps at ``lr = 4``, 3 seeds; about a minute of one CPU core) and
``full`` (``r = 8`` in ``R^64``, ``n = 512``, ``s_1 / s_r = 16``, four priors, ``L`` up to 16,
20000 steps, 5 seeds: 470 points of about 10-40 s each on one CPU core; use ``--workers``).

Rows: one per point and measured step, with the point's keys (``case``, ``profile``,
``method``, ``depth``, ``seed``). Figures: ``autoencoder_rank_staircase`` (C1, C3),
``autoencoder_rank_depth`` (C2, C3), ``autoencoder_rank_nonlinear`` (C4).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt

from telescope import plotting as fg
from telescope.data import low_rank_data
from telescope.data.low_rank import PROFILES
from telescope.errors import UsageError
from telescope.lens import CodeRank
from telescope.models import LinearBottleneckAutoencoder
from telescope.models.autoencoder import AUTOENCODER_INITS
from telescope.studies.base import Progress, Study, check_device, resolve_device
from telescope.studies.constraints import (
    NonEmpty,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
)
from telescope.train import fit, log_spaced_steps

__all__ = ["AutoencoderRankConfig", "LowRankDataConfig", "NonlinearCase", "PRESETS", "points",
           "run_point", "figures", "headline", "mode_steps", "STUDY"]

PLAIN = "plain"
#: A run has converged to the closed form when its learned rank is r and pca_distance < this.
CONVERGED = 1e-2
_METHOD = re.compile(r"^(?P<init>[a-z]+)(?P<lr>\+lr)?$")


# --------------------------------------------------------------------------- config


@config_dataclass
class LowRankDataConfig:
    """The synthetic data (:func:`telescope.data.low_rank_data`)."""

    n_train: PositiveInt = 256
    d: PositiveInt = 32
    rank: PositiveInt = 4                             # the ground-truth latent rank r
    condition: Annotated[float, Ge(1)] = 8.0          # s_1 / s_r of the decaying profiles
    noise: NonNegativeFloat = 0.0


@config_dataclass
class NonlinearCase:
    """The nonlinear autoencoder (C4): MLP encoder and decoder around the sub-network; empty
    ``depths`` skips it."""

    depths: tuple[NonNegativeInt, ...] = (0, 4)
    methods: tuple[str, ...] = ("default", "orthogonal+lr")
    hidden: NonEmpty[PositiveInt] = (64,)
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    profile: str = "geometric"
    lr: PositiveFloat = 4.0
    steps: PositiveInt = 3000


@config_dataclass
class AutoencoderRankConfig:
    """Config of ``autoencoder-rank``; e.g. ``--set depths=0,2,8 methods=gaussian,orthogonal+lr
    profiles=geometric``."""

    data: LowRankDataConfig = field(default_factory=LowRankDataConfig)
    profiles: tuple[str, ...] = ("flat", "geometric")   # spectral priors (PROFILES)
    depths: NonEmpty[NonNegativeInt] = (0, 1, 2, 4, 8)
    methods: tuple[str, ...] = ("default", "gaussian", "orthogonal", "orthogonal+lr")
    code_dim: PositiveInt = 16
    io_scale: PositiveFloat = 0.05                    # encoder/decoder init scale (small init)
    lr: PositiveFloat = 4.0
    steps: PositiveInt = 2000
    evals: PositiveInt = 36                           # log-spaced measurement steps
    rank_rtol: Annotated[float, Ge(0), Lt(1)] = 0.05  # code numerical rank: s_i > rtol * s_1
    learned_gain: Annotated[float, Gt(0), Lt(1)] = 0.5   # a mode is learned once g_k > this
    showcase_depth: NonNegativeInt = 4                # the depth of the staircase figure
    nonlinear: NonlinearCase = field(default_factory=NonlinearCase)
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"
    seeds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for key, values in (("profiles", self.profiles), ("methods", self.methods)):
            if not values:
                raise UsageError(f"{key} must name at least one value")
        _check_methods("methods", self.methods)
        _check_methods("nonlinear.methods", self.nonlinear.methods)
        for key, profiles in (("profiles", self.profiles),
                              ("nonlinear.profile", (self.nonlinear.profile,))):
            bad = [p for p in profiles if p not in PROFILES]
            if bad:
                raise UsageError(f"{key} must name profiles among {', '.join(PROFILES)}; got "
                                 f"{', '.join(map(repr, bad))}")
        for key, values in (("profiles", self.profiles), ("depths", self.depths),
                            ("methods", self.methods), ("nonlinear.depths", self.nonlinear.depths),
                            ("nonlinear.methods", self.nonlinear.methods)):
            if len(set(values)) != len(values):
                raise UsageError(f"{key} must not repeat a value, got {values}")
        d = self.data
        if d.d < d.rank:
            raise UsageError(f"data.d={d.d} must be >= data.rank={d.rank}")
        if d.n_train <= d.rank:
            raise UsageError(f"data.n_train={d.n_train} must be > data.rank={d.rank}")
        if self.code_dim < d.rank:
            raise UsageError(f"code_dim={self.code_dim} must be >= data.rank={d.rank} (the "
                             f"codes must have room for the latent rank)")
        check_device("device", self.device)


def _check_methods(key: str, methods: tuple[str, ...]) -> None:
    for m in methods:
        match = _METHOD.match(m)
        if match is None or match["init"] not in AUTOENCODER_INITS:
            raise UsageError(f"{key}: {m!r} is not a method; write <init> or <init>+lr with "
                             f"<init> one of {', '.join(AUTOENCODER_INITS)} (e.g. "
                             f"orthogonal+lr)")


def _parse_method(method: str) -> tuple[str, bool]:
    """``(init, adjust_lr)`` of a method name (``plain``: no factors, nothing to choose)."""
    if method == PLAIN:
        return "orthogonal", False
    match = _METHOD.match(method)
    assert match is not None
    return match["init"], bool(match["lr"])


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {},
    "full": {"data.n_train": 512, "data.d": 64, "data.rank": 8, "code_dim": 32,
             "data.condition": 16.0, "profiles": ("flat", "linear", "power", "geometric"),
             "depths": (0, 1, 2, 4, 8, 16),
             "methods": ("default", "gaussian", "orthogonal", "orthogonal+lr"),
             "steps": 20000, "evals": 60, "nonlinear.depths": (0, 2, 4, 8),
             "nonlinear.methods": ("default", "gaussian", "orthogonal+lr"),
             "nonlinear.hidden": (128,), "nonlinear.steps": 20000, "seeds": 5},
}


# --------------------------------------------------------------------------- sweep


def _case_points(case: str, profiles: tuple[str, ...], depths: tuple[int, ...],
                 methods: tuple[str, ...], seeds: range) -> list[dict]:
    out = []
    for profile in profiles:
        for depth in depths:
            for method in ((PLAIN,) if depth == 0 else methods):
                out += [{"case": case, "profile": profile, "method": method,
                         "depth": int(depth), "seed": s} for s in seeds]
    return out


def points(config: AutoencoderRankConfig) -> list[dict]:
    """The linear sweep (profile x depth x method, ``plain`` once at depth 0) and the nonlinear
    one (depth x method on ``nonlinear.profile``), every seed."""
    seeds = range(config.seed, config.seed + config.seeds)
    nl = config.nonlinear
    return (_case_points("linear", config.profiles, config.depths, config.methods, seeds)
            + _case_points("nonlinear", (nl.profile,), nl.depths, nl.methods, seeds))


# --------------------------------------------------------------------------- one point


def run_point(config: AutoencoderRankConfig, point: dict, progress: Progress) -> list[dict]:
    """Train one autoencoder by full-batch gradient descent; rows at the log-spaced steps with
    the codes' ranks and singular values, the per-mode gains and the learned rank."""
    start = time.perf_counter()
    nonlinear = point["case"] == "nonlinear"
    nl, d = config.nonlinear, config.data
    seed, depth = int(point["seed"]), int(point["depth"])
    init, adjust = _parse_method(point["method"])
    device, dtype = resolve_device(config.device), getattr(torch, config.dtype)
    data = low_rank_data(d.n_train, 0, d.d, d.rank, profile=point["profile"],
                         condition=d.condition, noise=d.noise, seed=seed, dtype=dtype)
    x = data.x_train.to(device)
    v = data.meta["components"].to(device=device, dtype=dtype)          # [d, r]
    model = LinearBottleneckAutoencoder(
        d.d, config.code_dim, depth, nonlinear=nonlinear, hidden=nl.hidden,
        activation=nl.activation, init=init, io_scale=config.io_scale,
        generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    lr, steps = (nl.lr, nl.steps) if nonlinear else (config.lr, config.steps)
    opt = torch.optim.SGD(model.param_groups(lr, adjust_lr=adjust))
    lens = CodeRank(model, x, rtol=config.rank_rtol, n_values=config.code_dim)
    proj = x @ v                                                       # [n, r]
    gram = proj.T @ proj
    r = d.rank

    def evaluate(m: torch.nn.Module) -> dict:
        x_hat = m(x)
        gain = torch.linalg.solve(gram, proj.T @ (x_hat @ v))            # G, [r, r]
        out: dict[str, Any] = {f"gain_{k + 1}": float(gain[k, k]) for k in range(r)}
        out["learned_rank"] = int((torch.linalg.svdvals(gain) > config.learned_gain).sum())
        out["recon_mse"] = float(F.mse_loss(x_hat, x))
        out["pca_distance"] = (math.nan if nonlinear else float(
            torch.linalg.norm(model.end_to_end() @ v - v) / math.sqrt(r)))
        return out

    history = fit(model, opt, x, x, steps=steps,
                  eval_at=log_spaced_steps(steps, config.evals, zero=True), evaluate=evaluate,
                  callbacks=[lens], on_nonfinite="stop", progress=progress)
    diverged = history.diverged_at is not None
    rows = [{**point, **row, "diverged": diverged, "seconds": math.nan} for row in history.rows]
    rows[-1]["seconds"] = time.perf_counter() - start
    return rows


# --------------------------------------------------------------------------- analysis


def mode_steps(df: pd.DataFrame, config: AutoencoderRankConfig) -> pd.DataFrame:
    """One row per run (case, profile, method, depth, seed): ``t_k`` (the first measured step
    with ``gain_k > learned_gain``, NaN if never), ``rank_step_k`` (the first with a learned
    rank ``>= k``), ``final_learned_rank``, ``final_code_rank``,
    ``final_effective_rank``, ``final_pca_distance``, ``diverged``, ``in_order`` (the learned
    modes' steps do not decrease with ``k``: learned in the order of the data's singular
    values) and ``strict_order`` (they increase)."""
    keys = ["case", "profile", "method", "depth", "seed"]
    r = config.data.rank
    out = []
    for key, g in df.groupby(keys, sort=False):       # in the order of the points
        g = g.sort_values("step")
        row = dict(zip(keys, key, strict=True))
        for k in range(1, r + 1):
            col = f"gain_{k}"
            hit = g.loc[g[col] > config.learned_gain, "step"] if col in g else pd.Series([])
            row[f"t_{k}"] = float(hit.iloc[0]) if len(hit) else math.nan
        for k in range(1, r + 1):
            hit = g.loc[g["learned_rank"] >= k, "step"]
            row[f"rank_step_{k}"] = float(hit.iloc[0]) if len(hit) else math.nan
        last = g.iloc[-1]
        row.update(final_learned_rank=int(last["learned_rank"]),
                   final_code_rank=int(last["code_numerical_rank"]),
                   final_effective_rank=float(last["code_effective_rank"]),
                   final_pca_distance=float(last["pca_distance"]),
                   diverged=bool(last["diverged"]), last_step=int(last["step"]))
        t = [row[f"t_{k}"] for k in range(1, r + 1)]
        learned = [s for s in t if not math.isnan(s)]
        row["in_order"] = all(a <= b for a, b in zip(learned, learned[1:], strict=False)) and (
            learned == t[:len(learned)])
        row["strict_order"] = row["in_order"] and all(
            a < b for a, b in zip(learned, learned[1:], strict=False))
        out.append(row)
    return pd.DataFrame(out)


def _with_plain(runs: pd.DataFrame, method: str) -> pd.DataFrame:
    """The runs of ``method`` with the ``plain`` (L = 0) runs counted as its depth 0."""
    return runs[(runs["method"] == method) | (runs["method"] == PLAIN)]


def _methods(runs: pd.DataFrame) -> list[str]:
    return [m for m in dict.fromkeys(runs["method"]) if m != PLAIN]


def _range_text(values: pd.Series) -> str:
    lo, hi = int(values.min()), int(values.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _step_text(values: pd.Series) -> str:
    """Learning steps over seeds: the median, or ``never`` (and how many seeds never did)."""
    missing = int(values.isna().sum())
    if missing == len(values):
        return "never"
    text = f"{float(np.nanmedian(values)):.0f}"
    return text + (f" ({missing} of {len(values)} seeds never)" if missing else "")


# --------------------------------------------------------------------------- figures


def _showcase_profile(config: AutoencoderRankConfig, profiles: list[str]) -> str:
    for p in ("geometric", "power", "linear"):
        if p in profiles:
            return p
    return profiles[0]


def _log_steps(steps: pd.Series) -> pd.Series:
    """Steps on a log axis: step 0 (the initialization) drawn at 0.5."""
    return steps.astype(float).where(steps > 0, 0.5)


def _learning_marks(ax, runs: pd.DataFrame, r: int) -> None:
    for k in range(1, r + 1):
        t = runs[f"t_{k}"].median()
        if not math.isnan(t):
            ax.axvline(max(t, 1.0), color=fg.color_cycle(k - 1), lw=0.8, ls=":", alpha=0.8)


def figures(df: pd.DataFrame, config: AutoencoderRankConfig, out_dir: Path) -> list[Path]:
    """``autoencoder_rank_staircase`` (C1, C3), ``autoencoder_rank_depth`` (C2, C3),
    ``autoencoder_rank_nonlinear`` (C4); each only when its runs exist (PNG + SVG)."""
    runs = mode_steps(df, config)
    paths = []
    lin = df[df["case"] == "linear"]
    if not lin.empty:
        paths.append(_staircase_figure(lin, runs[runs["case"] == "linear"], config, out_dir))
        paths.append(_depth_figure(runs[runs["case"] == "linear"], config, out_dir))
    nonlin = df[df["case"] == "nonlinear"]
    if not nonlin.empty:
        paths.append(_nonlinear_figure(nonlin, runs[runs["case"] == "nonlinear"], config,
                                       out_dir))
    return paths


def _spectrum_panel(ax, g: pd.DataFrame, config: AutoencoderRankConfig, *,
                    normalized: bool = False) -> float:
    """The codes' singular values of one run over the steps (log-log); returns the smallest
    value the data modes take (the bottom of what the panel must show)."""
    g = g.sort_values("step")
    steps = _log_steps(g["step"])
    top = g["code_sv_1"] if normalized else 1.0
    for i in range(config.code_dim):
        col = f"code_sv_{i + 1}"
        if col not in g:
            break
        color = fg.color_cycle(i) if i < config.data.rank else "0.6"
        ax.plot(steps, g[col] / top, color=color, lw=1.2 if i < config.data.rank else 0.7,
                marker=None, label=f"s_{i + 1}" if i < config.data.rank else None)
    fg.log_axis(ax, "x")
    ax.set_yscale("log")
    cols = [f"code_sv_{i + 1}" for i in range(min(config.data.rank, config.code_dim))]
    modes = (g[cols].div(top, axis=0) if normalized else g[cols]).to_numpy()
    return float(np.nanmin(np.where(modes > 0, modes, np.nan))) if np.any(modes > 0) else 0.0


def _show_from(axes, low: float) -> None:
    """Keep the data modes in view; the other singular values (0 up to rounding for exactly
    low-rank data) may fall below the panel."""
    if low > 0 and math.isfinite(low):
        for ax in axes:
            ax.set_ylim(bottom=low / 3)


def _staircase_figure(lin: pd.DataFrame, runs: pd.DataFrame, config: AutoencoderRankConfig,
                      out_dir: Path) -> Path:
    """C1 and C3. Columns: the plain autoencoder and each method at ``showcase_depth`` on the
    steepest profile run. Top: the codes' singular values over training (first seed; data
    modes in colour, the rest grey; dotted lines: the median step where each mode is learned).
    Bottom: the learned rank and the codes' numerical rank (mean over seeds, min-max band)."""
    profile = _showcase_profile(config, list(dict.fromkeys(lin["profile"])))
    sub = lin[lin["profile"] == profile]
    depths = sorted(set(sub["depth"]) - {0})
    depth = (config.showcase_depth if config.showcase_depth in depths
             else (depths[-1] if depths else 0))
    panels = [(PLAIN, 0)] if (sub["method"] == PLAIN).any() else []
    panels += [(m, depth) for m in _methods(runs) if depth]
    r = config.data.rank
    lows = [math.inf]
    with fg.paper_style():
        fig, axes = fg.new_figure(2, max(1, len(panels)), panel_size=(3.0, 2.5), sharex=True,
                                  sharey="row")
        for j, (method, L) in enumerate(panels):
            g = sub[(sub["method"] == method) & (sub["depth"] == L)]
            rg = runs[(runs["profile"] == profile) & (runs["method"] == method)
                      & (runs["depth"] == L)]
            if g.empty:
                continue
            first = g[g["seed"] == g["seed"].min()]
            ax = axes[0, j]
            lows.append(_spectrum_panel(ax, first, config))
            _learning_marks(ax, rg, r)
            ax.set_title(f"{method}, L = {L}" if L else "plain (L = 0)")
            ax = axes[1, j]
            for col, label, color in (("learned_rank", "learned rank", fg.color_cycle(0)),
                                      ("code_numerical_rank",
                                       f"code rank (s > {config.rank_rtol:g} s_1)",
                                       fg.color_cycle(1))):
                m = g.assign(step=_log_steps(g["step"]))
                fg.plot_mean_spread(ax, m, "step", col, label=label, color=color, marker=None,
                                    drawstyle="steps-post")
            ax.axhline(r, color="0.4", ls="--", lw=0.8)
            fg.log_axis(ax, "x")
            ax.set_xlabel("step")
        _show_from(axes[0], min(lows))
        axes[0, 0].set_ylabel(f"singular values of the codes\n({profile} prior, seed "
                              f"{int(sub['seed'].min())})")
        axes[1, 0].set_ylabel(f"rank (true rank {r} dashed)")
        axes[0, 0].legend(fontsize="small", loc="lower right")
        axes[1, 0].legend(fontsize="small", loc="lower right")
        fg.panel_label(axes[0, 0], "a")
        fg.panel_label(axes[1, 0], "b")
        return fg.save_figure(fig, out_dir, "autoencoder_rank_staircase")


def _depth_figure(runs: pd.DataFrame, config: AutoencoderRankConfig, out_dir: Path) -> Path:
    """C2 and C3. One column per spectral prior. Top: the learned rank at the end of the budget
    against the depth ``L`` for each method (mean over seeds, min-max band; dashed: the true
    rank; diverged runs are left out and marked by an ``x`` at 0). Bottom: the step where the
    learned rank reaches ``r`` against ``L`` (median over the seeds, a seed that never reaches
    it counting as infinitely late; a hollow marker above the budget line: the median seed did
    not reach it within the budget)."""
    profiles = list(dict.fromkeys(runs["profile"]))
    r, steps = config.data.rank, config.steps
    with fg.paper_style():
        fig, axes = fg.new_figure(2, len(profiles), panel_size=(3.0, 2.5), sharex=True,
                                  sharey="row")
        for j, profile in enumerate(profiles):
            pr = runs[runs["profile"] == profile]
            for i, method in enumerate(_methods(pr)):
                m = _with_plain(pr, method).assign(x=lambda t: t["depth"] + 1.0)
                color = fg.color_cycle(i)
                ok = m[~m["diverged"].astype(bool)]
                fg.plot_mean_spread(axes[0, j], ok, "x", "final_learned_rank", label=method,
                                    color=color)
                div = m[m["diverged"].astype(bool)]
                if not div.empty:
                    axes[0, j].plot(sorted(set(div["x"])), [0] * div["x"].nunique(), ls="none",
                                    marker="x", color=color)
                med = (ok.assign(s=ok[f"rank_step_{r}"].fillna(math.inf)).groupby("x")["s"]
                       .median().sort_index())
                med = med.where(np.isfinite(med))
                axes[1, j].plot(med.index, med.to_numpy(), color=color, marker="o",
                                label=method)
                never = med[med.isna()]
                axes[1, j].plot(never.index, [steps * 1.4] * len(never), ls="none",
                                marker="o", mfc="none", color=color)
            axes[0, j].axhline(r, color="0.4", ls="--", lw=0.8)
            axes[0, j].set_title(f"{profile} prior")
            axes[1, j].axhline(steps, color="0.4", ls=":", lw=0.8)
            axes[1, j].set_yscale("log")
            ticks = sorted(set(pr["depth"]))
            for ax in axes[:, j]:
                fg.log_axis(ax, "x", base=2)
                ax.set_xticks([t + 1.0 for t in ticks], [str(t) for t in ticks])
                ax.minorticks_off()
            axes[1, j].set_xlabel("depth L of the linear sub-network")
        axes[0, 0].set_ylabel(f"learned rank at step {steps}")
        axes[1, 0].set_ylabel(f"step the learned rank reaches {r}\n(hollow: not within "
                              f"{steps})")
        axes[0, 0].legend(fontsize="small", loc="lower left")
        fg.panel_label(axes[0, 0], "a")
        fg.panel_label(axes[1, 0], "b")
        return fg.save_figure(fig, out_dir, "autoencoder_rank_depth")


def _nonlinear_figure(df: pd.DataFrame, runs: pd.DataFrame, config: AutoencoderRankConfig,
                      out_dir: Path) -> Path:
    """C4. One column per nonlinear run (plain and each method and depth): the codes' singular
    values relative to the largest over training (first seed; dashed: ``rank_rtol``), and a
    last panel with the final relative spectrum of each (mean over seeds)."""
    combos = [(m, L) for (m, L) in dict.fromkeys(zip(df["method"], df["depth"], strict=True))]
    r = config.data.rank
    with fg.paper_style():
        fig, axes = fg.new_figure(1, len(combos) + 1, panel_size=(2.8, 2.5))
        for j, (method, L) in enumerate(combos):
            g = df[(df["method"] == method) & (df["depth"] == L)]
            first = g[g["seed"] == g["seed"].min()]
            ax = axes[0, j]
            _show_from([ax], min(_spectrum_panel(ax, first, config, normalized=True),
                                 config.rank_rtol))
            _learning_marks(ax, runs[(runs["method"] == method) & (runs["depth"] == L)], r)
            ax.axhline(config.rank_rtol, color="0.4", ls="--", lw=0.8)
            ax.set_title(f"{method}, L = {L}" if L else "plain (L = 0)")
            ax.set_xlabel("step")
        axes[0, 0].set_ylabel("s_i / s_1 of the codes")
        axes[0, 0].legend(fontsize="small", loc="lower left")
        ax = axes[0, -1]
        idx = np.arange(1, config.code_dim + 1)
        for j, (method, L) in enumerate(combos):
            g = df[(df["method"] == method) & (df["depth"] == L)]
            last = g[g["step"] == g.groupby("seed")["step"].transform("max")]
            rel = np.stack([last[f"code_sv_{i}"].to_numpy() / last["code_sv_1"].to_numpy()
                            for i in idx], axis=1).mean(axis=0)
            ax.plot(idx, rel, marker="o", color=fg.color_cycle(j),
                    label=f"{method}, L={L}" if L else "plain")
        ax.axhline(config.rank_rtol, color="0.4", ls="--", lw=0.8)
        ax.axvline(r + 0.5, color="0.4", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("index i")
        ax.set_title("final s_i / s_1")
        ax.legend(fontsize="small")
        fg.panel_label(axes[0, 0], "a")
        fg.panel_label(ax, "b")
        return fg.save_figure(fig, out_dir, "autoencoder_rank_nonlinear")


# --------------------------------------------------------------------------- headline


def _median_step(values: pd.Series) -> float:
    """The median over seeds of a learning step, a seed that never got there counting as
    infinitely late (``inf``: the median seed never did)."""
    return float(np.median(values.fillna(math.inf).to_numpy())) if len(values) else math.nan


def _steps_list(runs: pd.DataFrame, r: int) -> str:
    """``t_1, ..., t_r`` (median over seeds, ``never`` past the budget)."""
    out = []
    for k in range(1, r + 1):
        s = _median_step(runs[f"t_{k}"])
        out.append("never" if s == math.inf else f"{s:.0f}")
    return ", ".join(out)


def _rank_by_depth(m: pd.DataFrame) -> str:
    parts = []
    for depth, g in m.groupby("depth"):
        div = g["diverged"].astype(bool)
        ok = g.loc[~div, "final_learned_rank"]
        text = _range_text(ok) if len(ok) else "-"
        if div.any():
            text += f" ({int(div.sum())} diverged)"
        parts.append(f"L={depth}: {text}")
    return ", ".join(parts)


def headline(df: pd.DataFrame, config: AutoencoderRankConfig) -> dict:
    """Per prior and method (C2, C3): the final learned rank by depth (min-max over seeds,
    diverged runs counted apart), the runs that reach the true rank and those that converge to
    the closed form (learned rank ``r``, ``pca_distance < CONVERGED``; with the median
    ``pca_distance`` at the deepest ``L``), the step where the learned
    rank reaches ``r`` at the shallowest and the deepest ``L`` and, on decaying priors, every
    mode's learning step there; the share of runs learning their modes in the order of the
    data's singular values (C1); the nonlinear codes' ranks
    and their largest singular value beyond ``r`` (C4); and the answer in words."""
    out: dict[str, Any] = {}
    if df.empty:
        return out
    runs = mode_steps(df, config)
    r = config.data.rank
    out["true latent rank"] = r
    lin = runs[runs["case"] == "linear"]
    summary: dict[tuple[str, str], dict[str, Any]] = {}
    for profile in dict.fromkeys(lin["profile"]):
        pr = lin[lin["profile"] == profile]
        for method in _methods(pr):
            m = _with_plain(pr, method)
            key = f"{profile}/{method}"
            out[f"{key}: final learned rank by depth"] = _rank_by_depth(m)
            deep = m[m["depth"] > 0]
            if deep.empty:
                continue
            ok = deep[~deep["diverged"].astype(bool)]
            reached = int((ok["final_learned_rank"] == r).sum())
            out[f"{key}: runs (L > 0) reaching rank {r}"] = f"{reached} of {len(deep)}"
            lo, hi = int(deep["depth"].min()), int(deep["depth"].max())
            steps = tuple(_step_text(ok.loc[ok["depth"] == L, f"rank_step_{r}"])
                          for L in (lo, hi))
            out[f"{key}: step the learned rank reaches {r}, L={lo} -> L={hi}"] = (
                f"{steps[0]} -> {steps[1]}")
            entry: dict[str, Any] = {"ok": reached, "n": len(deep), "lo": lo, "hi": hi,
                                     "steps": steps, "diverged": len(deep) - len(ok)}
            conv = int(((ok["final_learned_rank"] == r)
                        & (ok["final_pca_distance"] < CONVERGED)).sum())
            out[f"{key}: runs (L > 0) converged to the rank-{r} projection"] = (
                f"{conv} of {len(deep)}")
            entry["converged"] = conv
            pca = ok.loc[ok["depth"] == hi, "final_pca_distance"]
            if len(pca):
                out[f"{key}: pca_distance at L={hi} (median)"] = float(pca.median())
            if profile != "flat":
                modes = tuple(_steps_list(ok[ok["depth"] == L], r) for L in (lo, hi))
                out[f"{key}: mode steps t_1..t_{r}, L={lo} | L={hi}"] = " | ".join(modes)
                entry["modes"] = modes
            if entry["diverged"]:
                out[f"{key}: diverged runs"] = entry["diverged"]
            summary[(profile, method)] = entry
    ok_lin = lin[~lin["diverged"].astype(bool)]
    graded = ok_lin[ok_lin["profile"] != "flat"]
    order = None
    if not graded.empty:
        two = graded[graded[[f"t_{k}" for k in range(1, r + 1)]].notna().sum(axis=1) >= 2]
        order = (int(two["in_order"].sum()), len(two))
        out["runs (decaying priors, >= 2 modes learned) learning modes in order of s_k"] = (
            f"{order[0]} of {order[1]}")
    nonlin = runs[runs["case"] == "nonlinear"]
    excess = _excess(df[df["case"] == "nonlinear"], config)
    for (method, depth), g in nonlin.groupby(["method", "depth"], sort=False):
        name = f"nonlinear/{method}, L={depth}" if depth else "nonlinear/plain"
        out[f"{name}: final code rank"] = _range_text(g["final_code_rank"])
        out[f"{name}: final learned rank"] = _range_text(g["final_learned_rank"])
        if (method, depth) in excess:
            out[f"{name}: final s_{r + 1} / s_1 of the codes"] = excess[(method, depth)]
    out["seeds"] = int(df["seed"].nunique())
    out["answer"] = _answer(config, summary, order, nonlin, excess)
    return out


def _excess(df: pd.DataFrame, config: AutoencoderRankConfig) -> dict[tuple[str, int], str]:
    """Per nonlinear (method, depth): the codes' largest singular value beyond the latent rank
    relative to the largest, ``s_{r+1} / s_1`` at the last step, median [min, max] over seeds."""
    col = f"code_sv_{config.data.rank + 1}"
    out: dict[tuple[str, int], str] = {}
    if df.empty or col not in df:
        return out
    last = df[df["step"] == df.groupby(["method", "depth", "seed"])["step"].transform("max")]
    for (method, depth), g in last.groupby(["method", "depth"], sort=False):
        ratio = g[col] / g["code_sv_1"]
        out[(method, int(depth))] = (f"{ratio.median():.3g} [{ratio.min():.3g}, "
                                     f"{ratio.max():.3g}]")
    return out


def _answer(config: AutoencoderRankConfig, summary: dict, order: tuple[int, int] | None,
            nonlin: pd.DataFrame, excess: dict) -> str:
    r = config.data.rank
    parts = []
    if order is not None:
        parts.append(f"C1 (greedy): in {order[0]} of {order[1]} linear runs on decaying priors "
                     f"with two or more modes learned, the modes were learned one at a time in "
                     f"the order of the data's singular values.")
    for (profile, method), e in summary.items():
        text = (f"{profile} prior, {method}: {e['ok']} of {e['n']} runs with L > 0 reached the "
                f"true rank {r} within {config.steps} steps")
        if e["diverged"]:
            text += f" ({e['diverged']} diverged)"
        text += (f", {e['converged']} converged to the rank-{r} projection (pca_distance < "
                 f"{CONVERGED:g})")
        text += (f"; the learned rank reached {r} at step {e['steps'][0]} at L = {e['lo']} and "
                 f"{e['steps'][1]} at L = {e['hi']}")
        if "modes" in e:
            text += (f"; modes learned at steps {e['modes'][0]} (L = {e['lo']}) and "
                     f"{e['modes'][1]} (L = {e['hi']})")
        parts.append(text + ".")
    if not nonlin.empty:
        texts = []
        for (method, depth), g in nonlin.groupby(["method", "depth"], sort=False):
            name = f"{method} L={depth}" if depth else "plain"
            text = (f"{name}: code rank {_range_text(g['final_code_rank'])}, learned rank "
                    f"{_range_text(g['final_learned_rank'])}")
            if (method, depth) in excess:
                text += f", s_{r + 1} / s_1 = {excess[(method, depth)]}"
            texts.append(text)
        parts.append(f"C4, nonlinear autoencoder (latent rank {r}, {config.nonlinear.steps} "
                     f"steps; code rank counts s > {config.rank_rtol:g} s_1): "
                     + "; ".join(texts) + ".")
    return " ".join(parts)


GUIDE = """
Greedy rank learning in autoencoders with a linear sub-network of depth L at the bottleneck
(Sun, Thilak, Littwin, Saremi & Susskind 2021). Data: points on a random r-dimensional subspace
whose singular values follow a *spectral prior* (`flat`: all equal; `geometric`: a constant
ratio, s_1 / s_r = `data.condition`). Full-batch gradient descent from a small encoder/decoder
initialization (`io_scale`), the same encoder and decoder for every depth and method of a seed.
A *method* is how the L factors are initialized (`default`: PyTorch's `nn.Linear` init;
`gaussian`: N(0, 1/width); `orthogonal`), `+lr` the depth-adjusted learning rate
eta / (L s^(2(L-1))) for each factor (our reading of the paper's adjustment, which its abstract
does not spell out: it makes the product of the factors move like one matrix at an orthogonal
initialization). `plain` is L = 0. A mode counts as learned once its reconstruction gain passes
`learned_gain`; the learned rank is the number of singular values of the gain matrix above it.

# Reading the figures

- **autoencoder_rank_staircase** (claims C1, C3): top, the singular values of the codes of
  one run over training, the r data modes in colour; each rises in turn (dotted lines: the
  median step where mode k is learned). Bottom: the learned rank and the codes' numerical rank
  (mean over seeds, min-max band), a staircase up to the true rank (dashed). At step 0 the
  codes are a random linear image of the data, so their numerical rank is the data's; within
  the first steps the first mode outgrows the others and the rank drops before it climbs.
- **autoencoder_rank_depth** (C2, C3): the learned rank at the end of the budget (top; an `x`
  at 0 marks diverged runs, left out of the mean) and the step where the learned rank reaches r
  (bottom; hollow markers: not within the budget) against the depth L, per prior. The default
  initialization makes the product of the factors small, and a Gaussian one spreads its
  singular values: deeper sub-networks learn the small modes later or not at all within the
  budget, more so on the steep prior. Orthogonal factors without the adjusted rate learn every
  mode but at large L overshoot and do not settle (see `pca_distance` in the headline); with
  the adjusted rate every mode is learned at the same step whatever L.
- **autoencoder_rank_nonlinear** (C4): ReLU encoder and decoder around the sub-network: the
  codes' singular values relative to the largest over training and at the end (dashed:
  `rank_rtol`). A nonlinear encoder may spread an r-dimensional latent over more than r linear
  directions of the code, so the codes' numerical rank can exceed r even when the
  reconstruction has learned exactly r modes.

The headline lists, per prior and method, the learned rank by depth (min-max over seeds), how
many runs reached the true rank and how many converged to the closed form: `pca_distance`
compares the linear network's reconstruction map with the rank-r projection onto the data's
principal subspace, its gradient-descent optimum (0 = equal; converged: below 0.01). Everything
is in `results.parquet`: one row per run and measured step.
"""

STUDY = Study(
    name="autoencoder-rank",
    description="autoencoders with a depth-L linear bottleneck learn the latent rank greedily; "
                "depth/prior sensitivity, orthogonal init + LR adjustment (Sun et al. 2021)",
    config_cls=AutoencoderRankConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
)
