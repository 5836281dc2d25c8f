"""Norm-growth cycles of the last layer (the Slingshot Mechanism of Thilak et al., 2022).

Thilak, Littwin, Zhai, Saremi, Paiss & Susskind (2022), "The Slingshot Mechanism: An Empirical
Study of Adaptive Optimizers and the Grokking Phenomenon", observe that with adaptive optimizers
the norm of the last layer's weights grows in bursts: a phase of fast growth, accompanied by a
spike of the training loss, ends at a local maximum and is followed by a plateau (or a drop)
before the next burst; these cycles repeat. :class:`NormCycles` records ``||theta_last||_2``
through training and :func:`detect_cycles` finds the cycles in such a history with the explicit
rule documented there; :func:`loss_spikes` finds the spikes of the loss curve that accompany them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from telescope.errors import UsageError

__all__ = ["NormCycles", "detect_cycles", "loss_spikes"]


def _smooth(values: list[float], window: int) -> list[float]:
    """Centered moving average over ``window`` points, truncated at both ends."""
    if window <= 1:
        return list(values)
    lo, hi = (window - 1) // 2, window // 2
    n = len(values)
    out = []
    for k in range(n):
        seg = values[max(0, k - lo): min(n, k + hi + 1)]
        out.append(sum(seg) / len(seg))
    return out


def detect_cycles(steps: Sequence[float], norms: Sequence[float], *, min_rise: float = 0.05,
                  smooth: int = 1) -> list[dict]:
    """Growth cycles of a norm history (the Slingshot Mechanism, Thilak et al., 2022).

    The rule, exactly:

    1. ``l_k = log norm_k`` (points with ``norm_k = 0`` are dropped), then, if ``smooth > 1``,
       a centered moving average of ``l`` over ``smooth`` points (truncated at the ends).
    2. Step ``k`` is *rising* if ``l_k > l_{k-1}``. A *growth phase* is a maximal run of
       consecutive rising steps; it starts at the point ``a`` just before its first rising step
       (a local minimum) and peaks at its last point ``b`` (a local maximum).
    3. A growth phase counts when its relative rise ``exp(l_b - l_a) - 1 >= min_rise``; shorter
       runs (noise, slow creep on a plateau) are ignored.
    4. A counted phase is a completed *cycle* if it is followed by a plateau or a drop, i.e.
       ``b`` is not the last point. A phase still rising at the last point is open and not
       reported, so a monotonically growing history (one long growth phase) has no cycle.
    5. The cycle ends where the next counted growth phase starts (its ``a``), or at the last
       point for the last cycle.

    Parameters
    ----------
    steps
        Strictly increasing step numbers.
    norms
        Non-negative finite norms, one per step.
    min_rise
        Minimal relative rise ``norm_peak / norm_start - 1`` of a growth phase.
    smooth
        Moving-average window (points) applied to the log-norms; use a window longer than the
        noise wiggles, shorter than the plateaus.

    Returns
    -------
    list of dict
        ``[{"start": step, "peak": step, "end": step, "rise": exp(l_peak - l_start) - 1}]``
        in time order (``rise`` from the smoothed log-norms).
    """
    if len(steps) != len(norms):
        raise UsageError(f"steps and norms must have the same length, got {len(steps)} and "
                         f"{len(norms)}")
    if not min_rise > 0:
        raise UsageError(f"min_rise must be positive, got {min_rise}")
    if not isinstance(smooth, int) or smooth < 1:
        raise UsageError(f"smooth must be a positive int, got {smooth!r}")
    s_all = [float(s) for s in steps]
    n_all = [float(v) for v in norms]
    if any(b <= a for a, b in zip(s_all, s_all[1:], strict=False)):
        raise UsageError("steps must be strictly increasing")
    if any(not math.isfinite(v) or v < 0 for v in n_all):
        raise UsageError("norms must be finite and non-negative")
    kept = [(s, v) for s, v in zip(s_all, n_all, strict=True) if v > 0]
    if len(kept) < 2:
        return []
    st = [s for s, _ in kept]
    logs = _smooth([math.log(v) for _, v in kept], smooth)
    last = len(logs) - 1
    # maximal runs of rising steps: (a, b) with l_a < l_{a+1} < ... < l_b
    phases: list[tuple[int, int]] = []
    k = 1
    while k <= last:
        if logs[k] > logs[k - 1]:
            a = k - 1
            while k <= last and logs[k] > logs[k - 1]:
                k += 1
            b = k - 1
            if math.exp(logs[b] - logs[a]) - 1.0 >= min_rise:
                phases.append((a, b))
        else:
            k += 1
    cycles = []
    for i, (a, b) in enumerate(phases):
        if b == last:  # still growing at the end: open, not a completed cycle
            break
        end = phases[i + 1][0] if i + 1 < len(phases) else last
        cycles.append({"start": _num(st[a]), "peak": _num(st[b]), "end": _num(st[end]),
                       "rise": math.exp(logs[b] - logs[a]) - 1.0})
    return cycles


def _num(x: float) -> int | float:
    """Steps back as ints when they are whole numbers."""
    return int(x) if float(x).is_integer() else x


def loss_spikes(steps, losses, factor: float = 10.0) -> list[dict]:
    """Spikes of a loss curve: episodes where the loss exceeds ``factor`` times its running
    minimum.

    The running minimum ``m`` starts at the first loss. A spike starts at the first point with
    ``loss > factor * m`` and ends at the first later point with ``loss <= factor * m`` (or at the
    last point); its ``peak`` is the step of its largest loss. After a spike, ``m`` restarts from
    the loss at its end. Non-finite losses count as above any threshold.

    Returns ``[{"start", "peak", "end", "height"}]`` with ``height = max loss / m``.
    """
    steps, losses = list(steps), [float(v) for v in losses]
    out: list[dict] = []
    if not losses:
        return out
    m = losses[0] if math.isfinite(losses[0]) else math.inf
    k = 1
    while k < len(losses):
        v = losses[k]
        if not math.isfinite(v) or v > factor * m:
            start, peak, high = k, k, v
            while k < len(losses) and (not math.isfinite(losses[k]) or losses[k] > factor * m):
                if not math.isfinite(losses[k]) or losses[k] > high:
                    peak, high = k, losses[k]
                k += 1
            end = min(k, len(losses) - 1)
            out.append({"start": steps[start], "peak": steps[peak], "end": steps[end],
                        "height": high / m if m > 0 else math.inf})
            m = losses[end] if math.isfinite(losses[end]) else math.inf
        else:
            m = min(m, v)
        k += 1
    return out


class NormCycles:
    """Record the global L2 norm of some parameters through training and find its cycles.

    Parameters
    ----------
    params
        A module (all its parameters) or an iterable of tensors, typically the last layer
        (``model.head``). The norm is ``sqrt(sum_p ||p||_F^2)``.
    name
        A label for the tracked parameters (kept as :attr:`name`).

    Usage: call ``update(step)`` every few steps, then read :meth:`rows` and :meth:`cycles`;
    or pass it to :func:`telescope.train.fit` as a callback, which records the norm at every
    step of ``eval_at`` (:meth:`measure`).
    """

    def __init__(self, params: nn.Module | Iterable[Tensor], *, name: str = "params") -> None:
        tensors = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
        if not tensors:
            raise UsageError("NormCycles: no parameters to track")
        if not all(isinstance(t, Tensor) for t in tensors):
            raise UsageError("NormCycles: params must be a module or an iterable of tensors")
        self.params, self.name = tensors, name
        self.steps: list[int] = []
        self.norms: list[float] = []

    def update(self, step: int) -> None:
        """Record ``||params||_2`` at ``step`` (steps must increase)."""
        if self.steps and step <= self.steps[-1]:
            raise UsageError(f"NormCycles.update: step {step} is not after the last recorded "
                             f"step {self.steps[-1]}")
        with torch.no_grad():
            sq = sum(float(t.detach().double().pow(2).sum()) for t in self.params)
        self.steps.append(step)
        self.norms.append(math.sqrt(sq))

    def measure(self, state) -> dict:
        """The :func:`telescope.train.fit` callback: :meth:`update` at ``state.step``; the norm
        is the history row's column ``"<name>_norm"``."""
        self.update(state.step)
        return {f"{self.name}_norm": self.norms[-1]}

    def rows(self) -> list[dict]:
        """``[{"step", "norm", "growth"}]`` with ``growth = (log n_k - log n_{k-1}) /
        (step_k - step_{k-1})`` (a backward finite difference of ``d log norm / d step``; NaN
        for the first row and where a norm is 0)."""
        out = []
        for k, (step, norm) in enumerate(zip(self.steps, self.norms, strict=True)):
            growth = math.nan
            if k > 0 and norm > 0 and self.norms[k - 1] > 0:
                growth = (math.log(norm) - math.log(self.norms[k - 1])) / (step - self.steps[k - 1])
            out.append({"step": step, "norm": norm, "growth": growth})
        return out

    def cycles(self, *, min_rise: float = 0.05, smooth: int = 1) -> list[dict]:
        """:func:`detect_cycles` on the recorded history."""
        return detect_cycles(self.steps, self.norms, min_rise=min_rise, smooth=smooth)
