"""Run directories, tidy result tables and resumable sweeps on local or Ray executors.

- :func:`run_sweep` -- run a study's sweep into a run directory, skipping finished points
- :func:`plan_sweep` -- the sweep's points and largest point's memory, checked before it runs
- :class:`RunStore` -- the files of a run directory (config, per-point Parquet, results)
- :class:`LocalExecutor`, :class:`RayExecutor`, :func:`make_executor` -- where points run
- :class:`Progress` -- what a study's ``run_point`` reports its progress to
"""

from telescope.runs.executors import (
    ExecutorUnavailableError,
    LocalExecutor,
    PointResult,
    Progress,
    RayExecutor,
    TqdmProgress,
    execute_point,
    make_executor,
)
from telescope.runs.plan import MAX_POINTS, SweepPlan, SweepTooLargeError, plan_sweep
from telescope.runs.points import point_key, rows_to_frame
from telescope.runs.provenance import git_commit, machine, versions
from telescope.runs.store import (
    ConfigMismatchError,
    NotARunError,
    RunDirectoryError,
    RunInUseError,
    RunStore,
    atomic_write,
    atomic_write_text,
    ensure_writable_dir,
)
from telescope.runs.sweep import SweepResult, run_sweep

__all__ = ["run_sweep", "RunStore", "ConfigMismatchError", "NotARunError", "RunDirectoryError",
           "RunInUseError", "LocalExecutor", "RayExecutor", "make_executor",
           "ExecutorUnavailableError", "Progress", "TqdmProgress", "PointResult", "SweepResult",
           "execute_point", "versions", "git_commit", "machine", "point_key", "atomic_write",
           "atomic_write_text", "rows_to_frame", "ensure_writable_dir", "plan_sweep",
           "SweepPlan", "SweepTooLargeError", "MAX_POINTS"]
