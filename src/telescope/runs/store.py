"""A run directory: the config, one Parquet file per finished sweep point, the tidy results.

Layout of ``DIR``::

    config.json              {"study", "preset", "config"}: what the points were computed with
    run.json                 run metadata: points done / total, failures, sessions, versions
    points/<key>.parquet     one file per finished point (its tidy rows)
    results.parquet          all finished points, in sweep order (rebuilt after each point)
    *.png, *.svg             figures; report.html
    set-aside/               files the run could not use, kept instead of deleted (a damaged
                             point file, a results.parquet that held more than the points)
    .telescope-lock          held (``flock``) by the run writing the directory

Every file is written to a temporary file in its own directory and then ``os.replace``d into
place, so a reader (or a run killed at any moment) sees either the old file or the new one,
never a partial file. A point's key is the SHA-1 of its JSON with sorted keys
(:func:`~telescope.runs.points.point_key`): the same point has the same file in every run, which
is how re-running a command resumes.

Nothing here deletes data it was not asked to: a damaged point file is moved to ``set-aside/``
(:meth:`RunStore.set_aside`) before its point is computed again, ``results.parquet`` is only
rewritten by the run that holds the lock, and :meth:`RunStore.prepare` refuses a directory that is
not a telescope run (even with ``force``) unless it is empty.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from telescope._io import FILE_MODE as _FILE_MODE
from telescope._io import TMP_PREFIX as _TMP_PREFIX
from telescope._io import atomic_write
from telescope.errors import TelescopeError, UsageError
from telescope.runs.directories import (
    RunDirectoryError,
    _file_ancestor,
    _reason,
    ensure_writable_dir,
)
from telescope.runs.points import canonical_json, concat_points, point_key, rows_to_frame
from telescope.studies.config import flatten_config

__all__ = ["RunStore", "ConfigMismatchError", "NotARunError", "RunDirectoryError",
           "RunInUseError", "point_key", "canonical_json", "atomic_write", "atomic_write_text",
           "rows_to_frame", "ensure_writable_dir", "concat_points"]

_META_KEY = b"telescope.point"
LOCK_NAME = ".telescope-lock"
SET_ASIDE = "set-aside"
_READ_ERRORS = (OSError, ValueError, pa.ArrowException)


class ConfigMismatchError(UsageError):
    """The run directory holds results of a different study or config."""


class NotARunError(UsageError):
    """The directory is not a telescope run (its ``config.json`` is someone else's, or it holds
    other files): it is never written to, not even with ``force``."""


class RunInUseError(UsageError):
    """Another telescope run is writing the directory (it holds the lock)."""


def _config_problem(data: Any) -> str | None:
    """Why ``data`` (a parsed ``config.json``) is not a telescope run's config, or ``None``."""
    if not isinstance(data, Mapping):
        kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
            type(data), "number")
        return f"a JSON {kind}, not an object with the keys study, preset and config"
    missing = [k for k in ("study", "preset", "config") if k not in data]
    if missing:
        return f"no {' and no '.join(repr(k) for k in missing)} key"
    if not isinstance(data["study"], str) or not data["study"]:
        return f"'study' is {data['study']!r}, not a study name"
    if not isinstance(data["config"], Mapping):
        return f"'config' is a {type(data['config']).__name__}, not an object"
    if data["preset"] is not None and not isinstance(data["preset"], str):
        return f"'preset' is {data['preset']!r}, not a preset name"
    return None


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (through :func:`atomic_write`, from
    :mod:`telescope._io`, which the figure helpers share)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class RunStore:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir)
        self.config_path = self.dir / "config.json"
        self.meta_path = self.dir / "run.json"
        self.points_dir = self.dir / "points"
        self.results_path = self.dir / "results.parquet"
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ config

    def read_config(self) -> dict[str, Any]:
        """The saved ``config.json`` (``{"study", "preset", "config"}``), checked to be a
        telescope run's: anything else raises :class:`NotARunError`."""
        if not self.config_path.exists():
            raise UsageError(f"{self.dir} is not a run directory (no config.json)")
        try:
            text = self.config_path.read_text(encoding="utf-8")
        except IsADirectoryError:
            raise NotARunError(f"{self.config_path} is not a telescope run's config (a "
                               f"directory); use another --out") from None
        except UnicodeDecodeError:
            raise NotARunError(f"{self.config_path} is not a telescope run's config (not UTF-8 "
                               f"text); use another --out") from None
        except OSError as err:
            raise RunDirectoryError(f"cannot read {self.config_path} ({_reason(err)}); make it "
                                    f"readable or use another --out") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise NotARunError(f"{self.config_path} is not a telescope run's config (not valid "
                               f"JSON: {err}); use another --out") from None
        problem = _config_problem(data)
        if problem:
            raise NotARunError(f"{self.config_path} is not a telescope run's config ({problem}); "
                               f"use another --out")
        return data

    def _is_empty(self) -> bool:
        """Whether the directory holds nothing a run would have to respect: no entries but an
        empty ``points/`` (a run killed before its config was written), the lock and temporary
        files."""
        for entry in self.dir.iterdir():
            if entry.name == LOCK_NAME or entry.name.startswith(_TMP_PREFIX):
                continue
            if entry == self.points_dir and entry.is_dir() and all(
                    f.name.startswith(_TMP_PREFIX) for f in entry.iterdir()):
                continue
            return False
        return True

    def check(self, study: str, config: dict[str, Any], *, force: bool = False) -> bool:
        """Check, without writing anything, that the directory may hold this run: returns
        ``True`` when it holds points of the same study and config (they may be resumed).

        Raises :class:`RunDirectoryError` when it is a file or lies under one,
        :class:`NotARunError` when its ``config.json`` is not a telescope run's or it is not
        empty and has no ``config.json`` (both even with ``force``), and
        :class:`ConfigMismatchError` when it holds another study's or config's results (unless
        ``force``: they will be discarded)."""
        if (self.dir.exists() or self.dir.is_symlink()) and not self.dir.is_dir():
            raise RunDirectoryError(f"--out {self.dir} is a file, not a directory: choose "
                                    f"another --out")
        blocker = _file_ancestor(self.dir)
        if blocker is not None:
            raise RunDirectoryError(f"cannot create --out {self.dir}: {blocker} is a file, not "
                                    f"a directory; choose another --out")
        if not self.dir.is_dir():
            return False
        if not (self.config_path.exists() or self.config_path.is_symlink()):
            try:
                empty = self._is_empty()
            except OSError as err:
                raise RunDirectoryError(f"cannot list {self.dir} ({_reason(err)}); choose "
                                        f"another --out") from None
            if not empty:
                raise NotARunError(f"{self.dir} is not empty and holds no telescope run (no "
                                   f"config.json); choose a new or empty --out")
            return False
        saved = self.read_config()
        same = (saved.get("study") == study and
                canonical_json(saved.get("config")) == canonical_json(_normalize(config)))
        if same:
            return True
        if not force:
            raise ConfigMismatchError(
                f"{self.dir} holds results of a different "
                f"{'study' if saved.get('study') != study else 'config'} "
                f"({_describe_diff(saved, study, config)}); use --force to discard them "
                f"and start over, or another --out")
        return False

    def prepare(self, study: str, preset: str | None, config: dict[str, Any], *,
                force: bool = False) -> bool:
        """Create the directory and ``config.json``, or check the saved one matches, and take
        the directory's lock (held until :meth:`close`).

        See :meth:`check` for the directories refused. With ``force`` the points, results and
        report of another study or config are deleted and the run starts over. Returns ``True``
        when previous points (of the same config) may be resumed.
        """
        wanted = {"study": study, "preset": preset, "config": config}
        resumable = self.check(study, config, force=force)
        had_config = self.config_path.is_file()
        ensure_writable_dir(self.dir)
        self.acquire_lock()
        try:
            if had_config and not resumable:
                self.clear()
            self.points_dir.mkdir(exist_ok=True)
            ensure_writable_dir(self.points_dir, "the points directory")
            self.remove_stale_temp_files()
            if not resumable or canonical_json(self.read_config()) != canonical_json(
                    _normalize(wanted)):
                text = json.dumps(wanted, indent=2, sort_keys=False, allow_nan=True) + "\n"
                self._write(self.config_path, lambda: atomic_write_text(self.config_path, text))
        except BaseException:
            self.close()
            raise
        return resumable

    def clear(self) -> None:
        """Delete the points, results, metadata, figures and report this run wrote (not
        ``set-aside/``: what was kept aside stays)."""
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

    # ------------------------------------------------------------------ the lock

    def acquire_lock(self, *, wait: bool = False) -> bool:
        """Take the directory's lock (an ``flock`` on ``.telescope-lock``, released by
        :meth:`close` or when the process ends, however it ends). Another holder raises
        :class:`RunInUseError`. Returns ``False`` where the platform has no ``flock``."""
        if self._lock_fd is not None:
            return True
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return False
        path = self.dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as err:
            raise RunDirectoryError(f"cannot create {path} ({_reason(err)}); choose a writable "
                                    f"--out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunInUseError(f"{self.dir} is being written by another telescope run (pid "
                                f"{holder}); wait for it to finish, or choose another --out"
                                ) from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        return True

    def try_lock(self) -> bool:
        """Take the lock if nobody holds it: ``True`` when this process now holds it (or the
        platform has no locks), ``False`` when another run does."""
        try:
            self.acquire_lock()
        except RunInUseError:
            return False
        except RunDirectoryError:  # a read-only directory: nobody can be writing it
            return True
        return True

    def close(self) -> None:
        """Release the lock, if held."""
        fd = self._lock_fd
        if fd is not None:
            self._lock_fd = None
            os.close(fd)

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def _write(self, path: Path, write: Callable[[], Any]) -> Any:
        """Run ``write()``; an OSError becomes a one-line :class:`RunDirectoryError`."""
        try:
            return write()
        except OSError as err:
            if isinstance(err, TelescopeError):
                raise
            hint = ("free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT)
                    else "check the directory's permissions")
            raise RunDirectoryError(f"cannot write {path} ({_reason(err)}); {hint} and "
                                    f"re-run the same command") from err

    def set_aside(self, path: Path) -> Path:
        """Move ``path`` (a damaged point file, an outdated ``results.parquet``) into
        ``DIR/set-aside/``, named with the time and its place in the run; returns where it is
        now. Nothing is deleted."""
        path = Path(path)
        folder = self.dir / SET_ASIDE
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        rel = path.relative_to(self.dir) if path.is_relative_to(self.dir) else Path(path.name)
        target = folder / f"{stamp}-{'-'.join(rel.parts)}"
        try:
            folder.mkdir(exist_ok=True)
            os.replace(path, target)
        except OSError as err:
            raise RunDirectoryError(f"cannot move {path} to {folder} ({_reason(err)}); move it "
                                    f"away yourself and re-run the same command") from None
        return target

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

    def scan_points(self, points: list[Mapping[str, Any]]
                    ) -> tuple[dict[str, pd.DataFrame], dict[Path, str]]:
        """Read the finished points among ``points``: ``(frames by key, damaged)`` where
        ``damaged`` maps each point file that exists but cannot be read to the reason. Nothing
        is changed on disk."""
        done: dict[str, pd.DataFrame] = {}
        damaged: dict[Path, str] = {}
        for point in points:
            path = self.point_path(point)
            if not (path.exists() or path.is_symlink()):
                continue
            try:
                done[point_key(point)] = pd.read_parquet(path)
            except _READ_ERRORS as err:
                damaged[path] = _reason(err)
        return done, damaged

    def load_points(self, points: list[Mapping[str, Any]]) -> dict[str, pd.DataFrame]:
        """The finished points among ``points`` that can be read, by key (damaged files are
        left where they are, with a warning; see :meth:`scan_points`)."""
        done, damaged = self.scan_points(points)
        for path, why in damaged.items():
            warnings.warn(f"{path} cannot be read ({why}); it is skipped", stacklevel=2)
        return done

    # ------------------------------------------------------------------ results

    def write_results(self, points: list[Mapping[str, Any]],
                      frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
        """Concatenate the finished points' rows in sweep order and write
        ``results.parquet`` atomically; returns the table."""
        df = concat_points(points, frames)
        self._write(self.results_path, lambda: atomic_write(
            self.results_path, lambda tmp: df.to_parquet(tmp, index=False)))
        return df

    def results_at_risk(self, points: list[Mapping[str, Any]],
                        frames: Mapping[str, pd.DataFrame]) -> str | None:
        """Why rewriting ``results.parquet`` from ``frames`` would lose data (it holds more
        rows, or cannot be read), or ``None`` when it is missing or holds no more than that."""
        if not self.results_path.exists():
            return None
        try:
            existing = pq.read_metadata(self.results_path).num_rows
        except _READ_ERRORS as err:
            return f"it cannot be read ({_reason(err)})"
        keys = {point_key(p) for p in points}
        rows = sum(len(f) for k, f in frames.items() if k in keys)
        if existing > rows:
            return (f"it holds {existing} rows, the readable point files {rows}")
        return None

    def rebuild_results(self, points: list[Mapping[str, Any]]) -> pd.DataFrame:
        """``results.parquet`` from the point files on disk (e.g. after a killed run). Refuses
        (:class:`RunDirectoryError`) when a point file cannot be read or the current
        ``results.parquet`` holds more than the point files: nothing is lost."""
        frames, damaged = self.scan_points(points)
        if damaged:
            path, why = next(iter(damaged.items()))
            raise RunDirectoryError(f"{len(damaged)} point file(s) cannot be read (e.g. {path}: "
                                    f"{why}); results.parquet is left as it is")
        risk = self.results_at_risk(points, frames)
        if risk:
            raise RunDirectoryError(f"{self.results_path} is left as it is: {risk}")
        return self.write_results(points, frames)

    def read_results(self) -> pd.DataFrame:
        """The saved ``results.parquet``."""
        return pd.read_parquet(self.results_path)

    # ------------------------------------------------------------------ metadata

    def read_meta(self) -> dict[str, Any]:
        """``run.json`` (empty when missing, unreadable or not a JSON object)."""
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Write ``run.json`` atomically (an OSError becomes :class:`RunDirectoryError`)."""
        text = json.dumps(_finite(meta), indent=2) + "\n"
        self._write(self.meta_path, lambda: atomic_write_text(self.meta_path, text))


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
    old = flatten_config(_normalize(saved.get("config") or {}))
    new = flatten_config(_normalize(config))
    diffs = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
             for k in sorted(set(old) | set(new)) if old.get(k, object()) != new.get(k, object())]
    shown = "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")
    return shown or "see config.json"
