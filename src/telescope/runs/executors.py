"""Where a sweep's points run: in this process, on K local worker processes, or on Ray.

Workers only compute: each point's ``run_point`` runs in a worker (:func:`execute_point`) and
its rows, or the error it raised, come back as a :class:`PointResult`; the sweep loop
(:func:`telescope.runs.sweep.run_sweep`) writes them.

Worker processes never outlive the run: each exits when its parent process dies, however it dies
(``prctl(PR_SET_PDEATHSIG)`` on Linux, and a watchdog thread everywhere that polls the parent's
pid), and ignores SIGINT and SIGTERM, which are the parent's to handle: an interrupted parent
stops its workers itself, keeps the finished points and writes ``run.json``.

Threads: the sequential executor uses the process's own torch thread count (``--threads``);
``K`` local workers each use ``max(1, cpus // K)`` threads (``cpus``: the CPUs this process may
run on) unless told otherwise; a Ray task uses as many threads as the CPUs it reserved.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from telescope._threads import available_cpus, configure_threads
from telescope.errors import TelescopeError, UsageError
from telescope.kernels.distributed import ray_session

# versions, git_commit and machine moved to telescope.runs.provenance; still importable from here
from telescope.runs.provenance import git_commit, machine, versions
from telescope.studies import get_study
from telescope.studies.base import REGISTRY
from telescope.train.progress import Progress, TqdmProgress

__all__ = ["Progress", "TqdmProgress", "PointResult", "LocalExecutor", "RayExecutor",
           "ExecutorUnavailableError", "make_executor", "execute_point", "versions",
           "git_commit", "machine"]


# --------------------------------------------------------------------------- one point


@dataclass
class PointResult:
    """What a worker sends back for one point: its rows, or the error it raised."""

    point: dict[str, Any]
    rows: list[dict[str, Any]] | None = None
    error: str | None = None        # one-paragraph summary (exception and last frames)
    traceback: str | None = None    # the full traceback
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def _summarize(exc: BaseException, frames: int = 3) -> str:
    tb = traceback.extract_tb(exc.__traceback__)[-frames:]
    where = "".join(f"\n    {Path(f.filename).name}:{f.lineno} in {f.name}" for f in tb)
    return f"{type(exc).__name__}: {exc}{where}"


def execute_point(study: Any, config: Any, point: Mapping[str, Any],
                  progress: Progress | None = None) -> PointResult:
    """Run ``study.run_point`` on one point, catching its errors (not KeyboardInterrupt)."""
    progress = progress if progress is not None else Progress()
    start = time.perf_counter()
    try:
        rows = study.run_point(config, dict(point), progress)
        if rows is None or isinstance(rows, Mapping):
            raise TypeError("run_point must return a list of dicts (tidy rows), got "
                            f"{type(rows).__name__}")
        rows = [dict(r) for r in rows]
    except Exception as exc:  # noqa: BLE001 - every error of a point is reported, not raised
        return PointResult(dict(point), error=_summarize(exc),
                           traceback="".join(traceback.format_exception(exc)),
                           seconds=time.perf_counter() - start)
    finally:
        progress.close()
    return PointResult(dict(point), rows=rows, seconds=time.perf_counter() - start)


def _label(point: Mapping[str, Any], width: int = 60) -> str:
    text = " ".join(f"{k}={v}" for k, v in point.items())
    return text if len(text) <= width else text[: width - 3] + "..."


OnResult = Callable[[PointResult], None]


# --------------------------------------------------------------------------- executors


class ExecutorUnavailableError(TelescopeError, RuntimeError):
    """The requested executor cannot run here (e.g. Ray is not installed)."""


def _study_ref(study: Any) -> Any:
    """The study itself when it pickles (module-level functions), else its registry name."""
    try:
        pickle.dumps(study)
        return study
    except Exception:  # noqa: BLE001 - lambdas or closures: the worker looks the name up
        return study.name


def _resolve_study(ref: Any) -> Any:
    if isinstance(ref, str):
        return get_study(ref)
    return ref


_PR_SET_PDEATHSIG = 1
WATCHDOG_SECONDS = 0.5
"""How often a worker checks that its parent is still alive (the portable fallback)."""


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker process exit when the process ``parent_pid`` (its parent) dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_SECONDS)
            if os.getppid() != parent_pid:  # orphaned: re-parented to init or a subreaper
                os._exit(1)

    threading.Thread(target=watch, name="telescope-parent-watchdog", daemon=True).start()


def _init_worker(threads: int, parent_pid: int | None = None) -> None:
    """Set up a worker process: leave SIGINT/SIGTERM to the parent, exit with the parent, set
    the torch threads."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    configure_threads(threads)


def _worker_run(study_ref: Any, config: Any, point: dict[str, Any]) -> PointResult:
    return execute_point(_resolve_study(study_ref), config, point, Progress())


class LocalExecutor:
    """Points on this machine: in this process (``workers=1``) or on ``workers`` processes.

    Worker processes are started with the ``spawn`` method (safe with torch's threads) and
    each sets ``threads`` torch threads (default ``max(1, cpus // workers)``).
    """

    name = "local"

    def __init__(self, workers: int = 1, *, threads: int | None = None,
                 progress: bool = True) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise UsageError(f"workers must be a positive integer, got {workers!r}")
        self.workers = workers
        self.threads = threads
        self.progress = progress

    def describe(self) -> str:
        if self.workers == 1:
            return "local, sequential"
        threads = self._threads()
        return (f"local, {self.workers} worker processes x {threads} "
                f"thread{'s' if threads > 1 else ''}")

    def _threads(self) -> int:
        return self.threads or max(1, available_cpus() // self.workers)

    def run(self, study: Any, config: Any, points: Sequence[dict[str, Any]],
            on_result: OnResult) -> None:
        """Run every point and hand each result to ``on_result`` as soon as it is done."""
        if not points:
            return
        if self.workers == 1:
            for point in points:
                bar = TqdmProgress(_label(point), position=1, enabled=self.progress)
                on_result(execute_point(study, config, point, bar))
            return
        self._run_pool(study, config, list(points), on_result)

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=self.workers,
                                      mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker,
                                      initargs=(self._threads(), os.getpid()))

    def _run_pool(self, study: Any, config: Any, points: list[dict[str, Any]],
                  on_result: OnResult) -> None:
        ref = _study_ref(study)
        queue = list(reversed(points))
        inflight: dict[cf.Future, tuple[dict[str, Any], float]] = {}
        pool = self._new_pool()
        broken = False
        try:
            while queue or inflight:
                if broken and not inflight:
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = self._new_pool()
                    broken = False
                while queue and len(inflight) < self.workers and not broken:
                    point = queue.pop()
                    inflight[pool.submit(_worker_run, ref, config, point)] = (
                        point, time.perf_counter())
                done, _ = cf.wait(list(inflight), return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    point, start = inflight.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool as exc:
                        broken = True
                        result = PointResult(point, error="the worker process died (killed, "
                                             f"out of memory or crashed): {exc}",
                                             seconds=time.perf_counter() - start)
                    except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
                        result = PointResult(point, error=_summarize(exc),
                                             traceback="".join(traceback.format_exception(exc)),
                                             seconds=time.perf_counter() - start)
                    on_result(result)
        except BaseException:
            # interrupted: stop the workers we started (they ignore SIGTERM), do not wait for
            # their points
            procs = list((getattr(pool, "_processes", None) or {}).values())
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.join(timeout=5)
            raise
        pool.shutdown(wait=True)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorUnavailableError(
            "the ray executor needs Ray, which is not installed: pip install 'telescope[ray]'"
        ) from None
    return ray


def _ray_task(study_ref: Any, config: Any, point: dict[str, Any], threads: int) -> PointResult:
    configure_threads(threads)
    return execute_point(_resolve_study(study_ref), config, point, Progress())


class RayExecutor:
    """One Ray task per point, each reserving ``cpus_per_point`` CPUs (and using that many
    torch threads). ``address=None`` starts a local Ray instance for the run (shut down at
    the end); ``"auto"`` or ``"ray://host:10001"`` joins a cluster. An already initialized
    Ray session is used as it is."""

    name = "ray"

    def __init__(self, address: str | None = None, *, cpus_per_point: int = 1,
                 threads: int | None = None) -> None:
        if isinstance(cpus_per_point, bool) or not isinstance(cpus_per_point, int) or \
                cpus_per_point < 1:
            raise UsageError(f"cpus_per_point must be a positive integer, got {cpus_per_point!r}")
        self.address = address
        self.cpus_per_point = cpus_per_point
        self.threads = threads
        _import_ray()  # fail early, with the install hint

    def describe(self) -> str:
        where = self.address or "a local instance"
        return f"ray on {where}, {self.cpus_per_point} CPU(s) per point"

    def run(self, study: Any, config: Any, points: Sequence[dict[str, Any]],
            on_result: OnResult) -> None:
        """Submit every point as a task; hand each result to ``on_result`` as it arrives."""
        if not points:
            return
        ray = _import_ray()
        with ray_session(ray, address=self.address,
                         num_cpus=max(available_cpus(), self.cpus_per_point),
                         configure_logging=True) as refs:
            task = ray.remote(num_cpus=self.cpus_per_point, max_retries=0)(_ray_task)
            study_ref = ray.put(_ray_study_ref(study))
            config_ref = ray.put(config)
            threads = self.threads or self.cpus_per_point
            for point in points:
                refs[task.remote(study_ref, config_ref, point, threads)] = (
                    point, time.perf_counter())
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    point, start = refs.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a task or worker failure
                        result = PointResult(point, error=_summarize(exc),
                                             traceback="".join(traceback.format_exception(exc)),
                                             seconds=time.perf_counter() - start)
                    on_result(result)

def _ray_study_ref(study: Any) -> Any:
    # Ray's serializer handles closures too; registered studies travel by name, which keeps
    # the payload small and the worker's definition authoritative.
    if REGISTRY.get(study.name.lower().replace("_", "-")) is study:
        return study.name
    return study


def make_executor(kind: str = "local", *, workers: int = 1, address: str | None = None,
                  cpus_per_point: int | None = None, threads: int | None = None,
                  progress: bool = True) -> LocalExecutor | RayExecutor:
    """``"local"`` -> :class:`LocalExecutor`, ``"ray"`` -> :class:`RayExecutor`."""
    if kind == "local":
        if address:
            raise UsageError("--address is for --executor ray")
        return LocalExecutor(workers, threads=threads or cpus_per_point, progress=progress)
    if kind == "ray":
        if workers != 1:
            raise UsageError("--workers is for --executor local; Ray runs as many points at "
                             "once as the cluster's CPUs allow (see --cpus-per-point)")
        return RayExecutor(address, cpus_per_point=cpus_per_point or 1, threads=threads)
    raise UsageError(f"unknown executor {kind!r}; executors: local, ray")
