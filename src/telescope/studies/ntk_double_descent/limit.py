"""The infinite-width side of ``ntk-double-descent``: what the limit itself predicts, how far the
trained networks are from it, and the sample-wise view, each with its uncertainty over seeds.

* :func:`limit_value`: a number of the limit (its test MSE, say), which has no width axis: one
  value per seed (the label noise is the seed's), the mean over seeds and its bootstrap interval.
* :class:`SampleBootstrap`: the sample-wise view of one model row (the limit's test error
  against the number of training points ``n``, and the networks trained at a few ``n``), with
  :meth:`SampleBootstrap.rise`: the largest increase of the limit's test MSE when ``n`` grows,
  the signature of a sample-wise peak (more data hurting; Nakkiran et al. 2021, "Deep double
  descent", for networks; for ridgeless kernel regression with noisy labels e.g. Canatar,
  Bordelon & Pehlevan 2021).
* :func:`counterpart`: whether the network's width-wise peak has a counterpart in the limit.
* :func:`limit_headline`: the headline's entries for all of it.

The resampling is :mod:`.bootstrap`'s (whole seeds with replacement, the same draw everywhere,
:data:`~.bootstrap.RESAMPLES` resamples with a fixed seed); intervals are
:data:`~.bootstrap.LEVEL` percentile intervals.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from telescope.studies.ntk_double_descent.analysis import (
    LIMITS,
    PEAK_RATIO,
    SeedBootstrap,
    curve_row,
    sample_rows,
)
from telescope.studies.ntk_double_descent.bootstrap import (
    LEVEL,
    RESAMPLE_SEED,
    RESAMPLES,
    percentile_interval,
    seed_weights,
    weighted_means,
    within_noise,
)
from telescope.studies.ntk_double_descent.formatting import (
    fmt_estimate,
    fmt_number,
    fmt_share,
    fmt_widths,
)

__all__ = ["limit_value", "SampleBootstrap", "counterpart", "rise_verdict", "gap_curve_text",
           "limit_headline", "NO_LIMIT"]

#: Why the standard transformer row has no infinite-width columns.
NO_LIMIT = ("none in closed form (standard parametrization with PyTorch's initialization, "
            "learned positions, 1/sqrt(d_k) softmax attention: its NTK does not converge to a "
            "fixed kernel); see ntk-transformer for a transformer whose limit is known")


def limit_value(final: pd.DataFrame, kind: str, column: str, df: pd.DataFrame | None = None,
                resamples: int = RESAMPLES, seed: int = RESAMPLE_SEED
                ) -> tuple[float, tuple[float, float]] | None:
    """A width-independent number of one model row's limit (its test MSE, say): one value per
    seed, then the mean over seeds and its bootstrap interval, ``(mean, (lo, hi))``; ``None`` if
    it was not measured for this row.

    Taken from the sample-wise view's rows at ``n = n_train`` when ``df`` (all results) has them
    (the same computation on the same points, run for every seed), else from the width sweep
    (per seed the mean over the widths, which agree to rounding: the same kernels and targets at
    every width)."""
    part = final[final["model"] == kind]
    per_seed = None
    if df is not None and len(part) and "n_train" in part:
        view = sample_rows(df)
        if len(view) and column in view and "width" in view:
            n = int(part["n_train"].iloc[0])
            rows = view[(view["model"] == kind) & view["width"].isna()
                        & (view["sample_size"] == n)]
            if len(rows) and rows[column].notna().any():
                per_seed = rows.groupby("seed")[column].mean().dropna().sort_index()
    if per_seed is None:
        if column not in part or part[column].isna().all():
            return None
        per_seed = part.groupby("seed")[column].mean().dropna().sort_index()
    values = per_seed.to_numpy(dtype=float)[None, :]           # [1, S]
    curve = weighted_means(values, seed_weights(values.shape[1], resamples, seed))[:, 0]
    return float(curve[0]), percentile_interval(curve)


class SampleBootstrap:
    """The sample-wise view of one model row: the limit's rows (no ``width``) and the trained
    networks' rows (with ``width``) of :func:`.analysis.sample_rows`, resampled over seeds."""

    def __init__(self, df: pd.DataFrame, kind: str, resamples: int = RESAMPLES,
                 seed: int = RESAMPLE_SEED) -> None:
        part = sample_rows(df)
        part = part[part["model"] == kind] if len(part) else part
        self.kind = kind
        has_width = "width" in part and len(part)
        self.limit = part[part["width"].isna()] if has_width else part
        self.networks = (part[part["width"].notna()].astype({"width": "int64"}) if has_width
                         else part.iloc[:0])
        self.seeds = np.array(sorted(part["seed"].unique())) if len(part) else np.array([])
        self.weights = seed_weights(max(len(self.seeds), 1), resamples, seed)
        self.sizes = (np.array(sorted(self.limit["sample_size"].unique()), dtype=np.int64)
                      if len(self.limit) else np.array([], dtype=np.int64))

    @property
    def empty(self) -> bool:
        return not len(self.limit)

    @property
    def widths(self) -> list[int]:
        """The widths of the networks trained in this view."""
        return sorted(int(w) for w in self.networks["width"].unique()) if len(
            self.networks) else []

    def curve(self, column: str, width: int | None = None) -> pd.DataFrame:
        """Per ``n``: the mean over seeds of ``column`` and its bootstrap interval (``mean``,
        ``lo``, ``hi``), for the limit (``width=None``) or the networks of one width."""
        rows = self.limit if width is None else self.networks[self.networks["width"] == width]
        if not len(rows) or column not in rows or rows[column].isna().all():
            return pd.DataFrame(columns=["mean", "lo", "hi"])
        sizes = np.array(sorted(rows["sample_size"].unique()), dtype=np.int64)
        c = weighted_means(self._table(rows, column, sizes), self.weights)
        out = [(c[0, j], *percentile_interval(c[:, j])) for j in range(len(sizes))]
        return pd.DataFrame(out, index=pd.Index(sizes, name="sample_size"),
                            columns=["mean", "lo", "hi"])

    def rise(self, column: str = "infinite_ntk_test_mse") -> dict | None:
        """The largest increase of the limit's mean test MSE as ``n`` grows: over all pairs
        ``n1 < n2`` of the all-seeds mean curve ``E``, the pair maximizing ``E(n2) - E(n1)``
        (``n2``: the sample-wise peak, ``n1``: the valley before it), with the bootstrap
        intervals of ``E(n1)``, ``E(n2)``, their ratio and difference, and the sizes within
        noise of the peak's value among those from the valley on.

        The pair is picked as the largest of many differences, so the bootstrap of the same
        seeds favours it (pure noise would look "resolved"). Hence ``held_out``: on two
        disjoint halves of the seeds, the pair picked on either half must rise on the other
        (the held-out half's ``LEVEL`` interval of its difference above 0); ``None`` with one
        seed. ``peaked``: held out in both directions, and the all-seeds ratio at least
        ``PEAK_RATIO``. ``None`` with fewer than two sizes or a curve that never rises."""
        if self.empty or column not in self.limit or len(self.sizes) < 2:
            return None
        table = self._table(self.limit, column, self.sizes)   # [N, S]
        c = weighted_means(table, self.weights)               # [R, N]
        pair = _largest_rise(c[0])
        if pair is None:
            return None
        i, j = pair
        ratio, delta = c[:, j] / c[:, i], c[:, j] - c[:, i]
        near = within_noise(c[:, i:], int(j - i), self.sizes[i:])   # among n >= the valley
        held = _held_out(table)
        return {"peak_n": int(self.sizes[j]), "valley_n": int(self.sizes[i]),
                "peak": float(c[0, j]), "peak_ci": percentile_interval(c[:, j]),
                "valley": float(c[0, i]), "valley_ci": percentile_interval(c[:, i]),
                "ratio": float(ratio[0]), "ratio_ci": percentile_interval(ratio),
                "delta": float(delta[0]), "delta_ci": percentile_interval(delta),
                "peak_sizes": [int(v) for v in near], "held_out": held,
                "largest_n": int(self.sizes[-1]), "at_largest": float(c[0, -1]),
                "at_largest_ci": percentile_interval(c[:, -1]),
                "smallest_n": int(self.sizes[0]), "at_smallest": float(c[0, 0]),
                "at_smallest_ci": percentile_interval(c[:, 0]),
                "peaked": bool(held and ratio[0] >= PEAK_RATIO)}

    def _table(self, rows: pd.DataFrame, column: str, sizes: np.ndarray) -> np.ndarray:
        """``[len(sizes), S]``: ``column`` per size and seed (NaN where not run)."""
        return (rows.groupby(["sample_size", "seed"])[column].mean().astype(float)
                .unstack("seed").reindex(index=sizes, columns=self.seeds)
                .to_numpy(dtype=float))


def _largest_rise(e: np.ndarray) -> tuple[int, int] | None:
    """``(i, j)``, ``i < j``, maximizing ``e[j] - e[i] > 0``; ``None`` if ``e`` never rises."""
    diff = e[None, :] - e[:, None]                             # [i, j]: e[j] - e[i]
    diff[np.tril_indices(len(e))] = -np.inf
    diff[np.isnan(diff)] = -np.inf
    i, j = np.unravel_index(np.argmax(diff), diff.shape)
    return (int(i), int(j)) if diff[i, j] > 0 else None


def _held_out(table: np.ndarray, resamples: int = RESAMPLES, seed: int = RESAMPLE_SEED
              ) -> bool | None:
    """Whether the largest rise picked on either half of the seeds (columns of ``table``, the
    first ``S // 2`` and the rest) also rises on the other half: the lower ``LEVEL`` bound of
    the other half's bootstrapped difference at that pair is above 0, in both directions.
    ``None`` with fewer than two seeds."""
    s = table.shape[1]
    if s < 2:
        return None
    halves = (np.arange(s // 2), np.arange(s // 2, s))
    for pick, test in (halves, halves[::-1]):
        pair = _largest_rise(np.nanmean(table[:, pick], axis=1))
        if pair is None:
            return False
        curves = weighted_means(table[:, test], seed_weights(len(test), resamples, seed))
        if not percentile_interval(curves[:, pair[1]] - curves[:, pair[0]])[0] > 0:
            return False
    return True


def gap_curve_text(boot: SeedBootstrap, column: str, digits: int = 2) -> str:
    """``"4: 0.93 [0.88, 0.97]; 8: ...; 64: ..."``: a width curve with its intervals."""
    table = boot.curve_intervals(column)
    return "; ".join(f"{int(w)}: {fmt_estimate(*curve_row(table, k), digits=digits)}"
                     for k, w in enumerate(table.index))


def counterpart(final: pd.DataFrame, boot: SeedBootstrap, samples: SampleBootstrap) -> dict:
    """Whether the trained network's width-wise test-MSE peak has a counterpart in the
    infinite-width limit. In the limit there is no width: the kernel is the same at every
    width, of full rank at every ``n``, so no width-wise peak can exist. What the network's
    peak does have: its parameter count ``P`` there and the width from which its empirical
    NTK at initialization reaches rank ``n`` (``lazy_p_train`` = n, the interpolation threshold
    of its kernel). The limit's nearest analogue is a sample-wise peak (the limit's test MSE
    rising with ``n``, :meth:`SampleBootstrap.rise`); a counterpart would be one at ``n`` near
    the sweep's ``n_train``.

    Returns ``peak_width``, ``peak_params``, ``params_per_example`` (means over seeds),
    ``rank_n_width`` (the first width whose mean ``lazy_p_train`` is at least 99 % of ``n``,
    ``None`` if never), ``n_train``, ``rise`` (:meth:`SampleBootstrap.rise` or ``None``) and
    ``matches``: ``True`` if the limit has a held-out sample-wise peak whose sizes within noise
    reach ``n_train``, ``False`` otherwise, ``None`` without a sample-wise view."""
    stats = boot.compare()
    net = stats.get("network")
    part = final[final["model"] == boot.kind]
    out: dict = {"peak_width": None, "peak_params": math.nan, "params_per_example": math.nan,
                 "rank_n_width": None, "n_train": None, "rise": None, "matches": None}
    if net is None or part.empty:
        return out
    means = part.groupby("width").mean(numeric_only=True).sort_index()
    w = net["peak_width"]
    n = int(part["n_train"].iloc[0])
    out.update(peak_width=w, n_train=n, peak_params=float(means.loc[w, "n_params"]),
               params_per_example=float(means.loc[w, "n_params"]) / n)
    if "lazy_p_train" in means:
        full = means.index[means["lazy_p_train"] >= 0.99 * n]
        out["rank_n_width"] = int(full[0]) if len(full) else None
    if samples.empty:
        return out
    rise = samples.rise()
    out["rise"] = rise
    out["matches"] = bool(rise is not None and rise["peaked"]
                          and max(rise["peak_sizes"]) >= n)
    return out


def rise_verdict(rise: dict) -> str:
    """What a :meth:`SampleBootstrap.rise` amounts to, in words."""
    if rise["peaked"]:
        return "a sample-wise peak: the rise picked on either half of the seeds recurs on the other"
    if rise["held_out"] is None:
        return "one seed: its noise is not estimated"
    if not rise["held_out"]:
        return "not held out: the rise picked on one half of the seeds does not recur on the other"
    return f"held out but under {PEAK_RATIO}x: no clear peak"


def _fmt_rise(rise: dict | None, sizes: list[int]) -> str:
    if rise is None:
        return "none: the test MSE never rises with n"
    where = (f"n = {rise['peak_n']}" if len(rise["peak_sizes"]) <= 1 else
             f"n = {rise['peak_n']} ({fmt_widths(rise['peak_sizes'], sizes)} within noise)")
    return (f"largest rise from n = {rise['valley_n']} to {where}: test MSE "
            f"{fmt_estimate(rise['valley'], rise['valley_ci'])} -> "
            f"{fmt_estimate(rise['peak'], rise['peak_ci'])}, ratio "
            f"{fmt_estimate(rise['ratio'], rise['ratio_ci'], decimals=2)} "
            f"({rise_verdict(rise)})")


def limit_headline(final: pd.DataFrame, df: pd.DataFrame,
                   boots: dict[str, SeedBootstrap]) -> dict:
    """The headline's infinite-width entries, per model row with a limit: the limit's test MSE
    and error (NTK and NNGP, converged, ridgeless; and one infinitely wide network's expected
    test MSE), the trained networks' distances to it by width (to the ensemble mean, with the
    floor one infinite network would have, and to NTK theory's prediction for each network's
    own initialization), the sample-wise curve's largest rise and the network's peak against
    it; for the standard transformer, why it has none."""
    out: dict = {}
    if "transformer" in set(final["model"]):
        out["transformer: infinite-width limit"] = NO_LIMIT
    for kind in LIMITS:
        boot = boots.get(kind)
        if boot is None or boot.analysis is None:
            continue
        part = final[final["model"] == kind]
        ridge = (float(part["infinite_ridge"].dropna().iloc[0]) if "infinite_ridge" in part
                 and part["infinite_ridge"].notna().any() else 0.0)
        how = "ridgeless" if ridge == 0 else f"ridge {ridge:g}"
        for col, label in (("infinite_ntk_test_mse", f"infinite-width NTK (converged, "
                            f"{how}): test MSE"),
                           ("infinite_ntk_test_error", "infinite-width NTK: test error"),
                           ("infinite_ntk_draw_test_mse", "one infinitely wide network "
                            "(NTK, converged): expected test MSE"),
                           ("infinite_nngp_test_mse", "infinite-width NNGP (readout only): "
                            "test MSE"),
                           ("infinite_nngp_test_error", "infinite-width NNGP: test error")):
            v = limit_value(final, kind, col, df)
            if v is not None:
                out[f"{kind}: {label}"] = fmt_estimate(*v)
        if "infinite_init_gap" in final and final.loc[final["model"] == kind,
                                                      "infinite_init_gap"].notna().any():
            out[f"{kind}: relative distance of the trained network to NTK theory for its own "
                f"initialization, by width"] = gap_curve_text(boot, "infinite_init_gap")
            out[f"{kind}: relative distance to the infinite-width ensemble mean, by width"] = (
                gap_curve_text(boot, "infinite_gap"))
            floor = limit_value(final, kind, "infinite_gap_floor")
            if floor is not None:
                out[f"{kind}: ... the floor one infinitely wide network would have"] = (
                    fmt_estimate(*floor, digits=2))
        samples = SampleBootstrap(df, kind)
        if not samples.empty:
            sizes = [int(s) for s in samples.sizes]
            for col, label in (("infinite_ntk_test_mse", "NTK"), ("infinite_nngp_test_mse",
                                                                  "NNGP")):
                out[f"{kind}: sample-wise view, infinite-width {label}"] = _fmt_rise(
                    samples.rise(col), sizes)
        c = counterpart(final, boot, samples)
        if c["peak_width"] is not None:
            rank = ("never within the sweep" if c["rank_n_width"] is None
                    else f"from width {c['rank_n_width']}")
            text = (f"network peak at width {c['peak_width']} (P = "
                    f"{fmt_number(c['peak_params'])} = {fmt_number(c['params_per_example'])} n; "
                    f"its initial NTK reaches rank n {rank}); the limit has no width axis")
            if c["matches"] is not None:
                text += ("; its sample-wise peak reaches n_train = "
                         f"{c['n_train']}: a counterpart" if c["matches"] else
                         f"; no held-out sample-wise peak of the limit reaches n_train = "
                         f"{c['n_train']}: no counterpart")
            out[f"{kind}: does the network's peak width have a counterpart in the limit?"] = text
    if out:
        out["infinite-width intervals"] = (f"{fmt_share(LEVEL)} bootstrap over seeds, as above; "
                                           f"the limit's numbers vary with the seed only "
                                           f"through its label noise")
    return out
