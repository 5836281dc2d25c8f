"""A sensible default for the number of CPU threads torch uses.

Why this exists: PyTorch sizes its OpenMP pool from the cores it *sees*, which on a shared or
containerized machine can be more than the cores the process may actually run on (CPU affinity,
cgroup limits), and several processes each starting a full pool fight over the same cores. On the
shared 2-core machine this project is developed on, oversubscribed OpenMP threads made a small
training step about 60x slower: the threads spin-wait on barriers for cores that are busy with
someone else's work. Small kernels and training steps gain little from more threads than cores,
and lose a lot from more threads than *available* cores, so telescope caps the pool at the cores
this process may use, unless told otherwise (``--threads N``, or ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import os

import torch

from telescope.errors import UsageError

__all__ = ["available_cpus", "configure_threads"]


def available_cpus() -> int:
    """Number of CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:  # pragma: no cover - exotic platforms
            pass
    return max(1, os.cpu_count() or 1)


def _env_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a positive int, or ``None`` when unset or not a number.

    The nested form ``"4,2"`` counts as its outer level, ``4``.
    """
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not raw:
        return None
    try:
        value = int(raw.split(",")[0])
    except ValueError:
        return None
    return value if value >= 1 else None


def configure_threads(n: int | None = None) -> int:
    """Set the number of threads torch uses for intra-op parallelism and return it.

    - ``n`` given: use exactly ``n`` threads, and a single inter-op thread when torch still
      allows changing it (it can only be set before any parallel work has started).
    - else, ``OMP_NUM_THREADS`` set to a positive number: use that.
    - else: ``min(torch.get_num_threads(), CPUs available to this process)`` -- never more
      threads than the cores this process may actually run on (see the module docstring).
    """
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(f"the number of threads must be a positive integer, got {n!r}")
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            # "cannot set number of interop threads after parallel work has started or
            # set_num_interop_threads called": harmless, the inter-op pool is idle in eager code.
            pass
        return torch.get_num_threads()
    env = _env_threads()
    if env is not None:
        torch.set_num_threads(env)
        return torch.get_num_threads()
    target = min(torch.get_num_threads(), available_cpus())
    if target != torch.get_num_threads():
        torch.set_num_threads(target)
    return torch.get_num_threads()
