"""The answer of ``ntk-double-descent`` in plain words: one paragraph per model row
(:func:`answer_for`), one per row with an infinite-width limit on what the limit predicts
(:func:`limit_answer_for`), the paragraphs together (:func:`answer`, the headline's ``answer``)
and one sentence each (:func:`short_answer`, :func:`limit_short_answer`: the README's lead),
every number from the results with its 95 % bootstrap interval over seeds
(:mod:`~telescope.studies.ntk_double_descent.analysis`,
:mod:`~telescope.studies.ntk_double_descent.limit`)."""

from __future__ import annotations

import math

import pandas as pd

from telescope.studies.ntk_double_descent.analysis import (
    AGREEMENT,
    LAZY_TOLERANCE,
    LIMITS,
    MODELS,
    NAMES,
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
    fmt_number,
    fmt_peak,
    fmt_share,
    fmt_stat,
    fmt_widths,
)
from telescope.studies.ntk_double_descent.limit import (
    SampleBootstrap,
    counterpart,
    limit_value,
    rise_verdict,
)

__all__ = ["answer_for", "limit_answer_for", "answer", "short_answer", "limit_short_answer"]

#: the rows' names inside a sentence
_LOWER = {"transformer": "transformer", "ntk-transformer": "NTK-parametrized transformer",
          "mlp": "MLP"}


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
    name = NAMES[kind]
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


def answer(final: pd.DataFrame, boots: dict[str, SeedBootstrap] | None = None,
           df: pd.DataFrame | None = None) -> str:
    """The study's answer to its question, in plain words, from the measured numbers (one
    paragraph per model row, :func:`answer_for`, each row with an infinite-width limit followed
    by :func:`limit_answer_for`; ``df``: all results, for the sample-wise view)."""
    boots = boots or {}
    parts = []
    for kind in MODELS:
        parts.append(answer_for(final, kind, boots.get(kind)))
        if kind in LIMITS:
            parts.append(limit_answer_for(final, df, kind, boots.get(kind)))
    return " ".join(p for p in parts if p)


def _trend(table: pd.DataFrame) -> str:
    """``"falls"``/``"grows"``/``"stays level"`` from the first to the last width of a curve,
    by whether their intervals are apart."""
    first, last = table.iloc[0], table.iloc[-1]
    if last["hi"] < first["lo"]:
        return "falls"
    if last["lo"] > first["hi"]:
        return "grows"
    return "stays level (overlapping intervals)"


def limit_answer_for(final: pd.DataFrame, df: pd.DataFrame | None, kind: str,
                     boot: SeedBootstrap | None = None) -> str:
    """What the infinite-width limit of one model row predicts and how the trained networks
    compare, in plain words: the limit's test MSE and error (NTK and NNGP, converged, with the
    configured ridge: none in the presets), that it has no width axis and so no width-wise
    peak, the trained networks' distance to NTK theory's prediction for their own initialization
    at the smallest and the largest width (and to the ensemble mean, with its floor), the
    sample-wise curve's largest rise with ``n``, and whether the network's peak width has a
    counterpart in the limit."""
    boot = boot or SeedBootstrap(final, kind)
    ntk = limit_value(final, kind, "infinite_ntk_test_mse", df)
    if ntk is None or boot.analysis is None:
        return ""
    name = _LOWER[kind]
    err = limit_value(final, kind, "infinite_ntk_test_error", df)
    nngp = limit_value(final, kind, "infinite_nngp_test_mse", df)
    draw = limit_value(final, kind, "infinite_ntk_draw_test_mse", df)
    n = int(final.loc[final["model"] == kind, "n_train"].iloc[0])
    s = (f"NTK theory itself for the {name} (the same description infinitely wide, trained to "
         f"convergence {_ridge(final, kind)}: kernel regression with its infinite-width NTK) "
         f"predicts a test MSE of {fmt_estimate(*ntk)}")
    if err is not None:
        s += f" (sign error {fmt_estimate(*err)})"
    s += f" at n = {n}"
    if draw is not None:
        s += (f"; one infinitely wide network, whose random initial function stays in its "
              f"outputs, {fmt_estimate(*draw)}")
    if nngp is not None:
        s += f"; the NNGP (only the readout trained) {fmt_estimate(*nngp)}"
    s += (". The limit has no width axis: the same number at every width, so no width-wise "
          "peak.")
    stats = boot.compare()
    net = stats.get("network")
    t_mse = limit_value(final, kind, "infinite_ntk_t_draw_test_mse")
    if net is not None:
        s += (f" The trained networks' test MSE is {fmt_stat(net, 'at_smallest')} at width "
              f"{net['smallest_width']} and {fmt_stat(net, 'at_largest')} at width "
              f"{net['largest_width']}")
        s += (f" (trained by gradient descent; one infinitely wide network trained as long is "
              f"expected at {fmt_estimate(*t_mse)})." if t_mse is not None else ".")
    gap = boot.curve_intervals("infinite_init_gap")
    if len(gap) >= 2:
        w0, w1 = int(gap.index[0]), int(gap.index[-1])
        g0, g1 = curve_row(gap, 0), curve_row(gap, -1)
        s += (f" Their test outputs are {fmt_estimate(*g0)} (relative distance) from NTK "
              f"theory's prediction for their own initialization at width {w0} and "
              f"{fmt_estimate(*g1)} at width {w1}: the distance {_trend(gap)} with the width")
        mean_gap = boot.curve_intervals("infinite_gap")
        floor = limit_value(final, kind, "infinite_gap_floor")
        if len(mean_gap) and floor is not None:
            m, (lo, hi) = curve_row(mean_gap, -1)
            s += (f"; from the infinite ensemble's mean it is {fmt_estimate(m, (lo, hi))} at "
                  f"width {w1}, where one infinitely wide network would itself be "
                  f"{fmt_estimate(*floor, digits=2)} away")
            s += (" (as close as that, within noise)" if lo <= floor[1][1] else
                  f" ({m / floor[0]:.1f}x that)")
        s += "."
    samples = SampleBootstrap(df, kind) if df is not None else None
    if samples is not None and not samples.empty:
        s += " " + _samples_sentence(samples, n)
    c = counterpart(final, boot, samples if samples is not None else SampleBootstrap(
        final.iloc[:0], kind))
    if c["peak_width"] is not None and net is not None:
        per = f"{fmt_number(c['params_per_example'])} parameters per training point"
        if not is_double_descent(net):
            s += (f" The trained network has no clear width-wise peak to place (its highest "
                  f"test MSE is at width {c['peak_width']}, {per})")
        else:
            share = boot.double_descent_share()
            some = "" if share >= AGREEMENT else f", a peak in {fmt_share(share)} of the resamples"
            s += f" The network's peak at width {c['peak_width']} ({per}{some})"
            if c["rank_n_width"] == c["peak_width"]:
                s += (" sits where its initial NTK first reaches rank n: a threshold of the "
                      "finite network")
            elif c["rank_n_width"] is not None:
                s += f" lies near where its initial NTK reaches rank n (width {c['rank_n_width']})"
        if c["matches"] is None:
            s += "."
        else:
            full = _full_rank(samples)
            kernel = "whose kernel is the same at every width" + (
                " and of rank n at every n of the sample-wise view" if full else "")
            s += (f"; the limit's own sample-wise peak reaches n = {n}, its nearest counterpart."
                  if c["matches"] else
                  f"; the limit, {kernel}, has no counterpart: no held-out sample-wise peak "
                  f"near n = {n} either.")
    return s


def _ridge(final: pd.DataFrame, kind: str) -> str:
    """``"without ridge"``, or the ridge the limit's predictions used."""
    part = final[final["model"] == kind]
    if "infinite_ridge" not in part or part["infinite_ridge"].isna().all():
        return "(ridge as configured)"
    ridge = float(part["infinite_ridge"].dropna().iloc[0])
    return "without ridge" if ridge == 0 else f"with ridge {ridge:g}"


def _full_rank(samples: SampleBootstrap | None) -> bool:
    """Whether the limit's NTK had rank n at every n of the sample-wise view (every seed)."""
    if samples is None or samples.empty or "infinite_ntk_rank" not in samples.limit:
        return False
    rows = samples.limit.dropna(subset=["infinite_ntk_rank"])
    return bool(len(rows)) and bool((rows["infinite_ntk_rank"] == rows["sample_size"]).all())


def _samples_sentence(samples: SampleBootstrap, n: int) -> str:
    """The sample-wise view in one or two sentences."""
    curve = samples.curve("infinite_ntk_test_mse")
    rise = samples.rise("infinite_ntk_test_mse")
    sizes = [int(v) for v in samples.sizes]
    s = (f"Against the number of training points, the limit's test MSE goes from "
         f"{fmt_estimate(*curve_row(curve, 0))} at n = {sizes[0]} to "
         f"{fmt_estimate(*curve_row(curve, -1))} at n = {sizes[-1]}")
    if rise is None:
        s += ", never rising: no sample-wise peak."
    else:
        where = (f"n = {rise['peak_n']}" if len(rise["peak_sizes"]) <= 1 else
                 f"n = {rise['peak_n']} ({fmt_widths(rise['peak_sizes'], sizes)} within noise)")
        s += (f"; its largest rise, from n = {rise['valley_n']} to {where}, is a ratio of "
              f"{fmt_estimate(rise['ratio'], rise['ratio_ci'], decimals=2)}: "
              f"{rise_verdict(rise)}.")
    nets = []
    for w in samples.widths:
        c = samples.curve("test_mse", width=w)
        if not len(c):
            continue
        text = (f"width {w}: {fmt_estimate(*curve_row(c, 0))} at n = {int(c.index[0])} to "
                f"{fmt_estimate(*curve_row(c, -1))} at n = {int(c.index[-1])}")
        params = samples.networks.loc[samples.networks["width"] == w, "n_params"]
        if len(c) >= 2 and c["lo"].iloc[-1] > c["hi"].iloc[0]:
            text += ", rising with n"
            if len(params) and c.index[-1] <= float(params.iloc[0]) <= 1.5 * c.index[-1]:
                text += (f" towards its interpolation threshold n = P = "
                         f"{int(params.iloc[0])}")
        nets.append(text)
    if nets:
        s += " Trained networks on the same points: " + "; ".join(nets) + "."
    return s


def short_answer(final: pd.DataFrame, kind: str = "transformer") -> str:
    """One sentence: the robust verdict for ``kind`` in words, and whether the after-kernel
    (the trained network's NTK) ranks the second descent alike (Spearman past the peak >= 0.8
    over its whole bootstrap interval)."""
    boot = SeedBootstrap(final, kind)
    d = boot.verdict_details()
    name = _LOWER[kind]
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


def limit_short_answer(final: pd.DataFrame, df: pd.DataFrame | None = None,
                       kind: str = "ntk-transformer") -> str:
    """One or two sentences: what NTK theory itself predicts for the transformer family with a
    known limit (test MSE at every width, hence no width-wise peak; the sample-wise curve's
    verdict), and how far the trained networks are from it at the largest width."""
    ntk = limit_value(final, kind, "infinite_ntk_test_mse", df)
    if ntk is None:
        return ""
    boot = SeedBootstrap(final, kind)
    n = int(final.loc[final["model"] == kind, "n_train"].iloc[0])
    s = (f"NTK theory itself (the {_LOWER[kind]} family made infinitely wide, trained to "
         f"convergence) predicts test MSE {fmt_estimate(*ntk)} at n = {n} whatever the width, "
         f"so no width-wise peak")
    samples = SampleBootstrap(df, kind) if df is not None else None
    if samples is not None and not samples.empty:
        rise = samples.rise("infinite_ntk_test_mse")
        s += (" and a sample-wise peak at n = " + str(rise["peak_n"]) if rise and rise["peaked"]
              else " and no held-out sample-wise peak in n")
    gap = boot.curve_intervals("infinite_init_gap")
    if len(gap):
        net = boot.compare().get("network")
        s += (f"; the trained {_LOWER[kind]}s' test outputs are still "
              f"{fmt_estimate(*curve_row(gap, -1))} (relative distance) from what it predicts "
              f"for them (from their own initialization) at width {int(gap.index[-1])}")
        if net is not None:
            s += f", with test MSE {fmt_stat(net, 'at_largest')} there"
    return s + "."
