"""The sweep loop: run every unfinished point of a study into a run directory, resumably.

Workers only compute: each point's ``run_point`` runs on an executor
(:mod:`telescope.runs.executors`) and returns its rows; the parent process writes each point's
file the moment it arrives (atomically, :mod:`telescope.runs.store`) and rebuilds
``results.parquet``, so a run killed at any moment loses at most the points in flight, and
re-running the same command skips the finished ones. A point that raises writes nothing: the
error is reported (which point, and a traceback summary), the other points go on, and
:func:`run_sweep` returns the failures (the CLI then exits non-zero).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from telescope.errors import UsageError
from telescope.runs.executors import (
    LocalExecutor,
    PointResult,
    RayExecutor,
    _label,
    _summarize,
)
from telescope.runs.plan import plan_sweep
from telescope.runs.provenance import versions
from telescope.runs.store import RunDirectoryError, RunStore, point_key
from telescope.studies.config import config_to_dict

__all__ = ["SweepResult", "run_sweep"]


@dataclass
class SweepResult:
    """What :func:`run_sweep` did."""

    run_dir: Path
    total: int
    skipped: int
    computed: int
    failed: list[PointResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return self.skipped + self.computed


def _concurrency(executor: Any) -> int | None:
    """Points that run at once on this machine (``None``: elsewhere, e.g. Ray)."""
    if isinstance(executor, LocalExecutor):
        return executor.workers
    return None


def run_sweep(study: Any, config: Any, run_dir: str | os.PathLike, *,
              preset: str | None = None, executor: LocalExecutor | RayExecutor | None = None,
              force: bool = False, progress: bool = True,
              log: Callable[[str], None] | None = None) -> SweepResult:
    """Run every point of ``study`` under ``config`` not yet finished in ``run_dir``.

    Checks the sweep's size first (:func:`telescope.runs.plan.plan_sweep`). Writes
    ``config.json`` (or checks it: a different config raises
    :class:`~telescope.runs.store.ConfigMismatchError` unless ``force``, which discards the old
    results; a directory that is not a telescope run is refused), each point's file as it
    completes, ``results.parquet`` after each point and ``run.json`` (metadata) at the end, also
    when interrupted. The directory is locked for the run. A point file that cannot be read is
    moved to ``set-aside/`` and its point runs again; so is a ``results.parquet`` that holds more
    than the point files. Failed points are reported through ``log`` and returned in
    :attr:`SweepResult.failed`; they are retried by the next run. A run directory that cannot be
    written (disk full) raises :class:`~telescope.runs.store.RunDirectoryError` saying what was
    saved.
    """
    from tqdm.auto import tqdm

    executor = executor or LocalExecutor(1, progress=progress)
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    points = plan_sweep(study, config, workers=_concurrency(executor)).points
    if not points:
        raise UsageError(f"study {study.name!r}: the sweep has no points")
    with RunStore(run_dir) as store:
        store.prepare(study.name, preset, config_to_dict(config), force=force)
        frames, damaged = store.scan_points(points)
        for path, why in damaged.items():
            kept = store.set_aside(path)
            log(f"{path} cannot be read ({why}); kept as {kept}; its point runs again")
        risk = store.results_at_risk(points, frames)
        if risk:
            kept = store.set_aside(store.results_path)
            log(f"{store.results_path} was not rebuilt from the point files ({risk}); kept as "
                f"{kept}; the missing points run again")
        if frames:
            store.write_results(points, frames)
        return _sweep(study, config, executor, store, points, frames, preset, progress, log)


def _sweep(study: Any, config: Any, executor: Any, store: RunStore, points: list[dict[str, Any]],
           frames: dict[str, Any], preset: str | None, progress: bool,
           log: Callable[[str], None]) -> SweepResult:
    """The sweep proper, in a prepared and locked run directory (see :func:`run_sweep`)."""
    from tqdm.auto import tqdm

    pending = [p for p in points if point_key(p) not in frames]
    result = SweepResult(store.dir, total=len(points), skipped=len(frames), computed=0)

    meta = store.read_meta()
    current = versions()
    meta.update({"study": study.name, "preset": preset, "points_total": len(points),
                 "points_done": len(frames), "versions": current})
    point_seconds: dict[str, float] = {k: v for k, v in meta.get("point_seconds", {}).items()
                                       if k in frames}
    session = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "seconds": None, "executor": executor.describe(), "argv": sys.argv[1:],
               "computed": 0, "skipped": len(frames), "failed": 0,
               "versions": current}  # each session's own: which code computed which points
    sessions = [*meta.get("sessions", [])[-49:], session]  # the last 50 sessions
    meta["sessions"] = sessions
    store.write_meta(meta)

    start = time.perf_counter()
    bar = tqdm(total=len(points), initial=len(frames), desc=study.name, unit="point",
               disable=not progress, file=sys.stderr, dynamic_ncols=True, position=0)
    results_error: list[OSError] = []   # results.parquet could not be written (disk full)

    def on_result(res: PointResult) -> None:
        key = point_key(res.point)
        if res.ok:
            try:
                frames[key] = store.write_point(res.point, res.rows or [], seconds=res.seconds)
            except Exception as exc:  # noqa: BLE001 - rows pyarrow cannot store, a full disk
                res = PointResult(res.point, error=f"cannot save its rows: {_summarize(exc)}",
                                  traceback="".join(traceback.format_exception(exc)),
                                  seconds=res.seconds)
        if res.ok:
            try:
                store.write_results(points, frames)
            except RunDirectoryError as exc:  # the point is saved; results.parquet lags
                results_error.append(exc)
            except Exception as exc:  # noqa: BLE001 - e.g. a column's type differs by point
                frames.pop(key, None)          # not resumable as done: remove it
                with contextlib.suppress(OSError):
                    store.point_path(res.point).unlink()
                with contextlib.suppress(Exception):
                    store.write_results(points, frames)
                res = PointResult(res.point, error=f"cannot save its rows: {_summarize(exc)}",
                                  traceback="".join(traceback.format_exception(exc)),
                                  seconds=res.seconds)
            else:
                results_error.clear()
        if res.ok:
            result.computed += 1
            point_seconds[key] = round(res.seconds, 3)
        else:
            result.failed.append(res)
            log(f"point {_label(res.point, 200)} failed after {res.seconds:.1f} s: "
                f"{res.error}")
            bar.set_postfix(failed=len(result.failed))
        bar.update(1)

    meta_error: RunDirectoryError | None = None
    interrupted = True
    try:
        executor.run(study, config, pending, on_result)
        interrupted = False
    finally:
        bar.close()
        result.seconds = time.perf_counter() - start
        # what is on disk counts: a signal may land between a point's write and its tally
        result.computed = len(frames) - result.skipped
        session.update(seconds=round(result.seconds, 3), computed=result.computed,
                       failed=len(result.failed))
        meta.update({
            "points_done": len(frames),
            "point_seconds": point_seconds,
            "compute_seconds": round(sum(point_seconds.values()), 3),
            "wall_seconds": round(sum(s.get("seconds") or 0.0 for s in sessions), 3),
            "failed": [{"point": f.point, "key": point_key(f.point), "error": f.error,
                        "traceback": f.traceback} for f in result.failed],
        })
        try:
            store.write_meta(meta)
        except RunDirectoryError as exc:
            meta_error = exc
            if interrupted:  # the interruption propagates: say it here
                log(f"telescope: {exc}")
    if meta_error is not None or results_error:
        what = ", ".join(f for f, bad in (("run.json", meta_error),
                                          ("results.parquet", results_error)) if bad)
        cause = meta_error or results_error[0]
        original = cause.__cause__ if isinstance(cause.__cause__, OSError) else cause
        reason = original.strerror or str(original)
        lost = len(result.failed)
        raise RunDirectoryError(
            f"cannot write {what} in {store.dir} ({reason}): {len(frames)} of "
            f"{len(points)} points are saved in {store.points_dir}"
            + (f", {lost} failed or could not be saved" if lost else "")
            + "; free some space and re-run the same command to finish (or `telescope report "
            f"{store.dir}` to rebuild results.parquet)") from cause
    return result
