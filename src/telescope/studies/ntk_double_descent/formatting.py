"""How ``ntk-double-descent`` writes its numbers: estimates with their bootstrap intervals,
shares of resamples, runs of sweep widths (the headline, the answer in words and the README's
table all use these)."""

from __future__ import annotations

import math

__all__ = ["fmt_number", "fmt_estimate", "fmt_share", "fmt_widths", "fmt_peak", "fmt_stat",
           "fmt_corr"]


def fmt_number(value: float, digits: int = 3, decimals: int | None = None) -> str:
    """``digits`` significant digits, trailing zeros kept (``1.50``, ``20.5``, ``0.0180``;
    integers from ``10**digits`` on), or ``decimals`` fixed decimals; ``n/a`` for NaN."""
    v = float(value)
    if not math.isfinite(v):
        return "n/a"
    if decimals is not None:
        return f"{v:.{decimals}f}"
    if abs(v) >= 10 ** digits:
        return f"{v:.0f}"
    text = f"{v:#.{digits}g}"
    return text if "e" in text else text.rstrip(".")


def fmt_estimate(value: float, ci: tuple[float, float], digits: int = 3,
                 decimals: int | None = None) -> str:
    """``"1.55 [1.41, 1.69]"``: an estimate and its interval."""
    def f(v: float) -> str:
        return fmt_number(v, digits, decimals)
    return f"{f(value)} [{f(ci[0])}, {f(ci[1])}]"


def fmt_share(x: float) -> str:
    """A share as ``"89 %"``, rounded down (so that a share shown as 90 % meets a 90 %
    threshold); ``"<1 %"`` for a small nonzero share."""
    return "<1 %" if 0 < x < 0.01 else f"{math.floor(100 * x + 1e-9):.0f} %"


def fmt_widths(widths: list[int], sweep: list[int]) -> str:
    """Widths as runs of consecutive sweep widths: ``"6-12"``, ``"4, 8-12"``."""
    index = {w: i for i, w in enumerate(sweep)}
    ws = sorted(widths, key=lambda w: index.get(w, w))
    runs: list[list[int]] = []
    for w in ws:
        if runs and w in index and runs[-1][-1] in index and index[w] == index[runs[-1][-1]] + 1:
            runs[-1].append(w)
        else:
            runs.append([w])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def fmt_peak(stats: dict, sweep: list[int]) -> str:
    """``"12 (6-12 within noise)"``, or ``"6"`` when no other width is within noise."""
    ws = stats["peak_widths"]
    if len(ws) <= 1:
        return str(stats["peak_width"])
    return f"{stats['peak_width']} ({fmt_widths(ws, sweep)} within noise)"


def fmt_stat(st: dict, key: str, **kw) -> str:
    """A statistic of :func:`~telescope.studies.ntk_double_descent.analysis.compare` with its
    interval: ``fmt_stat(stats["network"], "peak")``."""
    return fmt_estimate(st[key], st[f"{key}_ci"], **kw)


def fmt_corr(st: dict, key: str) -> str:
    """A rank correlation of :func:`~telescope.studies.ntk_double_descent.analysis.compare`
    with its interval, two decimals."""
    return fmt_estimate(st[key], st[f"{key}_ci"], decimals=2)
