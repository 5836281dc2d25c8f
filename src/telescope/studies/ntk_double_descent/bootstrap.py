"""The seed bootstrap behind every interval of ``ntk-double-descent``.

Every number the study leads with is a function of the mean-over-seeds curves (one value per
width). Its uncertainty comes from a seeded bootstrap over seeds: a resample draws as many seeds
as were run, with replacement, and the same draw is used at every width (a seed fixes the label
noise and the initialization of every width, so the seed is the unit that is resampled); the
statistics are recomputed on the resampled mean curves. Intervals are percentile intervals.

Arrays of resamples are ``[1 + resamples, ...]``: row 0 holds the all-seeds value, rows ``1..``
the resamples.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from telescope.errors import UsageError

__all__ = ["RESAMPLES", "RESAMPLE_SEED", "LEVEL", "seed_weights", "weighted_means",
           "rank_correlation", "percentile_interval", "within_noise"]

RESAMPLES = 2000         # seed resamples behind every interval and the robust verdict
RESAMPLE_SEED = 0        # fixed: the same results always give the same headline
LEVEL = 0.95             # of the percentile intervals and of "within noise of the peak"


def seed_weights(n_seeds: int, resamples: int = RESAMPLES, seed: int = RESAMPLE_SEED
                 ) -> np.ndarray:
    """``[1 + resamples, n_seeds]`` seed weights: row 0 is all ones (the all-seeds means), row
    ``b >= 1`` counts how often each seed is drawn in resample ``b`` (``n_seeds`` draws with
    replacement, ``numpy.random.default_rng(seed)``: deterministic)."""
    if n_seeds < 1 or resamples < 0:
        raise UsageError(f"need n_seeds >= 1 and resamples >= 0, got {n_seeds} and {resamples}")
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=resamples)
    return np.vstack([np.ones((1, n_seeds)), draws]).astype(float)


def weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean curves ``[R, W]`` of ``values`` ``[W, S]`` (one column per seed, NaN = not run)
    under seed weights ``[R, S]``: ``sum_s w_rs v_ws / sum_s w_rs [v_ws known]``; NaN where a
    resample holds none of a width's seeds."""
    known = ~np.isnan(values)
    num = weights @ np.where(known, values, 0.0).T
    den = weights @ known.T.astype(float)
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def _ranks(v: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank) of each row's entries where ``ok``
    among those entries (the others are ranked after them, as +inf, and ignored)."""
    return rankdata(np.where(ok, v, np.inf), axis=-1)


def rank_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None
                     ) -> np.ndarray:
    """Spearman's rho per row of ``a`` and ``b`` (``[R, W]`` or ``[W]``), over the entries known
    in both (and in ``mask``): the Pearson correlation ``sum (r_a - mean)(r_b - mean) /
    sqrt(sum (r_a - mean)^2 sum (r_b - mean)^2)`` of their average ranks. NaN with fewer than
    3 entries or a constant row (as :func:`scipy.stats.spearmanr`)."""
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    a, b = np.broadcast_arrays(a, b)
    ok = ~np.isnan(a) & ~np.isnan(b)
    if mask is not None:
        ok &= np.broadcast_to(mask, ok.shape)
    n = ok.sum(-1)
    ra, rb = _ranks(a, ok), _ranks(b, ok)
    safe = np.maximum(n, 1)[:, None]
    da = np.where(ok, ra - (ra * ok).sum(-1, keepdims=True) / safe, 0.0)
    db = np.where(ok, rb - (rb * ok).sum(-1, keepdims=True) / safe, 0.0)
    den = np.sqrt((da * da).sum(-1) * (db * db).sum(-1))
    rho = np.divide((da * db).sum(-1), den, out=np.full(den.shape, np.nan),
                    where=(den > 1e-12) & (n >= 3))
    return rho


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The ``level`` percentile interval of the resampled values (rows 1..); the all-seeds value
    twice when there are no resamples."""
    boot = values[1:]
    boot = boot[~np.isnan(boot)]
    if not len(boot):
        return (float(values[0]), float(values[0]))
    tail = 50 * (1 - level)
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return (float(lo), float(hi))


def within_noise(curve: np.ndarray, peak: int, widths: np.ndarray, level: float = LEVEL
                 ) -> list[int]:
    """The widths whose mean error is within noise of the peak's: those where the ``level``
    bootstrap interval of ``curve[peak] - curve[w]`` reaches 0 (its lower percentile is
    ``<= 0``), for resampled mean curves ``curve`` ``[R, W]``. Always holds the peak."""
    known = ~np.isnan(curve[0])
    if curve.shape[0] == 1:
        return [int(widths[peak])]
    diff = curve[1:, peak][:, None] - curve[1:]
    out = []
    for j in range(len(widths)):
        d = diff[:, j][~np.isnan(diff[:, j])]
        if j == peak or (known[j] and len(d) and np.percentile(d, 50 * (1 - level)) <= 0):
            out.append(int(widths[j]))
    return out
