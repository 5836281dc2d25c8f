"""Run directories, tidy result tables and resumable sweeps on local or Ray executors.

- :func:`run_sweep` -- run a study's sweep into a run directory, skipping finished points
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
    SweepResult,
    TqdmProgress,
    execute_point,
    make_executor,
    run_sweep,
    versions,
)
from telescope.runs.store import (
    ConfigMismatchError,
    RunStore,
    atomic_write,
    atomic_write_text,
    point_key,
    rows_to_frame,
)

__all__ = ["run_sweep", "RunStore", "ConfigMismatchError", "LocalExecutor", "RayExecutor",
           "make_executor", "ExecutorUnavailableError", "Progress", "TqdmProgress",
           "PointResult", "SweepResult", "execute_point", "versions", "point_key",
           "atomic_write", "atomic_write_text", "rows_to_frame"]
