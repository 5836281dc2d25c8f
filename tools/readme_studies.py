#!/usr/bin/env python
"""Write the README's "Studies" table from saved quick-preset runs, so that every number in it
comes from a run directory.

Usage (from the repository root)::

    .venv/bin/python tools/readme_studies.py out/studies            # rewrite
    .venv/bin/python tools/readme_studies.py out/studies --check    # compare only

``RUNS_DIR`` holds one finished run directory per study, named after the study
(``RUNS_DIR/double-descent/``, ...; each with ``results.parquet``, ``config.json`` and
``run.json``, as ``telescope study NAME --preset quick --out RUNS_DIR/NAME`` writes them). The
part of the README between the marker lines ``<!-- studies:begin -->`` and
``<!-- studies:end -->`` is replaced by a table with one row per study in :data:`STUDIES` and a
footnote:

- *what it shows*: a sentence built from the study's own headline numbers
  (``get_study(name).headline(df, config)`` on the saved results, the config rebuilt from
  ``config.json`` by ``config_from_dict``), by the per-study function in :data:`FORMATTERS`.
  Numbers are printed with :func:`num` (integers as such, others to 3 significant digits,
  shares as percentages) and, where several seeds were run, the sentence says that they are
  means over that many seeds together with whatever spread the headline gives (e.g. "in 3 of
  5 seeds"); with one seed it says "one seed". A run whose config is not the current quick
  preset says so in its row and lists the settings that differ.
- *quick wall time*: the seconds of the run's sessions that computed points (``run.json``
  ``sessions``); where such a session recorded no time (it was killed and the run resumed), the
  sum of the points' own seconds (``point_seconds``) instead, marked ``*``.
- the footnote: the machine (``versions.machine`` of the computing sessions, else
  ``versions.platform``), how the runs were made (executor and ``--threads`` from each computing
  session's ``executor`` / ``argv``), how many of the runs overlapped in time with another run in
  ``RUNS_DIR``, and the commits that computed them.

``ntk-double-descent`` is answered by the section that ``tools/readme_results.py`` writes; its
row only points there. A study whose run directory is missing, unfinished or unreadable gets no
row and a warning on stderr.

``--check`` writes nothing and exits 1 if the README differs from what the runs give (printing a
diff) or if a study's run is missing (naming it); 2 on a usage error (no ``RUNS_DIR``, no
markers).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
import textwrap
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from telescope.errors import TelescopeError, UsageError
from telescope.studies import get_study, make_config
from telescope.studies.config import config_from_dict, flatten_config

BEGIN = "<!-- studies:begin -->"
END = "<!-- studies:end -->"
WIDTH = 100
ANSWERED_ABOVE = "ntk-double-descent"
# the table's rows, in this order (the answered question first)
STUDIES = (ANSWERED_ABOVE, "toy", "approximation", "double-descent", "grokking",
           "trees-vs-nets", "mode-connectivity", "grokking-transformer", "entropy-collapse",
           "rank-growth", "slingshot", "lazy-regime", "ntk-width", "hypernetwork-ntk",
           "collegial-ensembles", "bottleneck", "autoencoder-rank", "neural-fisher-kernel")
PRESET = "quick"
FILES = ("results.parquet", "config.json", "run.json")
DEFAULT_THREADS = ("Default threads: torch's thread count is `OMP_NUM_THREADS` if set, else the "
                   "CPUs the process may use. ")
SLACK = timedelta(seconds=2)   # overlaps shorter than this are the timestamps' rounding


class RunProblem(Exception):
    """A study's run cannot give a row (missing, unfinished, unreadable); the message says why."""


# --------------------------------------------------------------------------- numbers


def num(x: Any) -> str:
    """A headline number as the table prints it: integers (and integer-valued floats) as
    integers, other numbers to 3 significant digits, ``n/a`` for a missing or NaN value."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.3g}"


def pct(x: float) -> str:
    """A share as a percentage: ``0.2`` -> ``20 %``."""
    return f"{100 * float(x):.3g} %"


def step(x: Any) -> str:
    """A step of the headline; NaN (the event was not reached) reads "never"."""
    return "never" if x is None or (isinstance(x, float) and math.isnan(x)) else num(x)


def seeds_note(n: int | None, spread: str = "") -> str:
    """``one seed``, or ``means over N seeds`` and the spread the headline gives."""
    if n is None:
        return "seeds not recorded"
    if n == 1:
        return "one seed"
    return f"means over {n} seeds" + (f", {spread}" if spread else " (the headline gives no "
                                                                    "spread)")


def _trend(a: float, b: float) -> str:
    return "rises" if b > a else "falls" if b < a else "stays"


# --------------------------------------------------------------------------- per study


class Row(NamedTuple):
    """What a formatter returns: the sentence, and the seed count and spread it reports."""

    text: str
    spread: str = ""


def _matches(h: dict, pattern: str) -> list[tuple[re.Match, Any]]:
    """``(match, value)`` of the headline keys that match ``pattern``, in headline order."""
    out = []
    for key, value in h.items():
        m = re.fullmatch(pattern, key)
        if m:
            out.append((m, value))
    return out


def _toy(h: dict, c) -> Row:
    d = c.data
    return Row(f"NTK kernel ridge regression on a noisy teacher (n {num(d.n_train)}, d "
               f"{num(d.d)}, noise {num(d.noise)}): the converged test MSE is lowest at ridge "
               f"{num(h['best ridge'])} ({num(h['test MSE at best ridge'])}, train MSE "
               f"{num(h['train MSE at best ridge'])}) against "
               f"{num(h['test MSE at smallest ridge'])} at the smallest ridge "
               f"{num(min(c.ridges))}")


def _approximation(h: dict, c) -> Row:
    pairs = [f"{m['opt']} {num(v[0])} vs {num(v[1])}"
             for m, v in _matches(h, r"(?P<opt>.+) \(lr (?P<lr>.+)\): telescoping \| "
                                     r"linearized error")]
    median = h.get("median linearized / telescoping error, all runs")
    tail = (f"; the linearized model is a median {num(median)}x further from the network over "
            f"all runs" if median is not None else "")
    return Row(f"paper Figs 2, 7, 8: mean absolute test-output distance to the network of the "
               f"telescoping vs the linearized model, at each optimizer's largest learning rate "
               f"and last step: {', '.join(pairs)}{tail}")


def _double_descent(h: dict, c) -> Row:
    peak, widest, n = h["peak width"], h["largest width"], h["n_train"]
    if peak == widest:
        shape = (f"test MSE highest at the largest width {num(widest)} "
                 f"({num(h['peak test MSE'])}): no peak inside the sweep")
    else:
        shape = (f"test-MSE peak at width {num(peak)} ({num(h['peak test MSE'])} -> "
                 f"{num(h['test MSE at largest width'])} at width {num(widest)})")
    p_train = (f"`p_train` {num(h['p_train at smallest width'])} at the smallest width, "
               f"{num(h['p_train at peak'])} at the peak, {num(h['p_train at largest width'])} "
               f"at width {num(widest)} (n = {num(n)})")
    p_test = (f"`p_test` {_trend(h['p_test at peak'], h['p_test at largest width'])} from "
              f"{num(h['p_test at peak'])} at the peak to {num(h['p_test at largest width'])}")
    clean = ""
    if "noise-free test MSE at peak width" in h:
        clean = (f"; without label noise the test MSE is "
                 f"{num(h['noise-free test MSE at peak width'])} at width {num(peak)}, "
                 f"{num(h['noise-free test MSE at largest width'])} at width {num(widest)}")
    return Row(f"paper Figs 3, 9: one-hidden-layer ReLU nets, {pct(h['label noise'])} label "
               f"noise: {shape}; {p_train}; {p_test}{clean}")


def _grokking(h: dict, c) -> Row:
    parts = []
    digits = []
    for m, fit in _matches(h, r"digits (?P<s>.+): step train error <= 1%"):
        test = h[f"digits {m['s']}: step test error halfway down"]
        digits.append(f"{m['s'].replace('=', ' ')}: {step(fit)} / {step(test)}")
    if digits:
        parts.append(f"large-init MLP on digits, step where the train error reaches 1 % / the "
                     f"test error is halfway down: {', '.join(digits)}")
    poly, pct_fit = [], "10 %"
    for m, fit in _matches(h, r"polynomial (?P<s>.+): step train MSE < (?P<p>.+) of start"):
        s, pct_fit = m["s"], m["p"].replace("%", " %")
        test = h[f"polynomial {s}: step test MSE < {m['p']} of start"]
        ratio = h[f"polynomial {s}: delay (test step / train step)"]
        poly.append(f"{s.replace('=', ' ')}: {step(fit)} / {step(test)} ({num(ratio)}x)")
    if poly:
        parts.append(f"polynomial task, step where the train / test MSE falls below {pct_fit} "
                     f"of its start: {', '.join(poly)}")
    return Row(f"paper Figs 4, 11-13: {'; '.join(parts) or 'no setting in the headline'}")


def _trees_vs_nets(h: dict, c) -> Row:
    return Row(f"paper Fig 5/14: net vs gradient-boosted trees on test points made irregular "
               f"(fractions 0 to {num(h['largest fraction'])}): test MSE relative to fraction "
               f"0, net / trees, {h['test MSE relative to f=0, net / trees, at largest']} at the "
               f"largest; normalized max kernel weight norm "
               f"{h['normalized max kernel weight norm net (0 -> largest)']} for the net, "
               f"{h['normalized max kernel weight norm trees (0 -> largest)']} for the trees",
               spread=(f"the net's relative increase "
                       f"{num(h['relative increase in MSE difference at largest'])} is "
                       f"positive in {h['seeds with rel_increase > 0 at largest']} seeds"))


def _mode_connectivity(h: dict, c) -> Row:
    drops = [f"{num(v)} at t' = {m['t']}" for m, v in _matches(h, r"t'=(?P<t>.+): accuracy drop")]
    first = h.get("first spawn step with drop <= 1%")
    return Row(f"paper Fig 6: CNN on MNIST-1D, accuracy drop of the weight average of two "
               f"children of one parent spawned at step t': {', '.join(drops)}; first t' with a "
               f"drop <= 1 %: {'none' if first is None else num(first)}; endpoint accuracy "
               f"{num(h['endpoint accuracy (mean)'])}")


def _grokking_transformer(h: dict, c) -> Row:
    parts, runs = [], []
    for m, fit in _matches(h, r"(?P<t>wd=[^:]+): step train acc (?P<p>[^ ]+)"):
        t, p = m["t"], m["p"]
        grok = h[f"{t}: step test acc {p} (grokking)"]
        text = (f"{t.replace('=', ' ')}: train accuracy {p.replace('%', ' %')} at step "
                f"{step(fit)}, test at {step(grok)}")
        if isinstance(grok, float) and math.isfinite(grok):
            text += f" ({num(h[f'{t}: grok step / fit step'])}x)"
        lens = []
        for label, name in (("weight norm", "weight norm"),
                            ("attention entropy (normalized, mean head)", "attention entropy"),
                            ("kernel distance", "kernel distance")):
            vals = [h.get(f"{t}: {label} at {moment}") for moment in ("fit", "grok", "end")]
            if vals[0] is not None:
                lens.append(f"{name} {' -> '.join(num(v) for v in vals if v is not None)}")
        if lens:
            text += f"; {', '.join(lens)} (fit -> grok -> end)"
        text += f"; final test accuracy {num(h[f'{t}: final test accuracy'])}"
        parts.append(text)
        runs.append((t, h[f"{t}: runs grokked"]))
    spread = ", ".join(f"{n} runs grokked" + ("" if len(runs) == 1 else f" at {t}")
                       for t, n in runs)
    return Row(f"modular addition (p {num(c.p)}, {pct(c.train_fraction)} of pairs, AdamW): "
               f"{'; '.join(parts)}", spread=spread)


def _entropy_collapse(h: dict, c) -> Row:
    parts = []
    for m, mean in _matches(h, r"final normalized entropy, mean over heads \((?P<s>.+)\)"):
        s = m["s"]
        low = h.get(f"final normalized entropy, lowest head ({s})")
        loss = h.get(f"final train loss ({s})")
        div = h.get(f"diverged runs ({s})")
        parts.append(f"{s} {num(mean)} (lowest head {num(low)}; final train loss {num(loss)}, "
                     f"{num(div)} diverged runs)")
    return Row(f"Zhai et al. 2023: Adam at lr {num(c.lr)}, no warmup; final normalized "
               f"attention entropy, mean over heads: {', '.join(parts)}")


def _rank_growth(h: dict, c) -> Row:
    parts = []
    for m, top in _matches(h, r"final max rank, vo \((?P<s>.+)\)"):
        s = m["s"]
        steps = h.get(f"steps where vo rank increases ({s})") or []
        parts.append(f"{num(top)} at {s.replace('=', ' ')} (rank rises at "
                     f"{len(steps)} logged steps)")
    return Row(f"Boix-Adsera et al. 2023: final rank of the per-head `M_VO` update (largest "
               f"head) {', '.join(parts)}")


def _slingshot(h: dict, c) -> Row:
    parts = []
    for m, cycles in _matches(h, r"cycles per run \((?P<s>.+)\)"):
        s = m["s"]
        text = (f"{num(cycles)} at {s.replace('=', ' ')} "
                f"({num(h.get(f'loss spikes per run ({s})'))} loss spikes per run")
        share = h.get(f"fraction of cycles with a loss spike ({s})")
        if share is not None:
            text += f", {pct(share)} of cycles with a spike"
        parts.append(text + f"; final norm {num(h.get(f'final last-layer norm ({s})'))})")
    return Row(f"Thilak et al. 2022: Adam on modular addition, last-layer norm cycles per run "
               f"{', '.join(parts)}")


def _lazy_regime(h: dict, c) -> Row:
    gaps = [f"{num(v)} at alpha {m['a']}"
            for m, v in _matches(h, r"\|h_T - h_lin\| at T \(alpha=(?P<a>.+)\)")]
    fit = h.get("gap scaling exponent in alpha (fit, theory -1)")
    two = h.get("gap scaling exponent, two largest alphas")
    alphas = [m["a"] for m, _ in _matches(h, r"\|h_T - h_lin\| at T \(alpha=(?P<a>.+)\)")]
    slope = ""
    if fit is not None and two is not None:
        slope = (f"; exponent in alpha {num(fit)} fitted over all, {num(two)} between alpha "
                 f"{alphas[-2]} and {alphas[-1]} (theory -1)")
    return Row(f"Chizat et al. 2019: gap between an alpha-scaled transformer and its "
               f"linearization at init at step {num(h['step T of the gaps below'])}: "
               f"{', '.join(gaps)}{slope}")


def _ntk_width(h: dict, c) -> Row:
    (m, dist), = _matches(h, r"relative distance to the infinite NTK, width (?P<w>.+)")
    w = m["w"]
    hidden = "-".join(["W"] * c.depth)
    slope = h.get("slope of log distance vs log width")
    inf = h.get("kernel-regression test accuracy, infinite NTK")
    return Row(f"empirical vs infinite-width NTK of ReLU MLPs 40-{hidden}-10 on MNIST-1D, "
               f"widths {num(min(c.widths))} to {num(max(c.widths))}: relative distance "
               f"{num(dist)} at width {w} (slope {num(slope)} in log-log, the fluctuations' "
               f"-1/2), alignment {num(h[f'alignment with the infinite NTK, width {w}'])}; "
               f"kernel-regression test accuracy "
               f"{num(h[f'kernel-regression test accuracy, width {w}'])} at width {w}, "
               f"{num(inf)} with the infinite NTK")


def _collegial_ensembles(h: dict, c) -> Row:
    (lo, low), = _matches(h, r"NTK variance, lowest \(width (?P<w>\d+), m (?P<m>\d+)\)")
    (hi, wide), = _matches(h, r"NTK variance, widest \(width (?P<w>\d+), m (?P<m>\d+)\)")
    (be, best), = _matches(h, r"test error at T, best \(width (?P<w>\d+), m (?P<m>\d+)\)")
    tag_lo, tag_hi = f"width {lo['w']}, m {lo['m']}", f"width {hi['w']}, m {hi['m']}"
    hidden = "-".join(["w"] * c.depth)
    a, b = c.data.classes
    return Row(f"Littwin et al. 2020: at a budget of {num(h['parameter budget'])} parameters "
               f"(m ReLU members in-{hidden}-1, {c.data.name} {a} vs {b}), the NTK varies "
               f"{num(h['variance ratio widest / lowest'])}x less over initializations for "
               f"{lo['m']} members of width {lo['w']} than for one width-{hi['w']} network "
               f"({num(low)} vs {num(wide)}); the trained network's gap to its kernel "
               f"prediction at step {num(h['step T of the training numbers below'])} is "
               f"{num(h[f'gap to the kernel prediction at T ({tag_lo})'])} vs "
               f"{num(h[f'gap to the kernel prediction at T ({tag_hi})'])}; test error "
               f"{num(best)} at width {be['w']} ({be['m']} members) vs "
               f"{num(h[f'test error at T, widest ({tag_hi})'])}, lower in "
               f"{h['seeds where the best width has the lower test error']} seeds",
               spread="variance ratio per seed "
                      f"{h['variance ratio widest / lowest, seeds [min, max]']}")


def _hypernetwork_ntk(h: dict, c) -> Row:
    gap: dict[str, dict[int, float]] = {}
    for m, v in _matches(h, r"Taylor gap \((?P<model>[a-z-]+), meta width (?P<w>\d+)\)"):
        gap.setdefault(m["model"], {})[int(m["w"])] = v

    def span(model: str) -> str:
        ws = sorted(gap[model])
        return (f"{num(gap[model][ws[0]])} at n {ws[0]} -> {num(gap[model][ws[-1]])} at n "
                f"{ws[-1]}")

    names = {"hyper": f"hypernetwork with a width-{num(c.primary_width)} primary",
             "hyper-wide": f"primary widening with it (m = n/{num(c.wide_ratio)})",
             "mlp": "plain MLP"}
    parts = [f"{names[model]} {span(model)}" for model in ("hyper", "mlp", "hyper-wide")
             if model in gap]
    (m_both, both), = _matches(h, r"distance to the hyperkernel \(both, largest width "
                                  r"(?P<w>\d+)\)")
    (m_meta, meta), = _matches(h, r"distance to the hyperkernel \(meta, largest width "
                                  r"(?P<w>\d+)\)")
    (_, naive), = _matches(h, r"distance to the plain product \(both, largest width \d+\)")
    text = (f"Littwin et al. 2020: Taylor gap ||h_T - h_lin|| / ||h_T - h_0|| after "
            f"{num(h['step T of the Taylor gaps'])} GD steps on sinusoid tasks, "
            f"{', '.join(parts)}; the empirical NTK is {num(both)} (relative) from the "
            f"hyperkernel Theta^g(z,z') * Q(u,u') when both widths grow (meta {m_both['w']}, "
            f"exponent {num(h['hyperkernel convergence exponent (both widen, fit)'])}), "
            f"{num(meta)} when only the meta width does (to {m_meta['w']}), and {num(naive)} "
            f"from the plain product Theta^g * Theta^f")
    w = max(gap.get("hyper", {0: 0}))
    spread = h.get(f"Taylor gap min-max over seeds (hyper, meta width {w})")
    return Row(text, f"the hypernetwork's gap at n {w} spans {spread} over seeds" if spread
               else "")


def _autoencoder_rank(h: dict, c) -> Row:
    r = h["true latent rank"]
    deep = [L for L in c.depths if L > 0]
    prior = next((p for p in ("geometric", "power", "linear") if p in c.profiles),
                 c.profiles[0])
    runs = []
    for m, reached in _matches(h, rf"{prior}/(?P<m>[^:]+): runs \(L > 0\) reaching rank {r}"):
        conv = h.get(f"{prior}/{m['m']}: runs (L > 0) converged to the rank-{r} projection")
        runs.append(f"{m['m']} {reached}" + (f" ({conv} converged)" if conv else ""))
    order = h.get("runs (decaying priors, >= 2 modes learned) learning modes in order of s_k")
    nonlinear = [f"{m['m'].replace(', L=', ' L=')}: {v}" for m, v in
                 _matches(h, r"nonlinear/(?P<m>[^:]+): final code rank")]
    text = (f"Sun et al. 2021: linear autoencoders with a depth-L linear bottleneck on rank-{r} "
            f"data: modes learned one at a time in the order of the data's singular values in "
            f"{order} runs; {prior} prior, runs with L = {num(min(deep))}-{num(max(deep))} "
            f"reaching rank {r} within {num(c.steps)} steps, by initialization of the factors: "
            f"{', '.join(runs)}")
    if nonlinear:
        text += (f"; nonlinear autoencoder, codes' numerical rank (latent rank {r}): "
                 f"{', '.join(nonlinear)}")
    return Row(text, spread="counts are runs over all seeds and depths")


def _bottleneck(h: dict, c) -> Row:
    def lab(k: int) -> str:
        return "none" if k == 0 else f"k={k}"

    per_scale = []
    for s in sorted(c.target_scales):
        g = f"{float(s):g}"
        speed = ", ".join(f"{lab(k)} {num(h[f'speedup over the NTK, scale {g}, {lab(k)}'])}"
                          for k in c.bottlenecks)
        lin = ", ".join(f"k={k} {num(h[f'deep linear ODE speedup, scale {g}, k={k}'])}"
                        for k in c.linear.bottlenecks)
        gap = h.get(f"no-bottleneck gap to the NTK, scale {g}")
        per_scale.append(f"target scale {num(s)}: {speed} (no-bottleneck gap to the NTK "
                         f"{num(gap)}; deep linear ODE {lin})")
    s0 = f"{float(min(c.target_scales)):g}"
    kd = ", ".join(f"{lab(k)} {num(h[f'kernel distance, scale {s0}, {lab(k)}'])}"
                   for k in c.bottlenecks)
    err = ", ".join(f"{lab(k)} {num(h[f'test error, scale {s0}, {lab(k)}'])}"
                    for k in c.bottlenecks)
    never = h["seeds that never reached the threshold"]
    return Row(f"Littwin et al. 2021: ReLU MLPs of width {num(c.width)} with a bottleneck of "
               f"width k (binary {c.data.name}, {num(c.data.n_train)} points) against kernel "
               f"flow with the infinite NTK from the same initial function; speedup (NTK time "
               f"/ network time to {pct(c.loss_threshold)} of the initial loss) at "
               + "; ".join(per_scale)
               + (f" (seeds that never got there: {never})" if never != "none" else "")
               + f". Kernel distance at the end (target scale {num(float(s0))}): {kd}; test "
               f"error {err} vs {num(h[f'test error, scale {s0}, infinite NTK'])} for the NTK. "
               f"Trained deep linear networks vs the infinite-width ODE / closed form: largest "
               f"gap {num(h['deep linear: max gap network vs infinite-width theory'])} of the "
               f"initial residual",
               "min-max over seeds in the report's answer")


def _neural_fisher_kernel(h: dict, c) -> Row:
    k, kmax, parts, ahead = c.headline_rank, max(c.ranks), [], []
    for m, name in (("classifier", "MLP classifier"), ("vae", "VAE")):
        if f"{m}: NFK test acc at rank {k}" not in h:
            continue
        reach = h[f"{m}: rank where NFK is within 1 point of own features"]
        parts.append(
            f"{name}: rank-{k} features give NFK {num(h[f'{m}: NFK test acc at rank {k}'])}, "
            f"eNTK {num(h[f'{m}: eNTK test acc at rank {k}'])}, PCA of its own features "
            f"{num(h[f'{m}: own PCA test acc at rank {k}'])}; rank {kmax}: NFK "
            f"{num(h[f'{m}: NFK test acc at rank {kmax}'])}, eNTK "
            f"{num(h[f'{m}: eNTK test acc at rank {kmax}'])}, own features in full "
            f"{num(h[f'{m}: own features test acc'])} (NFK within 1 point of them from rank "
            f"{'never' if reach != reach else num(reach)})")
        ahead.append(f"{h[f'{m}: seeds where NFK > eNTK at rank {k}']} ({name})")
    return Row(f"Zhang et al. 2022: linear-probe test accuracy of low-rank Neural Fisher Kernel "
               f"features on {c.data.name}; {'; '.join(parts)}",
               spread=f"NFK ahead of the eNTK at rank {k} in {', '.join(ahead)} seeds")


FORMATTERS: dict[str, Callable[[dict, Any], Row]] = {
    "toy": _toy, "approximation": _approximation, "double-descent": _double_descent,
    "grokking": _grokking, "trees-vs-nets": _trees_vs_nets,
    "mode-connectivity": _mode_connectivity, "grokking-transformer": _grokking_transformer,
    "entropy-collapse": _entropy_collapse, "rank-growth": _rank_growth,
    "slingshot": _slingshot, "lazy-regime": _lazy_regime, "ntk-width": _ntk_width,
    "collegial-ensembles": _collegial_ensembles, "hypernetwork-ntk": _hypernetwork_ntk,
    "autoencoder-rank": _autoencoder_rank, "bottleneck": _bottleneck,
    "neural-fisher-kernel": _neural_fisher_kernel,
}


# --------------------------------------------------------------------------- runs


class Run(NamedTuple):
    """One study's finished run directory, read."""

    name: str
    path: Path
    df: pd.DataFrame
    config: Any
    saved: dict
    meta: dict
    computing: list[dict]


def load_run(name: str, path: Path) -> Run:
    """The run of study ``name`` in ``path``; :class:`RunProblem` if it cannot give a row."""
    if not path.is_dir():
        raise RunProblem(f"no run directory {path}")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise RunProblem(f"{path} lacks {', '.join(missing)} (not finished?)")
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    meta = json.loads((path / "run.json").read_text(encoding="utf-8"))
    if saved.get("study") != name:
        raise RunProblem(f"{path} holds a {saved.get('study')!r} run, not {name!r}")
    total, done = meta.get("points_total"), meta.get("points_done")
    if total is None or done != total:
        raise RunProblem(f"{path} is unfinished ({done} of {total} points done)")
    study = get_study(name)
    config = config_from_dict(study.config_cls, saved.get("config") or {}, strict=False)
    df = pd.read_parquet(path / "results.parquet")
    if df.empty:
        raise RunProblem(f"{path / 'results.parquet'} holds no rows")
    computing = [s for s in meta.get("sessions", []) if s.get("computed")]
    return Run(name, path, df, config, saved, meta, computing)


def wall_time(run: Run) -> tuple[float, bool]:
    """``(seconds, from_points)``: the computing sessions' wall time, or, where one of them
    recorded none, the sum of the points' seconds (``from_points`` True)."""
    secs = [s.get("seconds") for s in run.computing]
    if secs and all(isinstance(s, (int, float)) for s in secs):
        return float(sum(secs)), False
    return float(sum((run.meta.get("point_seconds") or {}).values())), True


def fmt_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_short(v) for v in value)
    return num(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else (
        str(value).lower() if isinstance(value, bool) else str(value))


def preset_differences(run: Run) -> list[str]:
    """``key=value`` for each setting of the run that is not the current quick preset's."""
    study = get_study(run.name)
    ref = flatten_config(make_config(study, PRESET, {}))
    got = flatten_config(run.config)
    return [f"{k}={_short(got.get(k))}" for k in sorted(set(ref) | set(got))
            if got.get(k) != ref.get(k)]


def seeds_of(run: Run, h: dict) -> int | None:
    if isinstance(h.get("seeds"), int):
        return h["seeds"]
    return int(run.df["seed"].nunique()) if "seed" in run.df.columns else None


def row_for(run: Run) -> tuple[str, str]:
    """``(what it shows, wall time)`` of a study's row."""
    try:
        h = dict(get_study(run.name).headline(run.df, run.config) or {})
    except Exception as err:  # noqa: BLE001 - a broken study costs its row, not the table
        raise RunProblem(f"{run.name}: its headline raised {err!r}") from err
    if not h:
        raise RunProblem(f"{run.name}: its headline is empty")
    try:
        row = FORMATTERS[run.name](h, run.config)
    except KeyError as err:
        raise RunProblem(f"{run.name}: its headline lacks {err}; update FORMATTERS in "
                         f"tools/readme_studies.py") from err
    text = f"{row.text}; {seeds_note(seeds_of(run, h), row.spread)}"
    preset = run.saved.get("preset")
    diffs = preset_differences(run)
    if preset != PRESET or diffs:
        text += (f" (not the current {PRESET} preset: {preset or 'no'} preset"
                 + (f" with {', '.join(diffs)}" if diffs else "") + ")")
    seconds, from_points = wall_time(run)
    return text, fmt_seconds(seconds) + (" *" if from_points else "")


# --------------------------------------------------------------------------- the section


def _versions(run: Run) -> dict:
    sessions = run.computing or run.meta.get("sessions", [])
    last = sessions[-1] if sessions else {}
    return last.get("versions") if isinstance(last.get("versions"), dict) else (
        run.meta.get("versions") or {})


def _threads(argv: list[str]) -> str:
    if "study" not in argv:       # not a `telescope study` command line (e.g. called in-process)
        return "threads not recorded"
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return f"`--threads {argv[i + 1]}`"
        if arg.startswith("--threads="):
            return f"`--threads {arg.split('=', 1)[1]}`"
    return "default threads"


def how_made(run: Run) -> str:
    """The executor and thread setting of the run's computing sessions."""
    ways = []
    for s in run.computing or run.meta.get("sessions", [])[-1:]:
        way = f"`{s.get('executor', 'unknown executor')}`, {_threads(list(s.get('argv') or []))}"
        if way not in ways:
            ways.append(way)
    return " then ".join(ways) or "unknown"


def _intervals(run: Run) -> list[tuple[datetime, datetime]]:
    out = []
    for s in run.computing:
        try:
            start = datetime.fromisoformat(str(s.get("started")))
        except ValueError:
            continue
        if isinstance(s.get("seconds"), (int, float)):
            out.append((start, start + timedelta(seconds=float(s["seconds"]))))
    return out


def overlapping(runs: list[Run]) -> list[str]:
    """Names of the runs whose computing sessions overlapped in time with another run's (by
    more than :data:`SLACK`: ``started`` is recorded to the second)."""
    spans = {r.name: _intervals(r) for r in runs}
    out = []
    for name, mine in spans.items():
        if any(min(a1, b1) - max(a0, b0) > SLACK for other, theirs in spans.items()
               if other != name for a0, a1 in mine for b0, b1 in theirs):
            out.append(name)
    return out


def _grouped(values: dict[str, str]) -> str:
    """``value (names); value (names)``, the commonest value first and its names left out when
    it covers more than half of them ("the others")."""
    groups: dict[str, list[str]] = {}
    for name, value in values.items():
        groups.setdefault(value, []).append(name)
    order = sorted(groups, key=lambda v: -len(groups[v]))
    if len(order) == 1:
        return order[0]
    parts = []
    for i, value in enumerate(order):
        names = groups[value]
        if i == 0 and len(names) * 2 > len(values):
            parts.append(f"{value} (the others)")
        else:
            parts.append(f"{value} ({', '.join(f'`{n}`' for n in names)})")
    return "; ".join(parts[1:] + parts[:1]) if "(the others)" in parts[0] else "; ".join(parts)


def _commit(run: Run) -> str:
    commit = str(_versions(run).get("git_commit") or "unknown")
    return f"`{commit[:7]}{'-dirty' if commit.endswith('-dirty') else ''}`"


def footnote(rows: list[Run], all_runs: list[Run], runs_label: str) -> str:
    """The line under the table: what the wall times are, where and how the runs were made."""
    machines = {r.name: str(_versions(r).get("machine") or _versions(r).get("platform")
                            or "an unrecorded machine") for r in rows}
    ways = {r.name: how_made(r) for r in rows}
    commits = {r.name: _commit(r) for r in rows}
    over = [n for n in overlapping(all_runs) if n in machines]
    marked = any(wall_time(r)[1] for r in rows)
    named = f" ({', '.join(f'`{n}`' for n in over)})" if 0 < len(over) < len(rows) else ""
    points = (", or, marked *, the sum of its points' own seconds where such a session recorded "
              "none" if marked else "")
    return (f"Wall times: the seconds of each run's sessions that computed its points "
            f"(`run.json`){points}; {PRESET} presets on {_grouped(machines)}; runs made with "
            f"{_grouped(ways)}; {len(over)} of these {len(rows)} runs{named} overlapped in time "
            f"with another run in `{runs_label}` (other load on the machine is not recorded). "
            f"{DEFAULT_THREADS if 'default threads' in ''.join(ways.values()) else ''}"
            f"Generated by `tools/readme_studies.py {runs_label}` from each run's "
            f"`results.parquet` and its study's headline; commit {_grouped(commits)}.")


def section(runs: dict[str, Run], rows: dict[str, tuple[str, str]], all_runs: list[Run],
            runs_label: str) -> str:
    """The README text between the markers (markers included)."""
    lines = [BEGIN, f"<!-- generated by tools/readme_studies.py from {runs_label}:",
             "     edit the script or the study, not this text -->",
             f"| study | what it shows ({PRESET} preset) | {PRESET} wall time |", "|---|---|---|"]
    for name in STUDIES:
        if name == ANSWERED_ABOVE:
            lines.append(f"| `{name}` | the answer above | see above |")
        elif name in rows:
            shows, took = rows[name]
            lines.append(f"| `{name}` | {shows.replace('|', chr(92) + '|')} | {took} |")
    lines.append("")
    shown = [runs[n] for n in STUDIES if n in rows]
    if shown:
        lines += textwrap.wrap(footnote(shown, all_runs, runs_label), WIDTH,
                               break_on_hyphens=False, break_long_words=False)
    lines.append(END)
    return "\n".join(lines)


def collect(runs_dir: Path) -> tuple[dict[str, Run], dict[str, tuple[str, str]], list[Run],
                                     dict[str, str]]:
    """``(runs, rows, every readable run, problems)`` of the studies in ``runs_dir``."""
    runs, rows, problems = {}, {}, {}
    readable = []
    for name in STUDIES:
        path = runs_dir / name
        try:
            run = load_run(name, path)
        except RunProblem as err:
            if name != ANSWERED_ABOVE:
                problems[name] = str(err)
            continue
        except (TelescopeError, OSError, ValueError) as err:
            if name != ANSWERED_ABOVE:
                problems[name] = f"{path}: {err}"
            continue
        readable.append(run)
        if name == ANSWERED_ABOVE:
            continue
        try:
            rows[name] = row_for(run)
            runs[name] = run
        except RunProblem as err:
            problems[name] = str(err)
    return runs, rows, readable, problems


def render(readme_text: str, runs_dir: Path, runs_label: str) -> tuple[str, dict[str, str]]:
    """The README with the marked section rewritten, and the studies that got no row (why)."""
    begin, end = readme_text.find(BEGIN), readme_text.find(END)
    if begin < 0 or end < begin:
        raise UsageError(f"the README has no {BEGIN} ... {END} block: put the two marker lines "
                         f"around the Studies table")
    runs, rows, readable, problems = collect(runs_dir)
    new = section(runs, rows, readable, runs_label)
    return readme_text[:begin] + new + readme_text[end + len(END):], problems


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="readme_studies.py", description="Write the README's Studies table from saved "
        "quick-preset runs, one run directory per study in RUNS_DIR.")
    parser.add_argument("runs_dir", type=Path, help="e.g. out/studies, holding "
                        "out/studies/<study>/results.parquet, config.json, run.json")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the README differs from the runs or a "
                             "study's run is missing")
    args = parser.parse_args(argv)
    try:
        if not args.runs_dir.is_dir():
            raise UsageError(f"no directory {args.runs_dir}: give the directory holding one "
                             f"run directory per study")
        if not args.readme.is_file():
            raise UsageError(f"no README at {args.readme}: pass --readme PATH")
        old = args.readme.read_text(encoding="utf-8")
        new, problems = render(old, args.runs_dir, args.runs_dir.as_posix())
    except TelescopeError as err:
        print(f"readme_studies.py: error: {err}", file=sys.stderr)
        return 2
    for name, why in problems.items():
        print(f"readme_studies.py: warning: no row for {name}: {why}", file=sys.stderr)
    if args.check:
        failed = False
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(keepends=True), new.splitlines(keepends=True),
                fromfile=f"{args.readme} (now)", tofile=f"{args.readme} (from the runs)"))
            print(f"readme_studies.py: {args.readme} differs from {args.runs_dir}; run without "
                  f"--check to rewrite", file=sys.stderr)
            failed = True
        if problems:
            print(f"readme_studies.py: no run for {', '.join(problems)} in {args.runs_dir}",
                  file=sys.stderr)
            failed = True
        return 1 if failed else 0
    if new != old:
        args.readme.write_text(new, encoding="utf-8")
    print(f"readme_studies.py: {args.readme} {'rewritten' if new != old else 'unchanged'} from "
          f"{args.runs_dir} ({len(STUDIES) - 1 - len(problems)} of {len(STUDIES) - 1} studies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
