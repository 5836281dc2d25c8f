"""``grokking-transformer``: modular addition with a one-layer transformer, through the lenses.

Power et al. (2022) and Nanda et al. (2023, "Progress measures for grokking via mechanistic
interpretability"): a one-layer transformer reads ``a b =`` (:func:`telescope.data.
modular_arithmetic` with ``equals=True``) and predicts ``(a + b) mod p`` from the last token
(cross-entropy over ``p`` classes), trained full batch on a fraction of the ``p^2`` pairs with
AdamW (``betas = (0.9, 0.98)``, weight decay 1). It fits the training pairs early and
generalizes to the held-out pairs only much later. The model is
:class:`telescope.models.TinyTransformer` (1 layer, causal, last-token readout); unlike Nanda et
al.'s it is pre-LN (LayerNorms before attention, MLP and readout) and has biases, which changes the
timing but not the phenomenon.

At every logged step (log-spaced plus a regular grid, so the late grokking phase is sampled too)
a row records:

- train and test cross-entropy and accuracy, and the L2 norm of all parameters;
- :class:`telescope.lens.KernelEvolution` on a fixed subset of ``n_kernel`` training points
  (trace NTK, structured engine): distance of the NTK from its initial value, centered
  kernel-target alignment with the one-hot labels, trace and effective rank;
- :func:`telescope.lens.attention_entropy` per head (on the test pairs);
- :class:`telescope.lens.WeightRank`: norm, stable rank and numerical rank of ``W_t - W_0`` for
  every weight matrix (token embedding, query/key/value/out, MLP in/out, unembedding) and of the
  per-head ``W_QK`` / ``W_VO`` updates;
- *NTK-smoother effective parameters* ``p_train_ntk`` / ``p_test_ntk`` (an approximation, see
  below).

Effective parameters: :class:`telescope.Smoother` tracks ``S_t(x)`` exactly but needs the full
history of optimizer steps and, for AdamW (its weight-space path), a ``[P, n O + 1]`` label
matrix plus ``[m, O, P]`` Jacobians per step. For the quick preset (``P`` = 58k parameters,
``n O`` = 1044 x 59 = 61,596 label columns) that is 3.6e9 numbers of state, ~14 GB, and ~2e14
flops per step: out of reach on any machine this study targets, for a window as well as for the
whole run (the label matrix does not shrink with the window). Instead, at each logged step, the
study reads the effective parameters of the *kernel smoother of the current empirical NTK*: the
ridge regressor ``S(x) = K_t(x, X_k) (K_t(X_k, X_k) + lambda I)^{-1}`` on the ``n_kernel`` fixed
training points (:func:`telescope.kernels.smoother_weights` with ``ridge_convention=
"relative_trace"``), with ``lambda = smoother_ridge * mean diag K_t``, and ``p(I) = n_k / |I|
sum_{x in I} ||S(x)||^2`` (:func:`telescope.kernels.effective_parameters`) on those training
points and on ``n_probe`` test points. It is the effective-parameter count of the
linearized model at step ``t`` refit to convergence, not the telescoping ``p`` of the paper; it
says how many effective parameters the kernel the network has *learned* by step ``t`` would use.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Le, Lt

from telescope import plotting as fg
from telescope.data import modular_arithmetic
from telescope.errors import UsageError
from telescope.kernels import effective_parameters, ntk, smoother_weights
from telescope.kernels.empirical import METHODS
from telescope.lens import AttentionEntropy, KernelEvolution, WeightRank
from telescope.models import TinyTransformer
from telescope.studies.base import Progress, Study, check_device
from telescope.studies.base import resolve_device as _device
from telescope.studies.constraints import (
    NonEmpty,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
)
from telescope.train import fit, log_spaced_steps

# WeightRank matrix names of a one-layer TinyTransformer -> short column names
_MATRICES = {
    "token_embedding.weight": "embed",
    "position_embedding.weight": "pos",
    "blocks.0.attn.query.weight": "wq",
    "blocks.0.attn.key.weight": "wk",
    "blocks.0.attn.value.weight": "wv",
    "blocks.0.attn.out.weight": "wo",
    "blocks.0.mlp.0.weight": "mlp_in",
    "blocks.0.mlp.2.weight": "mlp_out",
    "head.weight": "unembed",
}


@config_dataclass
class GrokkingTransformerConfig:
    """Config of the ``grokking-transformer`` study; ``--set steps=3000``,
    ``--set weight_decays=1,0``."""

    p: Annotated[int, Ge(3)] = 113      # modulus (Nanda et al.: 113)
    # fraction of the p^2 pairs used for training
    train_fraction: Annotated[float, Gt(0), Lt(1)] = 0.3
    d_model: PositiveInt = 128
    n_heads: PositiveInt = 4
    mlp_ratio: PositiveInt = 4          # MLP width = mlp_ratio * d_model (Nanda et al.: 512)
    lr: PositiveFloat = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    # swept; 0 is the no-grokking control
    weight_decays: NonEmpty[NonNegativeFloat] = (1.0, 0.0)
    steps: PositiveInt = 40000          # full-batch AdamW steps
    n_log: Annotated[int, Ge(2)] = 40   # log-spaced logged steps (plus step 0) ...
    n_linear: NonNegativeInt = 40       # ... and this many evenly spaced ones (union)
    n_kernel: Annotated[int, Ge(2)] = 256   # fixed training points of the NTK lenses
    n_probe: PositiveInt = 256          # test points of the NTK-smoother effective parameters
    smoother_ridge: PositiveFloat = 1e-2    # ridge of the NTK smoother, relative to mean diag K
    # numerical rank: singular values > threshold * s_1
    rank_threshold: Annotated[float, Ge(0), Lt(1)] = 0.01
    accuracy: Annotated[float, Gt(0), Le(1)] = 0.99   # "fit" / "grokked" threshold (headline)
    kernel_method: str = "structured"   # telescope.ntk method of the kernel lenses
    device: str = "cpu"                 # "cpu", "cuda", ... or "auto"
    seeds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise UsageError(f"d_model ({self.d_model}) must be a positive multiple of "
                             f"n_heads ({self.n_heads})")
        if self.kernel_method not in METHODS:
            raise UsageError(f"kernel_method must be one of {', '.join(METHODS)}, got "
                             f"{self.kernel_method!r}")
        check_device("device", self.device)


PRESETS = {
    # 1 CPU thread: d_model 128 runs ~11 full-batch steps/s on p = 59 (17k steps ~ 25 min), so
    # the quick preset halves the width (~25-35 steps/s) and triples the learning rate: seed 0
    # fits the training pairs by ~1.5k steps and groks at ~4k (with a transient loss spike
    # around 4.5k at this learning rate, recovered by 5k).
    "quick": {"p": 59, "train_fraction": 0.3, "d_model": 64, "lr": 3e-3,
              "weight_decays": (1.0,), "steps": 5000, "n_log": 30, "n_linear": 25,
              "n_kernel": 128, "n_probe": 128, "seeds": 1},
    # Nanda et al.'s setting (p = 113, d_model 128, 4 heads, MLP 512, lr 1e-3, wd 1), with the
    # wd = 0 control, three seeds; meant for a GPU.
    "full": {"steps": 40000, "seeds": 3, "device": "auto"},
}


def points(config: GrokkingTransformerConfig) -> list[dict]:
    """The sweep: every weight decay for every seed."""
    seeds = range(config.seed, config.seed + config.seeds)
    return [{"weight_decay": float(w), "seed": s} for w in config.weight_decays for s in seeds]


def _param_norm(model: torch.nn.Module) -> float:
    return float(torch.sqrt(sum((p.detach() ** 2).sum() for p in model.parameters())))


def _short(name: str, kind: str, head: int) -> str:
    if kind == "weight":
        return _MATRICES.get(name, name.replace(".weight", "").replace(".", "_"))
    return f"{kind}_h{head}"


def _errors(model: torch.nn.Module, data) -> dict:
    """Train/test cross-entropy and accuracy, and the parameter norm."""
    row: dict = {}
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        out = model(x)
        row[f"{split}_loss"] = float(F.cross_entropy(out, y))
        row[f"{split}_acc"] = float((out.argmax(1) == y).float().mean())
    row["weight_norm"] = _param_norm(model)
    return row


class _NTKSmoother:
    """NTK-smoother effective parameters (see the module docstring), after ``ke`` measured:
    ``S = K_*x (K + lambda I)^-1`` with ``lambda = ridge * mean diag K``."""

    def __init__(self, ke: KernelEvolution, x_probe: torch.Tensor, ridge: float) -> None:
        self.ke, self.x_probe, self.ridge = ke, x_probe, ridge

    def measure(self, state) -> dict:
        k_tt = self.ke.kernel.detach().double()
        k_pt = ntk(state.model, self.x_probe, self.ke.x, output="trace",
                   method=self.ke.method).detach().double()
        s_test, s_train = smoother_weights(k_tt, k_pt, ridge=self.ridge,
                                           ridge_convention="relative_trace", return_train=True)
        return {"p_train_ntk": effective_parameters(s_train),
                "p_test_ntk": effective_parameters(s_test)}


def _wide(entropy: list[dict], ranks: list[dict]) -> dict:
    """One step's attention entropies and weight-update ranks as columns."""
    row: dict = {}
    for r in entropy:
        layer = r["layer"].replace("blocks.", "l").replace(".attn", "")
        row[f"entropy_{layer}_h{r['head']}"] = float(r["normalized"])
    for r in ranks:
        key = _short(r["matrix"], r["kind"], r["head"])
        row[f"dnorm_{key}"] = float(r["delta_norm"])
        row[f"srank_{key}"] = float(r["stable_rank"])
        row[f"rank_{key}"] = int(r["rank"])
    for kind in ("qk", "vo"):   # head averages, for the figure and headline
        heads = [r for r in ranks if r["kind"] == kind]
        if heads:
            row[f"srank_{kind}"] = float(np.mean([r["stable_rank"] for r in heads]))
            row[f"rank_{kind}"] = float(np.mean([r["rank"] for r in heads]))
    return row


def run_point(config: GrokkingTransformerConfig, point: dict, progress: Progress) -> list[dict]:
    """Train one (weight decay, seed) full batch, measuring every lens at the logged steps."""
    seed, wd = int(point["seed"]), float(point["weight_decay"])
    device = _device(config.device)
    data = modular_arithmetic(config.p, op="add", train_fraction=config.train_fraction,
                              seed=seed, equals=True).to(device)
    torch.manual_seed(seed)   # TinyTransformer draws its initialization from the global RNG
    model = TinyTransformer(config.p + 1, config.d_model, config.n_heads, 1, 3, config.p,
                            mlp_ratio=config.mlp_ratio, causal=True, readout="last").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=tuple(config.betas),
                            weight_decay=wd)
    n_k = min(config.n_kernel, data.x_train.shape[0])
    y_k = F.one_hot(data.y_train[:n_k], config.p).to(torch.float32)
    ke = KernelEvolution(model, data.x_train[:n_k], y_k, output="trace",
                         method=config.kernel_method)
    lenses = [ke, _NTKSmoother(ke, data.x_test[: config.n_probe], config.smoother_ridge),
              AttentionEntropy(data.x_test), WeightRank(model, threshold=config.rank_threshold)]
    history = fit(model, opt, data.x_train, data.y_train, steps=config.steps,
                  loss="cross_entropy", evaluate=lambda m: _errors(m, data), callbacks=lenses,
                  eval_at=log_spaced_steps(config.steps, config.n_log, linear=config.n_linear,
                                           zero=True),
                  progress=progress)
    entropy, ranks = history.table_by_step("entropy"), history.table_by_step("WeightRank")
    return [{**point, "step": int(r["step"]),
             **{k: v for k, v in r.items() if k not in ("step", "loss")},
             **_wide(entropy.get(r["step"], []), ranks.get(r["step"], []))}
            for r in history.rows]


# ---- headline and figures ------------------------------------------------------------------


def first_step(sub: pd.DataFrame, col: str, level: float) -> float:
    """First logged step of one run with ``col >= level`` (NaN if never)."""
    s = sub.sort_values("step")
    hit = s.loc[s[col] >= level, "step"]
    return float(hit.iloc[0]) if len(hit) else math.nan


def _runs(df: pd.DataFrame):
    for (wd, seed), sub in df.groupby(["weight_decay", "seed"], sort=True):
        yield float(wd), int(seed), sub.sort_values("step")


def _at(sub: pd.DataFrame, step: float, col: str) -> float:
    """``col`` at the logged step nearest ``step`` (NaN if the column or the step is missing)."""
    if col not in sub or not math.isfinite(step):
        return math.nan
    i = (sub["step"] - step).abs().idxmin()
    return float(sub.loc[i, col])


def run_events(sub: pd.DataFrame, accuracy: float) -> dict:
    """Per run: train-fit and grokking steps, the delay, and the largest kernel-distance jump."""
    fit = first_step(sub, "train_acc", accuracy)
    grok = first_step(sub, "test_acc", accuracy)
    out = {"fit": fit, "grok": grok,
           "delay": grok - fit if math.isfinite(fit) and math.isfinite(grok) else math.nan,
           "ratio": grok / fit if math.isfinite(fit) and math.isfinite(grok) and fit > 0
           else math.nan}
    jump = math.nan
    if "kernel_distance" in sub and len(sub) > 1:
        s = sub[sub["step"] > 0]
        d = s["kernel_distance"].diff()
        if d.notna().any():
            jump = float(s.loc[d.idxmax(), "step"])
    out["kd_jump"] = jump
    return out


_MOMENT_COLS = {
    "test accuracy": "test_acc",
    "weight norm": "weight_norm",
    "kernel distance": "kernel_distance",
    "kernel-target alignment": "kernel_target_alignment",
    "kernel effective rank": "kernel_effective_rank",
    "p_train (NTK smoother)": "p_train_ntk",
    "p_test (NTK smoother)": "p_test_ntk",
    "stable rank W_QK update": "srank_qk",
    "stable rank W_VO update": "srank_vo",
    "stable rank embedding update": "srank_embed",
    "stable rank MLP-in update": "srank_mlp_in",
    "stable rank MLP-out update": "srank_mlp_out",
    "stable rank unembedding update": "srank_unembed",
}


def headline(df: pd.DataFrame, config: GrokkingTransformerConfig) -> dict:
    """Per weight decay (mean over seeds): step train accuracy reaches ``accuracy``, step test
    accuracy does (grokking), the delay, and the lenses at train fit / grokking / the end."""
    out: dict = {}
    ent_cols = [c for c in df.columns if c.startswith("entropy_")]
    for wd, wdf in df.groupby("weight_decay", sort=False):
        tag = f"wd={wd:g}"
        events, moments = [], {"fit": {}, "grok": {}, "end": {}}
        for _, _, sub in _runs(wdf):
            ev = run_events(sub, config.accuracy)
            events.append(ev)
            sub = sub.assign(entropy_mean=sub[ent_cols].mean(axis=1) if ent_cols else math.nan)
            for moment, step in (("fit", ev["fit"]), ("grok", ev["grok"]),
                                 ("end", float(sub["step"].max()))):
                for label, col in {**_MOMENT_COLS, "attention entropy (normalized, mean "
                                   "head)": "entropy_mean"}.items():
                    moments[moment].setdefault(label, []).append(_at(sub, step, col))
        ev = pd.DataFrame(events)
        pct = f"{100 * config.accuracy:g}%"
        out[f"{tag}: step train acc {pct}"] = float(ev["fit"].mean())
        out[f"{tag}: step test acc {pct} (grokking)"] = float(ev["grok"].mean())
        out[f"{tag}: grokking delay (steps)"] = float(ev["delay"].mean())
        out[f"{tag}: grok step / fit step"] = float(ev["ratio"].mean())
        out[f"{tag}: runs grokked"] = f"{int(ev['grok'].notna().sum())}/{len(ev)}"
        out[f"{tag}: step of largest kernel-distance increase"] = float(ev["kd_jump"].mean())
        final = wdf[wdf["step"] == wdf["step"].max()]
        out[f"{tag}: final test accuracy"] = float(final["test_acc"].mean())
        for moment in ("fit", "grok", "end"):
            for label, vals in moments[moment].items():
                if label == "test accuracy" and moment != "fit":
                    continue
                vals = [v for v in vals if math.isfinite(v)]
                if vals:
                    out[f"{tag}: {label} at {moment}"] = float(np.mean(vals))
    return out


def _vlines(ax, fit: float, grok: float) -> None:
    if math.isfinite(fit):
        ax.axvline(fit, color=fg.COLORS["train"], linestyle=":", linewidth=1.0)
    if math.isfinite(grok):
        ax.axvline(grok, color="#444444", linestyle="--", linewidth=1.0)


def figures(df: pd.DataFrame, config: GrokkingTransformerConfig, out_dir: Path) -> list[Path]:
    """One 2x4 figure per weight decay, shared log-step axis, lines at train fit and grokking."""
    paths = []
    ent_cols = sorted(c for c in df.columns if c.startswith("entropy_"))
    rank_cols = [(c, lab) for c, lab in (("srank_embed", "embedding"), ("srank_qk", "W_QK"),
                                         ("srank_vo", "W_VO"), ("srank_mlp_in", "MLP in"),
                                         ("srank_mlp_out", "MLP out"),
                                         ("srank_unembed", "unembedding"))
                 if c in df.columns]
    for wd, wdf in df.groupby("weight_decay", sort=False):
        ev = pd.DataFrame([run_events(sub, config.accuracy) for _, _, sub in _runs(wdf)])
        fit, grok = float(ev["fit"].mean()), float(ev["grok"].mean())
        sub = wdf[wdf["step"] > 0]
        with fg.paper_style():
            fig, axes = fg.new_figure(2, 4, sharex=True)
            panels = [
                ("accuracy", [("train_acc", "train", fg.COLORS["train"]),
                              ("test_acc", "test", fg.COLORS["test"])], False),
                ("cross-entropy", [("train_loss", "train", fg.COLORS["train"]),
                                   ("test_loss", "test", fg.COLORS["test"])], True),
                ("parameter norm", [("weight_norm", "||theta||", fg.color_cycle(2))], False),
                ("NTK vs its initial value", [
                    ("kernel_distance", "kernel distance", fg.color_cycle(3)),
                    ("kernel_target_alignment", "target alignment", fg.color_cycle(4))], False),
                ("NTK-smoother eff. parameters", [
                    ("p_train_ntk", "p_train", fg.COLORS["p_train"]),
                    ("p_test_ntk", "p_test", fg.COLORS["p_test"])], False),
                ("attention entropy / max", [(c, c.replace("entropy_", ""), fg.color_cycle(i))
                                             for i, c in enumerate(ent_cols)], False),
                ("stable rank of W_t - W_0", [(c, lab, fg.color_cycle(i))
                                              for i, (c, lab) in enumerate(rank_cols)], False),
                ("NTK effective rank", [("kernel_effective_rank", "eff. rank",
                                         fg.color_cycle(5))], False),
            ]
            for i, (title, lines, logy) in enumerate(panels):
                ax = axes[i // 4, i % 4]
                for col, label, color in lines:
                    if col in sub and sub[col].notna().any():
                        fg.plot_mean_spread(ax, sub, "step", col, label=label, color=color,
                                            marker=None)
                fg.log_axis(ax, "x")
                if logy:
                    fg.log_axis(ax, "y")
                _vlines(ax, fit, grok)
                ax.set_title(title)
                if i >= 4:
                    ax.set_xlabel("step")
                if lines:
                    ax.legend(fontsize=6)
                fg.panel_label(ax, "abcdefgh"[i])
            fig.suptitle(f"modular addition p={config.p}, weight decay {wd:g}: dotted = train "
                         f"acc {100 * config.accuracy:g}%, dashed = test acc "
                         f"{100 * config.accuracy:g}%")
            paths.append(fg.save_figure(fig, out_dir, f"grokking_transformer_wd{wd:g}"))
    return paths


GUIDE = """
Grokking of modular addition `(a + b) mod p` by a one-layer transformer (Power et al. 2022; Nanda
et al. 2023), full-batch AdamW with weight decay, cross-entropy, inputs `a b =`, readout at `=`.
One figure per weight decay (`grokking_transformer_wd1`, ...), all panels on a shared log step
axis; the dotted line marks the step where train accuracy first reaches 99 %, the dashed line
the step where test accuracy does (grokking), both averaged over seeds.

- **a, b**: accuracy and cross-entropy on the training and held-out pairs: the network fits the
  training pairs early, the test accuracy jumps much later.
- **c**: L2 norm of all parameters; weight decay shrinks it while the memorizing solution is
  replaced by the generalizing one.
- **d**: distance of the empirical NTK (trace, on a fixed subset of training points) from its
  initial value, and its centered alignment with the one-hot labels.
- **e**: effective parameters of the kernel smoother of the current NTK (ridge regression with
  `K_t` on the fixed training subset, ridge relative to its mean diagonal) on those training
  points and on test points. An approximation: the exact telescoping smoother of the paper
  (`telescope.Smoother`) would need a parameters-by-(n x classes) state, far beyond this
  machine; see the module docstring.
- **f**: attention entropy per head, divided by its maximum (uniform attention = 1).
- **g**: stable rank `||D||_F^2 / ||D||_2^2` of the updates `D = W_t - W_0` of the embedding, the
  per-head `W_QK` and `W_VO` (mean over heads), the MLP and the unembedding matrices. Nanda et al.
  find the generalizing circuit uses a few Fourier frequencies: low-rank embeddings.
- **h**: entropy effective rank of the NTK.

The headline lists the two steps, the delay, and the lens values at the train-fit step, at the
grokking step and at the end of training. Everything is in `results.parquet`: one row per
(weight decay, seed, logged step), including per-matrix norms and ranks (`dnorm_*`, `srank_*`,
`rank_*`) and per-head entropies.
"""

STUDY = Study(
    name="grokking-transformer",
    description="Grokking of modular addition by a 1-layer transformer (AdamW, weight decay): "
                "accuracy, NTK distance, attention entropy and weight-update ranks by step",
    config_cls=GrokkingTransformerConfig,
    presets=PRESETS,
    points=points,
    run_point=run_point,
    figures=figures,
    headline=headline,
    guide=GUIDE,
)
