"""A run directory: the config, one Parquet file per finished sweep point, the tidy results.

Layout of ``DIR``::

    config.json              {"study", "preset", "config"}: what the points were computed with
    run.json                 run metadata: points done / total, failures, sessions, versions
    points/<key>.parquet     one file per finished point (its tidy rows)
    results.parquet          all finished points, in sweep order (rebuilt after each point)
    *.png, *.svg             figures; report.html

Every file is written to a temporary file in its own directory and then ``os.replace``d into
place, so a reader (or a run killed at any moment) sees either the old file or the new one,
never a partial file. A point's key is the SHA-1 of its JSON with sorted keys: the same point
has the same file in every run, which is how re-running a command resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from telescope.errors import UsageError

__all__ = ["RunStore", "ConfigMismatchError", "point_key", "canonical_json", "atomic_write",
           "atomic_write_text", "rows_to_frame"]

_TMP_PREFIX = ".tmp-"
_META_KEY = b"telescope.point"


def _file_mode() -> int:
    """The mode a plainly created file gets (0666 less the umask): mkstemp's files are 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


class ConfigMismatchError(UsageError):
    """The run directory holds results of a different study or config."""


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


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then ``os.replace`` it there.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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


class RunStore:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir)
        self.config_path = self.dir / "config.json"
        self.meta_path = self.dir / "run.json"
        self.points_dir = self.dir / "points"
        self.results_path = self.dir / "results.parquet"

    # ------------------------------------------------------------------ config

    def read_config(self) -> dict[str, Any]:
        """The saved ``config.json`` (``{"study", "preset", "config"}``)."""
        if not self.config_path.is_file():
            raise UsageError(f"{self.dir} is not a run directory (no config.json)")
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UsageError(f"{self.config_path} is not valid JSON: {err}") from None

    def prepare(self, study: str, preset: str | None, config: dict[str, Any], *,
                force: bool = False) -> bool:
        """Create the directory and ``config.json``, or check the saved one matches.

        A directory that holds another study's or config's results raises
        :class:`ConfigMismatchError` (listing the differences), unless ``force``: then its
        points, results and report are deleted and the run starts over. Returns ``True`` when
        previous points (of the same config) may be resumed.
        """
        wanted = {"study": study, "preset": preset, "config": config}
        resumable = False
        if self.config_path.exists():
            saved = self.read_config()
            same = (saved.get("study") == study and
                    canonical_json(saved.get("config")) == canonical_json(_normalize(config)))
            if same:
                resumable = True
            elif not force:
                raise ConfigMismatchError(
                    f"{self.dir} holds results of a different "
                    f"{'study' if saved.get('study') != study else 'config'} "
                    f"({_describe_diff(saved, study, config)}); use --force to discard them "
                    f"and start over, or another --out")
            else:
                self.clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.points_dir.mkdir(exist_ok=True)
        self.remove_stale_temp_files()
        if not resumable or canonical_json(self.read_config()) != canonical_json(
                _normalize(wanted)):
            atomic_write_text(self.config_path,
                              json.dumps(wanted, indent=2, sort_keys=False, allow_nan=True) + "\n")
        return resumable

    def clear(self) -> None:
        """Delete the points, results, metadata, figures and report this run wrote."""
        if self.points_dir.is_dir():
            for f in self.points_dir.iterdir():
                if f.suffix == ".parquet" or f.name.startswith(_TMP_PREFIX):
                    f.unlink()
        meta = self.read_meta()
        for name in meta.get("figures", []):
            for ext in (".png", ".svg"):
                with contextlib.suppress(OSError):
                    (self.dir / Path(name).with_suffix(ext).name).unlink()
        for f in (self.results_path, self.meta_path, self.dir / "report.html"):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    def remove_stale_temp_files(self) -> list[Path]:
        """Remove temporary files left by a killed run (they are never complete results)."""
        removed = []
        for folder in (self.dir, self.points_dir):
            if folder.is_dir():
                for f in folder.iterdir():
                    if f.name.startswith(_TMP_PREFIX) and f.is_file():
                        with contextlib.suppress(OSError):
                            f.unlink()
                            removed.append(f)
        return removed

    # ------------------------------------------------------------------ points

    def point_path(self, point: Mapping[str, Any]) -> Path:
        """``DIR/points/<key>.parquet`` of a point."""
        return self.points_dir / f"{point_key(point)}.parquet"

    def has_point(self, point: Mapping[str, Any]) -> bool:
        """Whether the point has finished (its file exists)."""
        return self.point_path(point).is_file()

    def write_point(self, point: Mapping[str, Any], rows: Iterable[Mapping[str, Any]], *,
                    seconds: float | None = None) -> pd.DataFrame:
        """Write one point's rows atomically; returns them as a DataFrame."""
        df = rows_to_frame(point, rows)
        table = pa.Table.from_pandas(df, preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[_META_KEY] = canonical_json({"point": dict(point), "key": point_key(point),
                                          "seconds": seconds}).encode()
        table = table.replace_schema_metadata(meta)
        atomic_write(self.point_path(point), lambda tmp: pq.write_table(table, tmp))
        return df

    def read_point(self, point: Mapping[str, Any]) -> pd.DataFrame:
        """The saved rows of one finished point."""
        return pd.read_parquet(self.point_path(point))

    def point_info(self, path: Path) -> dict[str, Any]:
        """The metadata stored with a point file: ``{"point", "key", "seconds"}``."""
        meta = pq.read_schema(path).metadata or {}
        raw = meta.get(_META_KEY)
        return json.loads(raw) if raw else {}

    def load_points(self, points: list[Mapping[str, Any]]) -> dict[str, pd.DataFrame]:
        """The finished points among ``points``, by key. Unreadable files are removed (with a
        warning) so that their points run again."""
        done: dict[str, pd.DataFrame] = {}
        for point in points:
            path = self.point_path(point)
            if not path.is_file():
                continue
            try:
                done[point_key(point)] = pd.read_parquet(path)
            except Exception as err:  # a damaged file: compute the point again
                warnings.warn(f"{path} is unreadable ({err}); its point runs again",
                              stacklevel=2)
                with contextlib.suppress(OSError):
                    path.unlink()
        return done

    # ------------------------------------------------------------------ results

    def write_results(self, points: list[Mapping[str, Any]],
                      frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
        """Concatenate the finished points' rows in sweep order and write
        ``results.parquet`` atomically; returns the table."""
        parts = [frames[k] for k in (point_key(p) for p in points) if k in frames]
        parts = [p for p in parts if len(p.columns)]
        if parts:
            with warnings.catch_warnings():
                # concatenating a point without rows (all-NA columns) is fine here
                warnings.simplefilter("ignore", FutureWarning)
                df = pd.concat(parts, ignore_index=True, sort=False)
        else:
            df = pd.DataFrame()
        atomic_write(self.results_path, lambda tmp: df.to_parquet(tmp, index=False))
        return df

    def rebuild_results(self, points: list[Mapping[str, Any]]) -> pd.DataFrame:
        """``results.parquet`` from the point files on disk (e.g. after a killed run)."""
        return self.write_results(points, self.load_points(points))

    def read_results(self) -> pd.DataFrame:
        """The saved ``results.parquet``."""
        return pd.read_parquet(self.results_path)

    # ------------------------------------------------------------------ metadata

    def read_meta(self) -> dict[str, Any]:
        """``run.json`` (empty when missing or unreadable)."""
        try:
            return json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Write ``run.json`` atomically."""
        atomic_write_text(self.meta_path, json.dumps(_finite(meta), indent=2) + "\n")


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively (run.json stays strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _normalize(value: Any) -> Any:
    """A JSON round trip, so that tuples and lists (and int/float spellings) compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, allow_nan=True))


def _describe_diff(saved: Mapping[str, Any], study: str, config: Mapping[str, Any]) -> str:
    if saved.get("study") != study:
        return f"study {saved.get('study')!r}, not {study!r}"
    from telescope.studies.base import flatten_config

    old = flatten_config(_normalize(saved.get("config") or {}))
    new = flatten_config(_normalize(config))
    diffs = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
             for k in sorted(set(old) | set(new)) if old.get(k, object()) != new.get(k, object())]
    shown = "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")
    return shown or "see config.json"
