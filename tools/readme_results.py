#!/usr/bin/env python
"""Write the README's answer to "Can NTK theory predict double descent in transformers?" from a
saved ``ntk-double-descent`` run, so that every number it prints comes from that run.

Usage (from the repository root, after ``./dev.sh run``)::

    .venv/bin/python tools/readme_results.py out/ntk-double-descent            # rewrite
    .venv/bin/python tools/readme_results.py out/ntk-double-descent --check    # compare only

It reads ``RUN_DIR/results.parquet``, ``config.json`` and ``run.json`` and replaces the part of
the README between the marker lines ``<!-- ntk-double-descent:begin -->`` and
``<!-- ntk-double-descent:end -->`` with: the one-sentence answer
(:func:`telescope.studies.ntk_double_descent.words.short_answer`), the setup (from
``config.json``) and the wall time (from ``run.json``), the figures (the width sweep and the
sample-wise view), a table of the numbers with their bootstrap intervals over seeds
(:func:`~telescope.studies.ntk_double_descent.analysis.compare`,
:func:`~telescope.studies.ntk_double_descent.analysis.verdict_details`,
:func:`~telescope.studies.ntk_double_descent.analysis.half_verdicts`), one paragraph per model row
(:func:`~telescope.studies.ntk_double_descent.words.answer_for`, and for the rows with an
infinite-width limit :func:`~telescope.studies.ntk_double_descent.words.limit_answer_for`), the
limits, and a line naming the machine, commit and date of the run (``versions.machine`` /
``versions.git_commit`` of ``run.json``, else ``versions.platform`` and "unknown commit"). It
also rewrites the wall time in the README's ``./dev.sh run`` line (``(~N min + setup)``) and
copies the run's ``ntk_double_descent.png`` to ``--figure`` and
``ntk_double_descent_samples.png`` beside it.

``--check`` writes nothing and exits 1 if the README (or a figure) differs from what the
results give, printing a diff; 2 on a usage error (missing files or markers).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
import textwrap
from pathlib import Path

import pandas as pd

from telescope.errors import TelescopeError, UsageError
from telescope.studies import get_study
from telescope.studies import ntk_double_descent as ndd
from telescope.studies.config import config_from_dict
from telescope.studies.ntk_double_descent.analysis import (
    AGREEMENT,
    LEVEL,
    LIMITS,
    MODELS,
    RESAMPLES,
    SeedBootstrap,
    curve_row,
    final_rows,
    half_verdicts,
    lazy_valid_from,
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
from telescope.studies.ntk_double_descent.words import (
    answer_for,
    limit_answer_for,
    limit_short_answer,
    short_answer,
)

STUDY = "ntk-double-descent"
BEGIN = "<!-- ntk-double-descent:begin -->"
END = "<!-- ntk-double-descent:end -->"
FIGURE = "ntk_double_descent.png"
SAMPLES_FIGURE = "ntk_double_descent_samples.png"
COLUMNS = {"transformer": "transformer", "ntk-transformer": "NTK-param. transformer (limit known)",
           "mlp": "MLP (contrast)"}
WIDTH = 100
# the wall time in the README's first lines: "./dev.sh run ... (~7 min + setup)"
DEV_RUN_TIME = re.compile(r"^(\./dev\.sh run .*\(~)(\d+(?:\.\d+)?)( min \+ setup\))", re.M)


# --------------------------------------------------------------------------- the run


def load_run(run_dir: Path) -> tuple[pd.DataFrame, object, dict, dict]:
    """``(results, config, saved config.json, run.json)`` of a finished run directory."""
    run_dir = Path(run_dir)
    paths = {name: run_dir / name for name in ("results.parquet", "config.json", "run.json")}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise UsageError(f"{run_dir} lacks {', '.join(missing)}: give the directory of a "
                         f"finished run, e.g. run `./dev.sh run` and pass out/{STUDY}")
    saved = json.loads(paths["config.json"].read_text(encoding="utf-8"))
    if saved.get("study") != STUDY:
        raise UsageError(f"{run_dir} holds a {saved.get('study')!r} run, not {STUDY!r}")
    meta = json.loads(paths["run.json"].read_text(encoding="utf-8"))
    config = config_from_dict(get_study(STUDY).config_cls, saved.get("config") or {},
                              strict=False)
    df = pd.read_parquet(paths["results.parquet"])
    if df.empty:
        raise UsageError(f"{paths['results.parquet']} holds no rows: the run has no finished "
                         f"points yet")
    return df, config, saved, meta


def wall_seconds(meta: dict) -> float | None:
    """Seconds the sessions that computed points took together (``run.json`` sessions)."""
    sessions = [s for s in meta.get("sessions", []) if s.get("computed")]
    if not sessions:
        return None
    return float(sum(s.get("seconds") or 0.0 for s in sessions))


def provenance(meta: dict) -> dict[str, str]:
    """Machine, commit and date of the last session that computed points.

    Versions come from that session's own ``versions`` where ``run.json`` records them per
    session, else from the top-level ``versions`` (``machine``, else ``platform``;
    ``git_commit``), which describe the *latest* session: when that session computed nothing
    (a resume), its commit is not the one that computed the points, so the commit is reported as
    unknown and the machine as recorded by the later session."""
    sessions = list(meta.get("sessions", []))
    computing = [s for s in sessions if s.get("computed")]
    session = computing[-1] if computing else (sessions[-1] if sessions else {})
    later = False
    if isinstance(session.get("versions"), dict):
        versions = session["versions"]
    else:
        versions = meta.get("versions") or {}
        later = bool(computing) and sessions[-1] is not session
    machine = str(versions.get("machine") or versions.get("platform") or "unknown machine")
    commit = versions.get("git_commit")
    return {
        "machine": machine + (" (as recorded by a later session that only resumed)" if later
                              else ""),
        "commit": f"commit {commit}" if commit and not later else "unknown commit",
        "date": str(session.get("started", ""))[:10] or "unknown date",
        "executor": str(session.get("executor", "")),
        "torch": str(versions.get("torch", "")),
    }


# --------------------------------------------------------------------------- the section


def _para(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent,
                         subsequent_indent=" " * len(indent), break_on_hyphens=False,
                         break_long_words=False)


def _ordinal_layers(n: int) -> str:
    return {1: "one-layer", 2: "two-layer", 3: "three-layer"}.get(n, f"{n}-layer")


def setup_text(config, final: pd.DataFrame, meta: dict) -> str:
    """The setup sentence, from the config and the run's metadata."""
    d = config.data
    if d.kind == "mnist1d-patches":
        task = (f"MNIST-1D {d.classes[0]} vs {d.classes[1]} read as {40 // d.patch} patches of "
                f"{d.patch} samples")
    else:
        task = f"the digits {d.classes[0]} vs {d.classes[1]} read as 8 rows of 8 pixels"
    opt = ("Adam" if config.optimizer == "adam" else f"SGD (momentum {config.momentum})")
    warm = f" with {config.warmup} warmup steps" if config.warmup else ""
    models = []
    heads = "" if config.n_heads == 1 else f", {config.n_heads} heads"
    if "transformer" in config.models:
        models.append(f"{_ordinal_layers(config.n_layers)} encoder transformers of width "
                      f"{min(config.widths)} to {max(config.widths)}{heads}")
    if "ntk-transformer" in config.models:
        gd = ("full-batch gradient descent" if config.ntk_optimizer == "gd" else "Adam")
        seeds = min(config.ntk_seeds, config.seeds)
        models.append(f"NTK-parametrized transformers of width {min(config.ntk_widths)} to "
                      f"{max(config.ntk_widths)}{heads} (`telescope.infinite.families."
                      f"transformer`, {gd} at learning rate {config.ntk_lr:g}, {seeds} seeds)")
    if "mlp" in config.models:
        models.append(f"one-hidden-layer MLPs of width {min(config.mlp_widths)} to "
                      f"{max(config.mlp_widths)}")
    n_points = int(final.groupby(["model", "width", "seed"]).ngroups)
    sizes = sorted(int(v) for v in config.sample_sizes)
    view = (f"; the sample-wise view at n = {sizes[0]} to {sizes[-1]} (networks at n = "
            f"{', '.join(str(v) for v in sorted(config.sample_trained))}, widths "
            f"{', '.join(str(v) for v in sorted(config.sample_widths))}, "
            f"{min(config.sample_network_seeds, config.seeds)} seeds)"
            if sizes and any(m in config.models for m in LIMITS) else "")
    seconds = wall_seconds(meta)
    prov = provenance(meta)
    took = "" if seconds is None else f" in {seconds / 60:.1f} min"
    where = f" ({prov['executor']})" if prov["executor"] else ""
    return (f"({task}, n = {d.n_train} training points, {fmt_share(config.label_noise)} of the "
            f"targets flipped, squared loss, full-batch {opt} at learning rate {config.lr:g}"
            f"{warm} for {config.steps} steps, {', '.join(models[:-1])}"
            f"{' and ' if len(models) > 1 else ''}{models[-1]}, {config.seeds} seeds{view}; "
            f"{n_points} trained networks with their kernels{took}{where})")


def _limit_cell(final: pd.DataFrame, df: pd.DataFrame, boot: SeedBootstrap, row: str) -> str:
    """A table cell of the infinite-width rows."""
    kind = boot.kind
    if kind not in LIMITS:
        return "no closed-form limit" if row == "inf_ntk" else ""

    def value(col: str, **kw) -> str:
        v = limit_value(final, kind, col, df)
        return "not measured" if v is None else fmt_estimate(*v, **kw)

    if row == "inf_ntk":
        return (f"{value('infinite_ntk_test_mse')}; {value('infinite_ntk_test_error')} "
                f"(one network: {value('infinite_ntk_draw_test_mse')})")
    if row == "inf_nngp":
        return f"{value('infinite_nngp_test_mse')}; {value('infinite_nngp_test_error')}"
    if row == "inf_gap":
        gap = boot.curve_intervals("infinite_init_gap")
        if not len(gap):
            return "not measured"
        return (f"{fmt_estimate(*curve_row(gap, 0), digits=2)} at {int(gap.index[0])} -> "
                f"{fmt_estimate(*curve_row(gap, -1), digits=2)} at {int(gap.index[-1])}")
    if row == "inf_mean_gap":
        gap = boot.curve_intervals("infinite_gap")
        if not len(gap):
            return "not measured"
        return (f"{fmt_estimate(*curve_row(gap, -1), digits=2)} at {int(gap.index[-1])} "
                f"(floor {value('infinite_gap_floor', digits=2)})")
    samples = SampleBootstrap(df, kind)
    if row == "inf_samples":
        rise = None if samples.empty else samples.rise()
        if samples.empty:
            return "not run"
        if rise is None:
            return "never rises with n"
        return (f"n = {rise['valley_n']} -> {rise['peak_n']}: ratio "
                f"{fmt_estimate(rise['ratio'], rise['ratio_ci'], decimals=2)}; "
                f"{rise_verdict(rise).split(':')[0]}")
    if row == "inf_counterpart":
        c = counterpart(final, boot, samples)
        if c["peak_width"] is None:
            return "not measured"
        rank = ("" if c["rank_n_width"] is None else
                f", rank n from width {c['rank_n_width']}")
        said = {None: "no sample-wise view", True: "**yes**", False: "**no**"}[c["matches"]]
        return (f"{said} (network peak at {c['peak_width']}: P = "
                f"{fmt_number(c['params_per_example'])} n{rank})")
    raise KeyError(row)


def _cell(boot: SeedBootstrap | None, row: str, final: pd.DataFrame | None = None,
          df: pd.DataFrame | None = None) -> str:
    """One table cell of a model row."""
    if boot is None or boot.analysis is None:
        return "not run"
    if row.startswith("inf_"):
        return _limit_cell(final, df, boot, row)
    stats = boot.compare()
    net, sweep = stats["network"], boot.sweep
    lazy, after, tel = stats.get("lazy"), stats.get("after"), stats.get("telescoping")
    est, corr = fmt_stat, fmt_corr
    if row == "net_peak":
        return fmt_peak(net, sweep)
    if row == "net_height":
        return (f"{est(net, 'peak')} -> {est(net, 'at_largest')} at {net['largest_width']}")
    if lazy is None and row.startswith("lazy"):
        return "not measured"
    if row == "lazy_peak":
        same = " (the network's)" if lazy["peak_width"] == net["peak_width"] else ""
        return (f"width {fmt_peak(lazy, sweep)}{same}; {est(lazy, 'peak')} "
                f"({lazy['peak'] / net['peak']:.1f}x the network's)")
    if row == "lazy_rho":
        return f"{corr(lazy, 'rho')} / {corr(lazy, 'rho_past_peak')}"
    if row == "lazy_gap":
        valid = lazy_valid_from(boot.final, boot.kind)
        holds = ("never within 25 %" if valid is None else f"within 25 % from width {valid}")
        return f"{est(lazy, 'gap_at_largest')} ({holds})"
    if row == "kernel":
        kd = boot.curve_intervals("kernel_distance")
        return "not measured" if not len(kd) else fmt_estimate(*curve_row(kd, -1))
    if row == "after":
        if after is None:
            return "not measured"
        return f"{corr(after, 'rho_past_peak')}; {est(after, 'gap_at_largest')}"
    if row == "telescoping":
        return "not measured" if tel is None or not math.isfinite(tel["gap"]) else est(tel, "gap")
    if row == "verdict":
        d = boot.verdict_details()
        split = ", ".join(f"{k} {fmt_share(s)}" for k, s in d["shares"].items())
        allow = (f"peaks within noise allow {' or '.join(d['implied'])}; "
                 if len(d["implied"]) > 1 else "")
        return f"**{d['category']}** ({allow}seed resamples: {split})" if split else (
            f"**{d['category']}**")
    raise KeyError(row)


ROWS = (
    ("trained network: test-MSE peak width", "net_peak"),
    ("... peak height -> at the largest width", "net_height"),
    ("NTK at init (converged kernel regression): peak width; height", "lazy_peak"),
    ("... Spearman with the network, all widths / past its peak", "lazy_rho"),
    ("... relative distance to the network's test predictions at the largest width",
     "lazy_gap"),
    ("kernel distance of K_T from K_0 at the largest width", "kernel"),
    ("after-kernel (NTK of the trained net, same formula): Spearman past the peak; distance at "
     "the largest width", "after"),
    ("telescoping model: median relative distance to the network", "telescoping"),
    ("verdict (`yes` / `partly` / `no`, rule in the report)", "verdict"),
    ("**infinite width** (NTK theory itself): NTK, converged, ridgeless: test MSE; sign error",
     "inf_ntk"),
    ("... NNGP (readout only): test MSE; sign error", "inf_nngp"),
    ("... trained net vs NTK theory for its own initialization (relative distance): smallest "
     "-> largest width", "inf_gap"),
    ("... trained net vs the infinite ensemble's mean at the largest width (floor: one "
     "infinitely wide network)", "inf_mean_gap"),
    ("... sample-wise: the limit's largest rise of test MSE with n", "inf_samples"),
    ("... does the network's peak width have a counterpart in the limit?", "inf_counterpart"),
)


def table(final: pd.DataFrame, boots: dict[str, SeedBootstrap],
          df: pd.DataFrame | None = None) -> list[str]:
    df = final if df is None else df
    kinds = [k for k in MODELS if k in boots]
    lines = ["| | " + " | ".join(COLUMNS[k] for k in kinds) + " |",
             "|---" * (len(kinds) + 1) + "|"]
    for label, key in ROWS:
        if key.startswith("inf_") and not any(k in LIMITS for k in kinds):
            continue
        cells = [_cell(boots.get(kind), key, final, df) for kind in kinds]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    halves = {kind: half_verdicts(final, kind) for kind in MODELS if kind in boots}
    shown = [h for h in halves.values() if h is not None]
    if shown:
        a, b = shown[0]
        label = (f"verdict on seeds {fmt_widths(a['seeds'], a['seeds'])} / "
                 f"{fmt_widths(b['seeds'], b['seeds'])}")
        cells = []
        for kind in kinds:
            h = halves.get(kind)
            cells.append("not run" if h is None else f"{h[0]['category']} / {h[1]['category']}")
        lines.insert(2 + [k for _, k in ROWS].index("verdict") + 1,
                     f"| {label} | {' | '.join(cells)} |")
    return lines


def section(df: pd.DataFrame, config, saved: dict, meta: dict, figure_link: str,
            run_label: str, samples_link: str | None = None) -> str:
    """The README text between the markers (markers included); ``samples_link``: the link of
    the sample-wise figure (none: not shown)."""
    final = final_rows(df)
    boots = {kind: SeedBootstrap(final, kind) for kind in MODELS
             if kind in set(final["model"])}
    main = "transformer" if "transformer" in boots else next(iter(boots))
    preset = saved.get("preset") or "custom"
    lines = [BEGIN, f"<!-- generated by tools/readme_results.py from {run_label}:",
             "     edit the script or the study, not this text -->"]
    lead = short_answer(final, main)
    if "ntk-transformer" in boots:
        lead += " " + limit_short_answer(final, df)
    lines += _para(f"**{lead.strip()}** Measured by `./dev.sh run` ({preset} "
                   f"preset: {setup_text(config, final, meta)[1:]}:")
    lines += ["", f"![ntk-double-descent]({figure_link})", ""]
    if samples_link and not all(SampleBootstrap(df, k).empty for k in LIMITS):
        lines += [f"![ntk-double-descent, sample-wise]({samples_link})", ""]
    lines += table(final, boots, df)
    lines.append("")
    level, agree = fmt_share(LEVEL), fmt_share(AGREEMENT)
    lines += _bullet(
        f"Brackets are {level} percentile intervals of a bootstrap over seeds "
        f"({RESAMPLES} resamples of whole seeds, the same draw at every width, fixed "
        f"seed); \"within noise\" lists the widths whose mean test MSE cannot be told from the "
        f"peak's at that level. A verdict is stated only when at least {agree} of the "
        f"resamples give it and every pair of peak widths within noise (network, NTK at init) "
        f"gives it too, otherwise it is undetermined; the table shows the share of resamples "
        f"behind each answer and the verdicts of two disjoint halves of the seeds.")
    for kind in MODELS:
        if kind in boots:
            lines += _bullet(answer_for(final, kind, boots[kind]))
            if kind in LIMITS:
                text = limit_answer_for(final, df, kind, boots[kind])
                if text:
                    lines += _bullet(text)
    lines.append("")
    full = ndd.PRESETS.get("full", {})
    lines += _para(
        f"Limits: one task, {_ordinal_layers(config.n_layers)} transformers up to width "
        f"{max(config.widths)}, {config.seeds} seeds, kernel regression run to convergence "
        f"without ridge rather than to the network's training time. The `full` preset "
        f"({full.get('data.n_train', '?')} training points, "
        f"{_ordinal_layers(int(full.get('n_layers', 1)))} transformers up to width "
        f"{max(full.get('widths', [0]))}, {full.get('seeds', '?')} seeds, the network's own "
        f"effective parameters through `telescope.Smoother`) is meant for a GPU; the numbers "
        f"above are from the run named below. The infinite-width limits are those of the "
        f"NTK-parametrized transformer family (linear-scaling attention, LayerNorm without "
        f"learned parameters, fixed one-hot positions) and of the one-hidden-layer ReLU MLP in "
        f"NTK parametrization; the standard transformer has none in closed form.")
    lines.append("")
    prov = provenance(meta)
    lines += _para(f"Generated by `tools/readme_results.py {run_label}` from that run's "
                   f"`results.parquet`: machine {prov['machine']}, {prov['commit']}, "
                   f"{prov['date']}{', torch ' + prov['torch'] if prov['torch'] else ''}.")
    lines.append(END)
    return "\n".join(lines)


def _bullet(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent="- ", subsequent_indent="  ",
                         break_on_hyphens=False, break_long_words=False)


def render(readme_text: str, df, config, saved, meta, figure_link: str, run_label: str,
           samples_link: str | None = None) -> str:
    """The README with the section between the markers (and the ``./dev.sh run`` wall time)
    rewritten from the results."""
    begin, end = readme_text.find(BEGIN), readme_text.find(END)
    if begin < 0 or end < begin:
        raise UsageError(f"the README has no {BEGIN} ... {END} block: put the two marker lines "
                         f"where the generated answer belongs (under the section's heading)")
    new = section(df, config, saved, meta, figure_link, run_label, samples_link)
    text = readme_text[:begin] + new + readme_text[end + len(END):]
    seconds = wall_seconds(meta)
    if seconds is not None:
        text = DEV_RUN_TIME.sub(lambda m: f"{m.group(1)}{max(1, round(seconds / 60))}"
                                          f"{m.group(3)}", text, count=1)
    return text


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="readme_results.py", description="Write the README's ntk-double-descent answer "
        "from a saved run (results.parquet, config.json, run.json).")
    parser.add_argument("run_dir", type=Path, help=f"the run directory, e.g. out/{STUDY}")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--figure", type=Path, default=Path("docs/figures") / FIGURE,
                        help="where the run's figure is copied (and linked from the README)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the README or figure differ from the "
                             "results")
    args = parser.parse_args(argv)
    try:
        df, config, saved, meta = load_run(args.run_dir)
        if not args.readme.is_file():
            raise UsageError(f"no README at {args.readme}: pass --readme PATH")
        old = args.readme.read_text(encoding="utf-8")
        link = Path(os.path.relpath(args.figure, args.readme.parent)).as_posix()
        samples_path = args.figure.with_name(SAMPLES_FIGURE)
        samples_link = (Path(os.path.relpath(samples_path, args.readme.parent)).as_posix()
                        if (args.run_dir / SAMPLES_FIGURE).is_file() else None)
        new = render(old, df, config, saved, meta, link, args.run_dir.as_posix(), samples_link)
    except TelescopeError as err:
        print(f"readme_results.py: error: {err}", file=sys.stderr)
        return 2
    copies = {}   # destination -> bytes of the run's figure
    for name, dest in ((FIGURE, args.figure), (SAMPLES_FIGURE, samples_path)):
        source = args.run_dir / name
        if source.is_file():
            copies[dest] = source.read_bytes()
        elif name == FIGURE:
            print(f"readme_results.py: {source} not found; the figure was left as it is "
                  f"(`telescope report {args.run_dir}` draws it)", file=sys.stderr)
    if args.check:
        stale = []
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(keepends=True), new.splitlines(keepends=True),
                fromfile=f"{args.readme} (now)", tofile=f"{args.readme} (from the results)"))
            stale.append(str(args.readme))
        stale += [str(dest) for dest, data in copies.items()
                  if not dest.is_file() or dest.read_bytes() != data]
        if stale:
            print(f"readme_results.py: {' and '.join(stale)} differ from {args.run_dir}; run "
                  f"without --check to rewrite", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.readme.write_text(new, encoding="utf-8")
    for dest, data in copies.items():
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    print(f"readme_results.py: {args.readme} {'rewritten' if new != old else 'unchanged'} "
          f"from {args.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
