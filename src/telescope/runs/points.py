"""Sweep points as data: a point's stable key, its tidy rows as a DataFrame, and the table of
all finished points in sweep order (what ``results.parquet`` holds).

A point's key is the SHA-1 of its JSON with sorted keys (:func:`canonical_json`): the same point
has the same key, and so the same file, in every run.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

__all__ = ["canonical_json", "point_key", "rows_to_frame", "concat_points"]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same text."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except TypeError as err:
        raise ValueError(f"not JSON-serializable: {value!r} ({err})") from None


def point_key(point: Mapping[str, Any]) -> str:
    """The stable key of a sweep point: the first 16 hex digits of SHA-1 of its sorted JSON."""
    if not isinstance(point, Mapping):
        raise ValueError(f"a sweep point must be a dict, got {type(point).__name__}")
    return hashlib.sha1(canonical_json(dict(point)).encode()).hexdigest()[:16]


def _scalar(value: Any) -> Any:
    """0-d tensors and numpy scalars -> Python numbers; everything else unchanged."""
    if hasattr(value, "item") and hasattr(value, "shape") and tuple(value.shape) in ((), (1,)):
        try:
            return value.item()
        except (TypeError, ValueError):  # pragma: no cover - exotic array types
            return value
    return value


def rows_to_frame(point: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Tidy rows of one point as a DataFrame: the point's keys first (filled in where a row
    lacks them), then the other columns in the order they first appear."""
    if isinstance(rows, Mapping):
        raise ValueError("run_point must return a list of dicts (one per measurement step), "
                         "got a single dict")
    records: list[dict[str, Any]] = []
    for row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"run_point must return dicts, got {type(row).__name__}")
        record = {k: _scalar(v) for k, v in point.items()}
        record.update({str(k): _scalar(v) for k, v in row.items()})
        records.append(record)
    columns = list(point)
    for record in records:
        columns.extend(k for k in record if k not in columns)
    return pd.DataFrame.from_records(records, columns=columns)


def concat_points(points: list[Mapping[str, Any]],
                  frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The rows of the points in ``frames`` (by key), in the order of ``points``: the table
    ``results.parquet`` holds."""
    parts = [frames[k] for k in (point_key(p) for p in points) if k in frames]
    parts = [p for p in parts if len(p.columns)]
    if not parts:
        return pd.DataFrame()
    with warnings.catch_warnings():
        # concatenating a point without rows (all-NA columns) is fine here
        warnings.simplefilter("ignore", FutureWarning)
        return pd.concat(parts, ignore_index=True, sort=False)
