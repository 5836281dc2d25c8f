"""The analysis of ``ntk-double-descent``: from the last row of every point, each prediction's
test-error curve over widths set against the trained network's, with its uncertainty over
seeds, and the verdict.

For each model row and each prediction (:data:`PREDICTIONS`): the width of the test-error peak,
the peak height, the error at the largest width, Spearman's rank correlation of the prediction's
curve with the network's across widths, and the relative distance between the prediction and
the network (:func:`compare`). Each comes with its uncertainty over seeds (the seeded bootstrap
of :mod:`~telescope.studies.ntk_double_descent.bootstrap`, computed once per model row by
:class:`SeedBootstrap`): 95 % percentile intervals, the widths whose error is within noise of
the peak, and a verdict that is only decided when at least 90 % of the resamples reproduce it
and the peaks within noise cannot change it (:func:`verdict`, :func:`verdict_details`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from telescope.studies.ntk_double_descent.bootstrap import (
    LEVEL,
    RESAMPLE_SEED,
    RESAMPLES,
    percentile_interval,
    rank_correlation,
    seed_weights,
    weighted_means,
    within_noise,
)
from telescope.studies.ntk_double_descent.formatting import fmt_share, fmt_widths

__all__ = ["MODELS", "LIMITS", "NAMES", "PREDICTIONS", "AGREEMENT", "LAZY_TOLERANCE",
           "RHO_SECOND_DESCENT", "PEAK_RATIO", "VERDICTS", "LEVEL", "RESAMPLES", "RESAMPLE_SEED",
           "final_rows", "mean_curves", "mse_column", "compare", "curve_intervals", "curve_row",
           "lazy_valid_from", "is_double_descent", "verdict_details", "SeedBootstrap", "verdict",
           "half_verdicts", "width_rows", "sample_rows"]

MODELS = ("transformer", "ntk-transformer", "mlp")   # the model rows of the study
#: the model rows whose infinite-width limit is computed (in closed form, telescope.infinite)
LIMITS = ("ntk-transformer", "mlp")
NAMES = {"transformer": "Transformer", "ntk-transformer": "NTK-parametrized transformer",
         "mlp": "MLP"}
PREDICTIONS = {  # column prefix -> label
    "network": "trained network",
    "lazy": "NTK at init (lazy)",
    "after": "after-kernel",
    "telescoping": "telescoping model",
}
AGREEMENT = 0.9          # share of the resamples that must reproduce the all-seeds verdict
LAZY_TOLERANCE = 0.25    # relative distance within which the lazy prediction "holds"
RHO_SECOND_DESCENT = 0.8  # Spearman past the peak for "ranks the second descent alike"
PEAK_RATIO = 1.2         # double descent: interior peak >= this times the largest-width error
VERDICTS = ("yes", "partly", "no", "no double descent")
_INTERVAL_STATS = ("peak", "at_largest", "at_smallest", "rho", "rho_past_peak", "gap",
                   "gap_at_largest")


def sample_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the sample-wise view (``view == "samples"``), with an empty frame when there
    are none."""
    if df.empty or "view" not in df:
        return df.iloc[:0]
    return df[df["view"] == "samples"].reset_index(drop=True)


def width_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the width sweep (every row not of the sample-wise view), widths as ints."""
    if df.empty:
        return df
    part = df[df["view"] != "samples"] if "view" in df else df
    part = part.dropna(subset=["width"])
    return part.astype({"width": "int64"})


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The last measurement of every point of the width sweep (the row that carries the kernel
    columns)."""
    df = width_rows(df)
    if df.empty:
        return df
    idx = df.groupby(["model", "width", "seed"])["step"].idxmax()
    return df.loc[idx].sort_values(["model", "width", "seed"], ignore_index=True)


def mean_curves(final: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Mean over seeds, per width, of every numeric column of one model row."""
    part = final[final["model"] == kind]
    return part.groupby("width").mean(numeric_only=True).sort_index()


def mse_column(pred: str) -> str:
    """The test-MSE column of a prediction (``test_mse`` for the network itself)."""
    return "test_mse" if pred == "network" else f"{pred}_test_mse"


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[r, idx[r]]`` per row, NaN where ``idx`` is -1."""
    got = a[np.arange(a.shape[0]), np.clip(idx, 0, None)]
    return np.where(idx >= 0, got, np.nan)


def _nanmedian_rows(a: np.ndarray) -> np.ndarray:
    out = np.full(a.shape[0], np.nan)
    known = ~np.isnan(a).all(1)
    out[known] = np.nanmedian(a[known], axis=1)
    return out


def _curve_stats(widths: np.ndarray, curve: np.ndarray, net: np.ndarray,
                 net_peak: np.ndarray | None, gap: np.ndarray | None) -> dict[str, np.ndarray]:
    """The statistics of ``compare`` for every row of the mean curves ``curve`` ``[R, W]``."""
    known = ~np.isnan(curve)
    some = known.any(1)
    first = np.where(some, known.argmax(1), -1)
    last = np.where(some, curve.shape[1] - 1 - known[:, ::-1].argmax(1), -1)
    peak = np.where(some, np.where(known, curve, -np.inf).argmax(1), -1)
    net_peak = peak if net_peak is None else net_peak
    past = widths[None, :] >= np.where(net_peak >= 0, widths[np.clip(net_peak, 0, None)],
                                       np.iinfo(np.int64).max)[:, None]
    nan = np.full(curve.shape[0], np.nan)
    return {
        "peak_idx": peak, "smallest_idx": first, "largest_idx": last,
        "peak": _take(curve, peak), "at_largest": _take(curve, last),
        "at_smallest": _take(curve, first),
        "rho": rank_correlation(curve, net), "rho_past_peak": rank_correlation(curve, net, past),
        "gap": nan if gap is None else _nanmedian_rows(gap),
        "gap_at_largest": nan if gap is None else gap[:, -1],
    }


def _analysis(final: pd.DataFrame, kind: str, resamples: int = RESAMPLES,
              seed: int = RESAMPLE_SEED) -> dict | None:
    """The seed table of one model row, its resampled mean curves, every prediction's statistics
    and the verdict rule, per resample (row 0: all seeds). ``None`` without network results."""
    part = final[final["model"] == kind]
    if part.empty or "test_mse" not in part or part["test_mse"].isna().all():
        return None
    widths = np.array(sorted(part["width"].unique()), dtype=np.int64)
    seeds = np.array(sorted(part["seed"].unique()))
    weights = seed_weights(len(seeds), resamples, seed)
    a = {"part": part, "widths": widths, "seeds": seeds, "weights": weights, "curves": {}}
    needed = [c for pred in PREDICTIONS for c in (mse_column(pred), f"{pred}_gap")]
    _add_curves(a, [c for c in needed if c in part])
    curves = a["curves"]
    net = curves["test_mse"]
    stats: dict[str, dict] = {}
    net_peak = None
    for pred in PREDICTIONS:
        col = mse_column(pred)
        if col not in curves:
            continue
        stats[pred] = _curve_stats(widths, curves[col], net, net_peak, curves.get(f"{pred}_gap"))
        if pred == "network":
            net_peak = stats[pred]["peak_idx"]
    n = stats["network"]
    double = ((n["smallest_idx"] < n["peak_idx"]) & (n["peak_idx"] < n["largest_idx"])
              & (n["peak"] >= PEAK_RATIO * n["at_largest"]))
    verdicts = None
    if "lazy" in stats:
        lz = stats["lazy"]
        shift = np.abs(lz["peak_idx"] - n["peak_idx"])
        holds = (curves["lazy_gap"][:, -1] <= LAZY_TOLERANCE if "lazy_gap" in curves
                 else np.zeros(len(shift), bool))
        yes = (shift == 0) & (lz["rho_past_peak"] >= RHO_SECOND_DESCENT) & holds
        verdicts = np.where(~double, "no double descent",
                            np.where(yes, "yes", np.where(shift <= 1, "partly", "no")))
    else:
        holds = None
    a.update(stats=stats, double=double, lazy_holds=holds, verdicts=verdicts)
    return a


def _add_curves(a: dict, columns: list[str]) -> None:
    """Resampled mean curves ``[R, W]`` of ``columns`` (numeric, measured somewhere) into
    ``a["curves"]``."""
    part = a["part"]
    cols = [c for c in columns if c not in a["curves"] and c in part
            and pd.api.types.is_numeric_dtype(part[c]) and part[c].notna().any()]
    if not cols:
        return
    table = (part.groupby(["width", "seed"])[cols].mean().astype(float).unstack("seed")
             .reindex(index=a["widths"]))
    for col in cols:
        values = table[col].reindex(columns=a["seeds"]).to_numpy(dtype=float)   # [W, S]
        a["curves"][col] = weighted_means(values, a["weights"])


def compare(final: pd.DataFrame, kind: str, resamples: int = RESAMPLES,
            seed: int = RESAMPLE_SEED) -> dict[str, dict]:
    """Per prediction (and the network itself), from its mean-over-seeds test-MSE curve: the
    peak width and height, its values at the smallest and largest widths, Spearman's rank
    correlation with the network's curve across all widths (``rho``) and across the widths from
    the network's peak on (``rho_past_peak``: the second descent), and the median over widths
    of its relative distance to the network's test predictions (``gap``; ``gap_at_largest``).

    Uncertainty over seeds (the seed bootstrap of :mod:`.bootstrap`): ``<stat>_ci`` is the
    ``LEVEL`` percentile interval of every number, and ``peak_widths`` lists the widths whose
    mean error is within noise of the peak (:func:`.bootstrap.within_noise`): the plausible peak
    locations."""
    return SeedBootstrap(final, kind, resamples, seed).compare()


def _compare(a: dict | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if a is None:
        return out
    widths = a["widths"]
    for pred, st in a["stats"].items():
        if st["peak_idx"][0] < 0:
            continue
        curve = a["curves"][mse_column(pred)]
        peak = int(st["peak_idx"][0])
        row = {"peak_width": int(widths[peak]), "peak": float(st["peak"][0]),
               "largest_width": int(widths[st["largest_idx"][0]]),
               "at_largest": float(st["at_largest"][0]),
               "smallest_width": int(widths[st["smallest_idx"][0]]),
               "at_smallest": float(st["at_smallest"][0]),
               "rho": float(st["rho"][0]), "rho_past_peak": float(st["rho_past_peak"][0]),
               "gap": float(st["gap"][0]), "gap_at_largest": float(st["gap_at_largest"][0]),
               "peak_widths": within_noise(curve, peak, widths)}
        row.update({f"{k}_ci": percentile_interval(st[k]) for k in _INTERVAL_STATS})
        out[pred] = row
    return out


def curve_intervals(final: pd.DataFrame, kind: str, column: str, resamples: int = RESAMPLES,
                    seed: int = RESAMPLE_SEED) -> pd.DataFrame:
    """Per width: the mean over seeds of ``column`` and its ``LEVEL`` bootstrap interval
    (columns ``mean``, ``lo``, ``hi``); empty if the column was not measured."""
    return SeedBootstrap(final, kind, resamples, seed).curve_intervals(column)


def _curve_intervals(a: dict | None, column: str) -> pd.DataFrame:
    if a is not None:
        _add_curves(a, [column])
    if a is None or column not in a["curves"]:
        return pd.DataFrame(columns=["mean", "lo", "hi"])
    c = a["curves"][column]
    rows = [(c[0, j], *percentile_interval(c[:, j])) for j in range(c.shape[1])]
    return pd.DataFrame(rows, index=pd.Index(a["widths"], name="width"),
                        columns=["mean", "lo", "hi"])


def curve_row(table: pd.DataFrame, i: int) -> tuple[float, tuple[float, float]]:
    """``(mean, (lo, hi))`` of row ``i`` of a :func:`curve_intervals` table."""
    r = table.iloc[i]
    return float(r["mean"]), (float(r["lo"]), float(r["hi"]))


def lazy_valid_from(final: pd.DataFrame, kind: str, tolerance: float = LAZY_TOLERANCE
                    ) -> int | None:
    """The smallest width from which on (every larger width too) the lazy prediction is within
    ``tolerance`` (relative distance of test predictions) of the trained network; ``None`` if the
    NTK approximation does not hold at the largest width."""
    c = mean_curves(final, kind)
    if "lazy_gap" not in c:
        return None
    ok = (c["lazy_gap"] <= tolerance).to_numpy()
    if not len(ok) or not ok[-1]:
        return None
    i = len(ok) - 1
    while i > 0 and ok[i - 1]:
        i -= 1
    return int(c.index[i])


def is_double_descent(stats: dict) -> bool:
    """An interior peak that stands at least ``PEAK_RATIO`` (20 %) above the error at the
    largest width."""
    return (stats["smallest_width"] < stats["peak_width"] < stats["largest_width"]
            and stats["peak"] >= PEAK_RATIO * stats["at_largest"])


def _share(flags: np.ndarray) -> float:
    return float(np.mean(flags[1:])) if len(flags) > 1 else float(flags[0])


def verdict_details(final: pd.DataFrame, kind: str, resamples: int = RESAMPLES,
                    seed: int = RESAMPLE_SEED) -> dict:
    """The verdict rule on the all-seeds means (``point``), the share of seed resamples giving
    each verdict (``shares``), the verdicts the rule gives for every pair of plausible peak
    widths (network x lazy, :func:`compare`'s ``peak_widths``, other numbers at their all-seeds
    values: ``implied``), and the robust ``verdict``: the all-seeds verdict when at least
    ``AGREEMENT`` (90 %) of the resamples give it too *and* every plausible pair of peaks gives
    it, else ``"undetermined (within noise: ...)"`` naming the uncertain parts (peak locations
    within noise, Spearman intervals that straddle the threshold, shares of resamples with
    double descent or with the lazy prediction holding), the verdicts the plausible peaks allow
    and the split of the resamples. With one seed the noise cannot be estimated and the verdict
    says so. ``category`` is the verdict's first word (``yes`` / ``partly`` / ``no`` / ``no
    double descent`` / ``undetermined`` / ``not measured``)."""
    return SeedBootstrap(final, kind, resamples, seed).verdict_details()


def _verdict_details(a: dict | None, stats: dict[str, dict]) -> dict:
    if a is None or a["verdicts"] is None or "network" not in stats or "lazy" not in stats:
        return {"verdict": "not measured", "category": "not measured", "point": "not measured",
                "shares": {}, "uncertain": [], "implied": []}
    v = a["verdicts"]
    point = str(v[0])
    boot = v[1:] if len(v) > 1 else v
    shares = {name: float(np.mean(boot == name)) for name in VERDICTS if np.any(boot == name)}
    shares = dict(sorted(shares.items(), key=lambda kv: -kv[1]))
    if len(a["seeds"]) < 2:
        return {"verdict": f"{point} (one seed: its noise is not estimated)", "category": point,
                "point": point, "shares": shares, "uncertain": ["one seed"],
                "implied": [point]}
    sweep = [int(w) for w in a["widths"]]
    uncertain = []
    dd = _share(a["double"])
    if 1 - AGREEMENT < dd < AGREEMENT:
        uncertain.append(f"double descent in {fmt_share(dd)} of the resamples")
    for pred, name in (("network", "the network's peak"), ("lazy", "the NTK-at-init peak")):
        ws = stats[pred]["peak_widths"]
        if len(ws) > 1:
            uncertain.append(f"{name} anywhere in widths {fmt_widths(ws, sweep)}")
    lo, hi = stats["lazy"]["rho_past_peak_ci"]
    if lo < RHO_SECOND_DESCENT <= hi:
        uncertain.append(f"the NTK-at-init Spearman past the peak {lo:.2f} to {hi:.2f} "
                         f"(threshold {RHO_SECOND_DESCENT})")
    holds = _share(a["lazy_holds"])
    if 1 - AGREEMENT < holds < AGREEMENT:
        uncertain.append(f"the lazy prediction within {fmt_share(LAZY_TOLERANCE)} at the largest "
                         f"width in {fmt_share(holds)} of the resamples")
    implied = {point}
    if point != "no double descent":   # the rule at every pair of plausible peak widths
        rho, holds_all = stats["lazy"]["rho_past_peak"], bool(a["lazy_holds"][0])
        implied = {_rule(abs(sweep.index(p) - sweep.index(q)), rho, holds_all)
                   for p in stats["network"]["peak_widths"]
                   for q in stats["lazy"]["peak_widths"]}
    if shares.get(point, 0.0) >= AGREEMENT and implied == {point}:
        return {"verdict": point, "category": point, "point": point, "shares": shares,
                "uncertain": uncertain, "implied": sorted(implied)}
    split = ", ".join(f"{k} {fmt_share(s)}" for k, s in shares.items())
    allowed = ([f"the peaks within noise allow {' or '.join(_ordered(implied))}"]
               if len(implied) > 1 else [])
    text = "; ".join([*uncertain, *allowed, f"seed resamples: {split}"])
    return {"verdict": f"undetermined (within noise: {text})", "category": "undetermined",
            "point": point, "shares": shares, "uncertain": uncertain,
            "implied": _ordered(implied)}


def _rule(shift: int, rho_past_peak: float, holds: bool) -> str:
    """The verdict rule for a network with double descent, given how many sweep widths apart
    the two peaks are: ``yes`` / ``partly`` / ``no`` (:func:`verdict`)."""
    if shift == 0 and rho_past_peak >= RHO_SECOND_DESCENT and holds:
        return "yes"
    return "partly" if shift <= 1 else "no"


def _ordered(names: set[str]) -> list[str]:
    return [v for v in VERDICTS if v in names]


class SeedBootstrap:
    """The seed bootstrap of one model row, computed once: :meth:`compare`,
    :meth:`verdict_details` and :meth:`curve_intervals` are the module's functions of the same
    names without recomputing it (the headline asks for all of them)."""

    def __init__(self, final: pd.DataFrame, kind: str, resamples: int = RESAMPLES,
                 seed: int = RESAMPLE_SEED) -> None:
        self.final, self.kind = final, kind
        self.analysis = _analysis(final, kind, resamples, seed)
        self._stats: dict[str, dict] | None = None
        self._details: dict | None = None

    @property
    def sweep(self) -> list[int]:
        """The widths of this model row."""
        return [] if self.analysis is None else [int(w) for w in self.analysis["widths"]]

    def compare(self) -> dict[str, dict]:
        if self._stats is None:
            self._stats = _compare(self.analysis)
        return self._stats

    def verdict_details(self) -> dict:
        if self._details is None:
            self._details = _verdict_details(self.analysis, self.compare())
        return self._details

    def curve_intervals(self, column: str) -> pd.DataFrame:
        return _curve_intervals(self.analysis, column)

    def double_descent_share(self) -> float:
        """The share of resamples whose network curve shows double descent."""
        return float("nan") if self.analysis is None else _share(self.analysis["double"])


def verdict(final: pd.DataFrame, kind: str, resamples: int = RESAMPLES,
            seed: int = RESAMPLE_SEED) -> str:
    """Can the NTK at initialization predict this model row's double descent? The rule, on mean
    curves over seeds: ``"yes"``: the lazy prediction peaks where the network does, ranks the
    widths of the second descent alike (Spearman >= 0.8) and holds (within 25 %) at the largest
    width (hence from some width on); ``"partly"``: it finds the peak's location within one
    sweep width but not the rest; ``"no"``: otherwise; ``"no double descent"`` when the network
    has no interior peak at least 20 % above its largest-width error. The rule is decided only
    where at least 90 % of seed resamples agree with the all-seeds answer and every pair of peak
    widths within noise gives it too, else the verdict is ``"undetermined (within noise: ...)"``
    (:func:`verdict_details`)."""
    return verdict_details(final, kind, resamples, seed)["verdict"]


def half_verdicts(final: pd.DataFrame, kind: str, resamples: int = RESAMPLES,
                  seed: int = RESAMPLE_SEED) -> tuple[dict, dict] | None:
    """The robust verdict (:func:`verdict_details`) on two disjoint halves of the seeds (the
    first ``S // 2`` seeds in order, and the rest); ``None`` with fewer than two seeds. Each
    dict adds ``seeds``, the half's seeds."""
    part = final[final["model"] == kind]
    seeds = sorted(int(s) for s in part["seed"].unique())
    if len(seeds) < 2:
        return None
    out = []
    for half in (seeds[:len(seeds) // 2], seeds[len(seeds) // 2:]):
        d = verdict_details(part[part["seed"].isin(half)], kind, resamples, seed)
        out.append({**d, "seeds": half})
    return out[0], out[1]
