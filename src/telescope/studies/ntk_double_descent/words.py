"""The answer of ``ntk-double-descent`` in plain words: one paragraph per model row
(:func:`answer_for`), the paragraphs together (:func:`answer`, the headline's ``answer``) and
one sentence (:func:`short_answer`, the README's lead), every number from the results with its
95 % bootstrap interval over seeds (:mod:`~telescope.studies.ntk_double_descent.analysis`)."""

from __future__ import annotations

import math

import pandas as pd

from telescope.studies.ntk_double_descent.analysis import (
    AGREEMENT,
    LAZY_TOLERANCE,
    MODELS,
    RHO_SECOND_DESCENT,
    SeedBootstrap,
    curve_row,
    is_double_descent,
    lazy_valid_from,
    mean_curves,
)
from telescope.studies.ntk_double_descent.formatting import (
    fmt_corr,
    fmt_estimate,
    fmt_peak,
    fmt_share,
    fmt_stat,
    fmt_widths,
)

__all__ = ["answer_for", "answer", "short_answer"]


def _kernel_motion(boot: SeedBootstrap) -> str:
    """A sentence on the kernel distance ``K_T`` vs ``K_0`` at the largest width: flat (its
    interval overlaps those of at least the two next narrower widths: the tail is said to start
    at the narrowest width of that run) or below every narrower width's interval."""
    kd = boot.curve_intervals("kernel_distance")
    if len(kd) < 2:
        return ""
    mean, (lo, hi) = curve_row(kd, -1)
    overlap = ((kd["lo"] <= hi) & (kd["hi"] >= lo)).to_numpy()
    j = len(kd) - 1
    while j > 0 and overlap[j - 1]:
        j -= 1
    s = (f" Its kernel moves by {fmt_estimate(mean, (lo, hi))} (kernel distance K_T vs K_0) at "
         f"the largest width")
    if len(kd) - j >= 3:
        return s + (f", as much as at every width from {int(kd.index[j])} on (overlapping "
                    f"intervals): no sign of the lazy regime setting in over these widths.")
    if (kd["lo"].to_numpy()[:-1] > hi).all():
        return s + ", less than at every narrower width: it settles as the width grows."
    return s + "."


def answer_for(final: pd.DataFrame, kind: str, boot: SeedBootstrap | None = None) -> str:
    """The study's answer for one model row in plain words, every number from the results with
    its 95 % bootstrap interval over seeds in brackets (``boot``: the row's bootstrap, if
    already computed)."""
    boot = boot or SeedBootstrap(final, kind)
    stats = boot.compare()
    if "network" not in stats:
        return ""
    net = stats["network"]
    sweep = boot.sweep
    c = mean_curves(final, kind)
    name = "Transformer" if kind == "transformer" else "MLP"
    details = boot.verdict_details()
    dd_share = boot.double_descent_share()
    where = fmt_peak(net, sweep)
    if is_double_descent(net):
        s = (f"{name}: the trained network's test MSE peaks at width {where}, "
             f"{fmt_stat(net, 'peak')}, and falls to {fmt_stat(net, 'at_largest')} at width "
             f"{net['largest_width']}: double descent")
        s += "." if dd_share >= AGREEMENT else f" (in {fmt_share(dd_share)} of the seed resamples)."
        tr = boot.curve_intervals("train_mse")
        if net["peak_width"] in tr.index:
            mean, ci = curve_row(tr, list(tr.index).index(net["peak_width"]))
            s += (f" Its train MSE at the peak is {fmt_estimate(mean, ci)}"
                  + (": it fits its noisy training targets there." if ci[1] < 0.05 else "."))
    else:
        some = ("" if dd_share <= 1 - AGREEMENT else
                f"; double descent in {fmt_share(dd_share)} of the seed resamples")
        s = (f"{name}: no clear double descent here (highest test MSE {fmt_stat(net, 'peak')} "
             f"at width {where}, {fmt_stat(net, 'at_largest')} at width "
             f"{net['largest_width']}{some}).")
    lazy = stats.get("lazy")
    if lazy:
        at = ("at the same width" if lazy["peak_width"] == net["peak_width"] else
              f"at width {fmt_peak(lazy, sweep)}")
        full_rank = c.index[c["lazy_p_train"] >= 0.99 * c["n_train"]] if (
            "lazy_p_train" in c and "n_train" in c) else []
        s += (" NTK theory at initialization (converged kernel regression with the initial NTK) "
              f"predicts a peak {at}")
        if len(full_rank):
            s += (f" (its kernel reaches rank n, i.e. p_train = n, from width "
                  f"{int(full_rank[0])})")
        s += (f", {lazy['peak'] / net['peak']:.1f}x the network's height; it ranks the widths "
              f"with Spearman {fmt_corr(lazy, 'rho')} overall and "
              f"{fmt_corr(lazy, 'rho_past_peak')} past the network's peak.")
        valid = lazy_valid_from(final, kind)
        if valid is not None:
            s += (f" Its predictions hold (within {fmt_share(LAZY_TOLERANCE)} of the network's) "
                  f"from width {valid}.")
        else:
            s += (f" Its predictions never come within {fmt_share(LAZY_TOLERANCE)} of the "
                  f"network's (relative distance {fmt_stat(lazy, 'gap_at_largest')} at the "
                  f"largest width).")
    s += _kernel_motion(boot)
    after = stats.get("after")
    if after:
        s += (f" The after-kernel (the NTK of the trained network, same formula) ranks the "
              f"widths past the peak with Spearman {fmt_corr(after, 'rho_past_peak')}")
        if math.isfinite(after["gap_at_largest"]):
            s += f" and is {fmt_stat(after, 'gap_at_largest')} away (relative) at the largest width"
        s += "."
    tel = stats.get("telescoping")
    if tel and math.isfinite(tel["gap"]):
        s += (f" The telescoping model is a median {fmt_stat(tel, 'gap')} away (relative) from the "
              f"network")
        s += (": the steps are first-order accurate." if tel["gap_ci"][1] < 0.1 else
              ": the optimizer's steps are far from first-order accurate at this learning "
              "rate." if tel["gap_ci"][0] > 0.5 else ".")
    s += f" Verdict: {details['verdict']}."
    return s


def answer(final: pd.DataFrame, boots: dict[str, SeedBootstrap] | None = None) -> str:
    """The study's answer to its question, in plain words, from the measured numbers (one
    paragraph per model row, :func:`answer_for`)."""
    boots = boots or {}
    return " ".join(p for p in (answer_for(final, kind, boots.get(kind)) for kind in MODELS)
                    if p)


def short_answer(final: pd.DataFrame, kind: str = "transformer") -> str:
    """One sentence: the robust verdict for ``kind`` in words, and whether the after-kernel
    (the trained network's NTK) ranks the second descent alike (Spearman past the peak >= 0.8
    over its whole bootstrap interval)."""
    boot = SeedBootstrap(final, kind)
    d = boot.verdict_details()
    name = "transformer" if kind == "transformer" else "MLP"
    stats = boot.compare()
    cat = d["category"]
    if cat == "not measured":
        return f"Not measured for the {name}."
    net, lazy = stats["network"], stats["lazy"]
    sweep = boot.sweep
    split = ", ".join(f"{k} {fmt_share(v)}" for k, v in d["shares"].items())
    where = (f"anywhere in widths {fmt_widths(net['peak_widths'], sweep)}"
             if len(net["peak_widths"]) > 1 else f"at width {net['peak_width']}")
    others = "".join(f"; {u}" for u in d["uncertain"] if "peak anywhere" not in u)
    first = {
        "yes": f"Yes: the NTK at initialization predicts the {name}'s double descent.",
        "partly": (f"Partly: the NTK at initialization finds where the {name}'s test error "
                   f"peaks (within one sweep width), not the rest of its double descent."),
        "no": f"No: the NTK at initialization misses the {name}'s double descent.",
        "no double descent": f"The trained {name} shows no double descent here.",
        "undetermined": (f"Within the seeds' noise this is undetermined: the NTK at "
                         f"initialization peaks at width {fmt_widths(lazy['peak_widths'], sweep)}"
                         f", the trained {name} {where}{others}; the seed resamples split "
                         f"({split})."),
    }.get(cat, f"{d['verdict']}.")
    possible = set(d["implied"]) | set(d["shares"])
    if cat == "undetermined" and possible and possible <= {"partly", "no"}:
        # every verdict the noise allows says the same to the question: not in full
        first = (f"Not in full: the NTK at initialization peaks at width "
                 f"{fmt_widths(lazy['peak_widths'], sweep)}, the trained {name} {where}"
                 f"{others}; whether it at least finds the peak's location (partly) or not (no) "
                 f"is within the seeds' noise ({split}).")
    after = stats.get("after")
    if after is None or cat == "no double descent":
        return first
    lo = after["rho_past_peak_ci"][0]
    if lo >= RHO_SECOND_DESCENT:
        return first + (f" The NTK of the trained {name} (the after-kernel) ranks its second "
                        f"descent alike.")
    return first + f" Nor does the NTK of the trained {name} rank its second descent reliably."
