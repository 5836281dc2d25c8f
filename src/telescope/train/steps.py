"""Where to measure during training: grids of steps for :func:`telescope.train.fit`'s
``eval_at``."""

from __future__ import annotations

import numpy as np

__all__ = ["log_spaced_steps", "evenly_spaced_steps"]


def log_spaced_steps(steps: int, count: int, *, linear: int = 0, zero: bool = False) -> list[int]:
    """About ``count`` log-spaced steps in ``[1, steps]`` (``round(geomspace(1, steps, count))``,
    deduplicated, ``steps`` last), plus ``linear`` evenly spaced ones (``steps * k / linear``,
    rounded), plus step 0 first when ``zero``. ``count <= 1`` gives ``[steps]`` alone."""
    grid = {steps} if count <= 1 else {int(s) for s in np.round(np.geomspace(1, steps, count))}
    if linear:
        grid |= {int(s) for s in np.round(np.linspace(0, steps, linear + 1)[1:])}
    grid = {s for s in grid if s >= 1} | {steps}
    return ([0] if zero else []) + sorted(grid)


def evenly_spaced_steps(steps: int, count: int) -> list[int]:
    """``count`` evenly spaced steps in ``[1, steps]``, the last being ``steps`` (rounded, at
    least 1, deduplicated)."""
    return sorted({max(1, round(steps * k / count)) for k in range(1, count + 1)})
