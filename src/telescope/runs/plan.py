"""How big a sweep is, checked before anything runs: its points, and the memory of the largest.

:func:`plan_sweep` counts the points without building the whole list when there are many seeds
(a sweep is ``points(config with seeds=1) x seeds``), refuses more than
:data:`~telescope.studies.config.MAX_POINTS` points with a message naming the knob to turn, and,
when the study has an ``estimate_memory`` hook, refuses a largest point (times the points
running at once) that needs more memory than this machine has.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from telescope.errors import UsageError
from telescope.runs.points import point_key
from telescope.studies.config import MAX_POINTS, flatten_config

__all__ = ["MAX_POINTS", "SweepPlan", "SweepTooLargeError", "plan_sweep", "check_points",
           "total_memory", "format_bytes"]


class SweepTooLargeError(UsageError):
    """The sweep has too many points, or its largest point needs more memory than there is."""


@dataclass
class SweepPlan:
    """What a sweep will run: its points and, where the study can estimate it, the memory of
    its largest point."""

    points: list[dict[str, Any]]
    memory: int | None = None               # bytes of the largest point (None: not estimated)
    largest: dict[str, Any] | None = None   # that point

    def describe(self) -> str:
        """``"12 points, the largest needs about 1.2 GB"`` (memory only where estimated)."""
        text = f"{len(self.points):,} point{'s' if len(self.points) != 1 else ''}"
        if self.memory is not None:
            text += f", the largest needs about {format_bytes(self.memory)}"
        return text


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def total_memory() -> int | None:
    """The memory this process may use: the machine's physical memory, or the cgroup limit
    where it is lower; ``None`` where it cannot be told."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - Windows
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2 ** 60:
            limits.append(int(text))
    return min(limits) if limits else None


def check_points(study: Any, points: Any) -> list[dict[str, Any]]:
    """``points(config)``'s result as a list of distinct dicts; a clear error otherwise (a bug
    of the study: plain ``ValueError``)."""
    if not isinstance(points, (list, tuple)):
        raise ValueError(f"study {study.name!r}: points(config) must return a list of dicts")
    seen: dict[str, dict] = {}
    out = []
    for point in points:
        if not isinstance(point, Mapping):
            raise ValueError(f"study {study.name!r}: every sweep point must be a dict, got "
                             f"{point!r}")
        key = point_key(point)
        if key in seen:
            raise ValueError(f"study {study.name!r}: the sweep point {dict(point)} appears twice")
        seen[key] = dict(point)
        out.append(dict(point))
    return out


def _longest_lists(config: Any) -> list[tuple[str, int]]:
    lists = [(k, len(v)) for k, v in flatten_config(config).items()
             if isinstance(v, (list, tuple)) and len(v) > 1]
    lists.sort(key=lambda kv: -kv[1])
    # the longest lists (at least half as long as the longest): likely the swept ones
    return [kv for kv in lists if 2 * kv[1] >= lists[0][1]][:3] if lists else []


def _too_many(study: Any, config: Any, n: int, per_seed: int | None,
              max_points: int) -> SweepTooLargeError:
    seeds = getattr(config, "seeds", 1)
    lists = _longest_lists(config)
    if per_seed is not None and seeds > 1 and seeds >= per_seed:   # the seeds are the knob
        detail, fix = f"seeds={seeds} x {per_seed:,} points per seed", "lower seeds"
    else:
        named = ", ".join(f"{k} ({v:,} values)" for k, v in lists) or "the swept lists"
        detail = (f"{per_seed:,} points per seed x seeds={seeds}" if per_seed is not None
                  else f"seeds={seeds}")
        fix = f"shorten {named}" + (" or lower seeds" if seeds > 1 else "")
    return SweepTooLargeError(f"the sweep of study {study.name!r} has {n:,} points ({detail}), "
                              f"more than the {max_points:,} a run may have: {fix}")


def _label(point: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


def plan_sweep(study: Any, config: Any, *, workers: int | None = 1,
               max_points: int = MAX_POINTS, memory_limit: int | None = None) -> SweepPlan:
    """The points of ``study`` under ``config`` and the memory of the largest, checked.

    The count is taken from ``points(config with seeds=1) x seeds`` before the whole list is
    built, so ``seeds=100000000`` is refused at once. ``workers``: points running at once on
    this machine (``None``: elsewhere, e.g. on a Ray cluster: the memory is not checked).
    ``memory_limit``: the memory there is (default :func:`total_memory`).

    Raises :class:`SweepTooLargeError` for more than ``max_points`` points, or a largest
    point (times ``workers``) above the memory there is.
    """
    seeds = getattr(config, "seeds", 1)
    per_seed = None
    if isinstance(seeds, int) and seeds > 1 and dataclasses.is_dataclass(config):
        per_seed = len(check_points(study, study.points(dataclasses.replace(config, seeds=1))))
        if per_seed * seeds > max_points:
            raise _too_many(study, config, per_seed * seeds, per_seed, max_points)
    points = check_points(study, study.points(config))
    if len(points) > max_points:
        raise _too_many(study, config, len(points), per_seed, max_points)
    plan = SweepPlan(points)
    estimate = getattr(study, "estimate_memory", None)
    if estimate is None:
        return plan
    for point in points:
        need = estimate(config, dict(point))
        if need is None:
            continue
        if isinstance(need, bool) or not isinstance(need, (int, float)) or not (
                need >= 0 and math.isfinite(need)):
            raise TypeError(f"study {study.name!r}: estimate_memory must return a number of "
                            f"bytes >= 0 or None, got {need!r}")
        if plan.memory is None or need > plan.memory:
            plan.memory, plan.largest = int(need), dict(point)
    limit = memory_limit if memory_limit is not None else total_memory()
    if plan.memory is not None and workers is not None and limit is not None and \
            plan.memory * workers > limit:
        times = f" x {workers} points at once (--workers {workers})" if workers > 1 else ""
        fix = "lower --workers or the config's sizes" if workers > 1 else \
            "lower the config's sizes (e.g. the number of training points)"
        raise SweepTooLargeError(
            f"the largest point of study {study.name!r} ({_label(plan.largest or {})}) needs "
            f"about {format_bytes(plan.memory)}{times}, more than the "
            f"{format_bytes(limit)} of memory here: {fix}")
    return plan
