"""``report.html``: one self-contained page per study run.

The page holds the study's title and description, its headline numbers, every figure embedded
as a base64 PNG (``data:`` URIs: the file can be mailed or opened anywhere, it references
nothing outside itself), the reading guide, the config as a table and the run's metadata
(points done / total, failures, wall time, versions).
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import os
import re
import sys
import textwrap
import traceback
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from telescope.runs.store import (
    RunStore,
    _reason,
    atomic_write_text,
    concat_points,
    ensure_writable_dir,
    point_key,
)
from telescope.studies import get_study
from telescope.studies.config import config_from_dict, flatten_config

__all__ = ["write_report", "rebuild_report", "render_guide", "ReportError"]


class ReportError(RuntimeError):
    """A study's ``figures`` or ``headline`` raised, or files of the run could not be read; the
    report was written with what there was, and says what is missing."""


_CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: #222; max-width: 1100px; margin: 2em auto; padding: 0 1.5em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.prose { max-width: 60em; line-height: 1.45; }
figure { margin: 1em 0 1.6em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
code { background: #f4f4f4; padding: 0 0.25em; border-radius: 3px; font-size: 0.92em; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
.error { border-left: 4px solid #555; background: #f6f6f6; padding: 0.4em 0.8em; }
"""


def _fmt(value: Any) -> str:
    """A compact, readable rendering of a headline or config value."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}" if abs(int(value)) >= 10000 else str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def headline_text(headline: Mapping[str, Any], width: int = 100) -> str:
    """The headline as plain text for a terminal: ``quantity: value`` lines, long values (such
    as a study's answer in words) wrapped to ``width`` columns."""
    lines = []
    for key, value in headline.items():
        text = f"{key}: {_fmt(value)}"
        lines += textwrap.wrap(text, width, subsequent_indent="    ") or [text]
    return "\n".join(lines)


def _table(rows: Mapping[str, Any] | list[tuple[str, Any]],
           header: tuple[str, str] | None = None) -> str:
    items = rows.items() if isinstance(rows, Mapping) else rows
    body = []
    for key, value in items:
        cls = ' class="num"' if isinstance(value, numbers.Number) and not isinstance(
            value, bool) else ""
        body.append(f"<tr><th>{html.escape(str(key))}</th>"
                    f"<td{cls}>{html.escape(_fmt(value))}</td></tr>")
    head = "" if header is None else (
        f"<thead><tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>"
        "</thead>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def _inline(text: str) -> str:
    """Escape, then ``code`` and **bold** (the guide's only inline markup)."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return out


def render_guide(text: str) -> str:
    """The reading guide as HTML: blank-line separated paragraphs, ``- `` bullet lists,
    ``#`` headings, ```code``` and ``**bold**``; everything else is escaped."""
    blocks: list[str] = []
    for block in re.split(r"\n\s*\n", (text or "").strip()):
        lines = [ln.rstrip() for ln in block.strip().splitlines()]
        if not lines or not lines[0]:
            continue
        if all(re.match(r"\s*[-*] ", ln) or (i and ln.startswith("  "))
               for i, ln in enumerate(lines)):
            items: list[str] = []
            for ln in lines:
                m = re.match(r"\s*[-*] (.*)", ln)
                if m:
                    items.append(m.group(1))
                else:
                    items[-1] += " " + ln.strip()
            blocks.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
        elif lines[0].startswith("#"):
            title = lines[0].lstrip("#").strip()
            blocks.append(f"<h3>{_inline(title)}</h3>")
            if lines[1:]:
                blocks.append(f"<p>{_inline(' '.join(ln.strip() for ln in lines[1:]))}</p>")
        else:
            blocks.append(f"<p>{_inline(' '.join(ln.strip() for ln in lines))}</p>")
    return "\n".join(blocks)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.stem)
    return (f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(path.name)} (also {html.escape(path.stem)}.svg)"
            f"</figcaption></figure>")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def write_report(run_dir: str | os.PathLike, study: Any, config: Any,
                 df: pd.DataFrame, *, meta: Mapping[str, Any] | None = None,
                 save_meta: bool = True, notes: list[str] | None = None) -> Path:
    """Make the study's figures from ``df`` and write ``run_dir/report.html``; returns its path.

    ``meta``: the run's metadata to show (default: ``run.json``); ``save_meta``: record the
    figures in ``run.json`` (off while another run writes the directory); ``notes``: lines
    shown at the top of the page (e.g. files that could not be read).

    If the study's ``figures`` or ``headline`` raises, the page is still written (with the
    error in place of the missing part) and :class:`ReportError` is raised afterwards. A
    directory that cannot be written raises
    :class:`~telescope.runs.store.RunDirectoryError`.
    """
    run_dir = Path(run_dir)
    store = RunStore(run_dir)
    meta = dict(store.read_meta() if meta is None else meta)
    errors: list[tuple[str, BaseException]] = []

    figures: list[Path] = []
    headline: dict[str, Any] = {}
    if len(df):
        try:
            figures = [Path(p) for p in (study.figures(df, config, run_dir) or [])]
        except Exception as exc:  # noqa: BLE001 - reported in the page, then raised
            errors.append(("figures", exc))
        try:
            headline = dict(study.headline(df, config) or {})
        except Exception as exc:  # noqa: BLE001
            errors.append(("headline", exc))
    meta["figures"] = [p.name for p in figures]
    if meta and save_meta:
        store.write_meta(meta)

    total = meta.get("points_total")
    done = meta.get("points_done")
    failed = meta.get("failed") or []
    title = f"telescope study: {study.name}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="sub">{html.escape(study.description)}</p>']
    status = [f"{done if done is not None else '?'} of {total if total is not None else '?'} "
              f"points done"]
    if failed:
        status.append(f"{len(failed)} failed")
    if total is not None and done is not None and done < total:
        status.append("partial results: re-run the same command to finish")
    parts.append(f"<p><strong>{html.escape('; '.join(status))}</strong></p>")
    for note in notes or []:
        parts.append(f'<div class="error"><p>{html.escape(note)}</p></div>')

    for what, exc in errors:
        tb = "".join(traceback.format_exception(exc))
        parts.append(f'<div class="error"><p>The study\'s <code>{what}</code> failed:</p>'
                     f"<pre>{html.escape(tb)}</pre></div>")

    parts.append("<h2>Headline numbers</h2>")
    if headline:
        # long texts (e.g. a study's answer in words) read better as paragraphs than cells
        prose = {k: v for k, v in headline.items() if isinstance(v, str) and len(v) > 120}
        for key, text in prose.items():
            parts.append(f'<p class="prose"><strong>{html.escape(str(key))}:</strong> '
                         f"{html.escape(text)}</p>")
        rest = {k: v for k, v in headline.items() if k not in prose}
        if rest:
            parts.append(_table(rest, ("quantity", "value")))
    elif not len(df):
        parts.append("<p>No results yet.</p>")
    else:
        parts.append("<p>None.</p>")

    parts.append("<h2>Figures</h2>")
    pngs = [p if p.is_absolute() else run_dir / p for p in figures]
    shown = [p for p in pngs if p.suffix.lower() == ".png" and p.is_file()]
    if shown:
        parts.extend(_img(p) for p in shown)
    else:
        parts.append("<p>No figures.</p>")

    if study.guide:
        parts.append("<h2>How to read this</h2>")
        parts.append(render_guide(study.guide))

    parts.append("<h2>Config</h2>")
    saved = store.read_config() if store.config_path.is_file() else {}
    preset = saved.get("preset")
    cfg_rows = [("study", study.name), ("preset", preset if preset else "(defaults)")]
    cfg_rows += list(flatten_config(config).items())
    parts.append(_table(cfg_rows, ("key", "value")))

    parts.append("<h2>Run</h2>")
    versions = meta.get("versions") or {}
    sessions = meta.get("sessions") or []
    run_rows: list[tuple[str, Any]] = [
        ("points done", f"{done} / {total}"),
        ("failed points", len(failed)),
        ("result rows", len(df)),
        ("wall time (all sessions)", _duration(meta.get("wall_seconds"))),
        ("compute time (sum over points)", _duration(meta.get("compute_seconds"))),
        ("sessions", len(sessions)),
    ]
    if sessions:
        last = sessions[-1]
        run_rows += [("last session", f"{last.get('started', '?')}, {last.get('executor', '?')}"),
                     ("command", "telescope " + " ".join(map(str, last.get("argv") or [])))]
    run_rows += [(f"version: {k}", v) for k, v in versions.items()]
    run_rows.append(("report written",
                     datetime.now(timezone.utc).isoformat(timespec="seconds")))
    parts.append(_table(run_rows))
    if failed:
        parts.append("<h3>Failed points</h3>")
        for f in failed:
            parts.append(f"<p><code>{html.escape(str(f.get('point')))}</code></p>"
                         f"<pre>{html.escape(str(f.get('error')))}</pre>")
    parts.append("<p>Files: <code>results.parquet</code> (tidy rows, one per point and "
                 "measurement step; <code>pandas.read_parquet</code>), <code>config.json</code>, "
                 "<code>run.json</code>, <code>points/</code>; figures as PNG and SVG.</p>")

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title>"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = run_dir / "report.html"
    store._write(path, lambda: atomic_write_text(path, page))
    if errors:
        what, exc = errors[0]
        print("".join(traceback.format_exception(exc)), file=sys.stderr)
        raise ReportError(f"the study's {what} failed ({type(exc).__name__}: {exc}); "
                          f"the report shows the error: {path}") from exc
    return path


def rebuild_report(run_dir: str | os.PathLike, *,
                   log: Callable[[str], None] | None = None) -> Path:
    """Make the figures and ``report.html`` of a run directory again from its saved results and
    ``config.json`` (nothing is recomputed, nothing is deleted); returns the report's path.

    ``results.parquet`` is what the report shows. It is rebuilt from the point files only when
    that loses nothing: every point file can be read, there is a ``points/`` directory, the
    rebuilt table holds at least what the current one does, and no run is writing the
    directory (its lock is free). Otherwise it is left byte for byte as it is and the report
    uses it (or, where it is missing or unreadable, the point files that can be read).

    ``log`` gets one line per thing worth knowing (a missing ``points/``, a run in progress).
    Files that cannot be read raise :class:`ReportError` after the report is written.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    run_dir = Path(run_dir)
    with RunStore(run_dir) as store:
        saved = store.read_config()
        ensure_writable_dir(run_dir, "the run directory",
                            "make it writable (or copy it) and run telescope report again")
        study = get_study(saved["study"])
        config = config_from_dict(study.config_cls, saved["config"], strict=False)
        points = list(study.points(config))
        frames, damaged = store.scan_points(points)
        unreadable = [f"{path} ({why})" for path, why in damaged.items()]
        existing = None
        if store.results_path.exists():
            try:
                existing = store.read_results()
            except (OSError, ValueError) as err:
                unreadable.insert(0, f"{store.results_path} ({_reason(err)})")
        owner = store.try_lock()
        if not owner:
            log(f"a run is writing {run_dir}: results.parquet and run.json are left to it")
        has_points = store.points_dir.is_dir()
        if not has_points:
            log(f"{store.points_dir} is missing: the report shows results.parquet as it is")

        df = concat_points(points, frames)
        can_rebuild = (owner and has_points and not unreadable
                       and store.results_at_risk(points, frames) is None)
        if existing is not None and not can_rebuild:
            df = existing
        elif existing is not None and _same_table(df, existing):
            df = existing                                  # nothing to write
        elif can_rebuild and len(df.columns):
            df = store.write_results(points, frames)

        meta = store.read_meta()
        done_keys = {point_key(p) for p in points if point_key(p) in frames}
        if has_points and not unreadable:
            meta.update({"study": study.name, "points_total": len(points),
                         "points_done": len(done_keys),
                         "failed": [f for f in meta.get("failed") or []
                                    if f.get("key") not in done_keys]})
        notes = []
        if unreadable:
            notes.append(f"{len(unreadable)} file(s) could not be read: "
                         f"{'; '.join(unreadable)}. results.parquet was left as it is.")
        path = write_report(run_dir, study, config, df, meta=meta,
                            save_meta=owner and has_points and not unreadable, notes=notes)
    if unreadable:
        shown = "; ".join(unreadable[:3]) + ("; ..." if len(unreadable) > 3 else "")
        raise ReportError(f"{len(unreadable)} file(s) of {run_dir} could not be read ({shown}); "
                          f"results.parquet was left as it is and the report shows "
                          f"{'it' if existing is not None else 'the readable points'}: {path}. "
                          f"Re-run the study's command: it moves the damaged files to "
                          f"set-aside/ and computes their points again")
    return path


def _same_table(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    try:
        pd.testing.assert_frame_equal(a, b, check_dtype=False)
    except AssertionError:
        return False
    return True
