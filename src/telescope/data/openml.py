"""OpenML data sets, read offline from a cache directory (:func:`load_openml_cache`).

The tabular benchmark of Grinsztajn, Oyallon & Varoquaux (2022, "Why do tree-based models still
outperform deep learning on tabular data?"), used by the paper's trees-vs-nets experiment, is
published on OpenML (e.g. ``houses``, ``california``, ``house_16H``, ``elevators``, ...).
Fetch a set once on a machine with internet, e.g.
``sklearn.datasets.fetch_openml("houses", data_home=DIR)``, then read it offline with
``load_openml_cache(DIR, "houses")`` (or by its numeric id); or export it to CSV / Parquet and
use :func:`~telescope.data.tables.load_table`.

The cache is the one ``fetch_openml(data_home=DIR)`` leaves, read by ``fetch_openml`` itself once
every file it needs is checked to be there (so nothing is downloaded), or a plain directory of
``<name>.csv`` / ``.parquet`` / ``.arff`` files. The frame becomes a
:class:`~telescope.data.Dataset` by :func:`telescope.data.tables.table_dataset`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from telescope.data import Dataset
from telescope.data import _util as U
from telescope.data._util import MissingDataError
from telescope.data.arff import read_arff
from telescope.data.tables import _is_categorical, _read_frame, table_dataset
from telescope.errors import UsageError

__all__ = ["load_openml_cache"]


def _json(path: Path) -> Any:
    try:
        return json.loads(U.read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not a (gzipped) JSON file as OpenML caches it: {err}") from err


def _openml_root(folder: Path) -> Path | None:
    """``HOME/openml/openml.org`` for ``folder`` = ``HOME``, ``HOME/openml`` or that root."""
    for cand in (folder / "openml" / "openml.org", folder / "openml.org", folder):
        if (cand / "api" / "v1").is_dir() or (cand / "data" / "v1").is_dir():
            if cand.name != "openml.org" or cand.parent.name != "openml":
                raise UsageError(
                    f"{cand} looks like an OpenML cache, but fetch_openml(data_home=DIR) reads "
                    "its cache only from DIR/openml/openml.org: move it there and pass DIR"
                )
            return cand
    return None


def _resolve_id(root: Path, name: str, version: int | None) -> int | None:
    """The data id of ``name`` from cached name lookups, else from cached descriptions."""
    candidates: list[tuple[bool, int, int]] = []  # (not active, version, did)
    lookup = root / "api" / "v1" / "json" / "data" / "list" / "data_name" / name.lower()
    for f in sorted(p for p in lookup.rglob("*") if p.is_file()) if lookup.is_dir() else []:
        try:
            found = _json(f)["data"]["dataset"]
        except (ValueError, KeyError, TypeError):
            continue
        candidates += [(d.get("status") != "active", int(d["version"]), int(d["did"]))
                       for d in found]
    if not candidates:
        desc_dir = root / "api" / "v1" / "json" / "data"
        for f in sorted(desc_dir.glob("*.gz")) if desc_dir.is_dir() else []:
            try:
                d = _json(f)["data_set_description"]
            except (ValueError, KeyError, TypeError):
                continue
            if str(d.get("name", "")).lower() == name.lower():
                candidates.append((d.get("status", "active") != "active",
                                   int(d.get("version", 1)), int(d["id"])))
    if version is not None:
        candidates = [c for c in candidates if c[1] == version]
    return min(candidates)[2] if candidates else None


def _not_cached(root: Path, name_or_id: str | int, what: str) -> MissingDataError:
    data_home = root.parent.parent
    how = (f"data_id={name_or_id}" if str(name_or_id).isdigit() else repr(name_or_id))
    return MissingDataError(
        f"OpenML data set {name_or_id!r} is not in the cache {root}: {what}. Fill the cache on a "
        f"machine with internet with sklearn.datasets.fetch_openml({how}, "
        f"data_home={str(data_home)!r}) and copy that directory here (nothing is downloaded now)"
    )


def _openml_frame(
    root: Path, name_or_id: str | int, version: int | None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The data of an OpenML cache, read by ``fetch_openml`` once every file it needs is there.

    The cached description, features, qualities and data file (with its MD5 checksum) are
    checked first, so that ``fetch_openml`` never reaches for the network (nor deletes a corrupt
    cache file to download it again).
    """
    from sklearn.datasets import fetch_openml

    if isinstance(name_or_id, (int, np.integer)) or str(name_or_id).isdigit():
        did = int(name_or_id)
    else:
        did = _resolve_id(root, str(name_or_id), version)
        if did is None:
            raise _not_cached(root, name_or_id, "no cached name lookup (api/v1/json/data/list/"
                              f"data_name/{str(name_or_id).lower()}/...) or description names it")
    api = root / "api" / "v1" / "json" / "data"
    need = [api / f"{did}.gz", api / "features" / f"{did}.gz", api / "qualities" / f"{did}.gz"]
    absent = [str(p.relative_to(root)) for p in need if not p.is_file()]
    if absent:
        raise _not_cached(root, name_or_id, f"{', '.join(absent)} missing")
    desc, features, _ = (_json(p) for p in need)
    try:
        desc, features = desc["data_set_description"], features["data_features"]["feature"]
        url, md5 = desc["url"], desc.get("md5_checksum")
    except (KeyError, TypeError) as err:
        raise UsageError(f"{need[0]} / {need[1]}: not an OpenML description / feature list "
                         f"(missing {err}); fetch the data set again") from err
    if str(desc.get("format", "arff")).lower() == "sparse_arff":
        raise UsageError(f"OpenML data set {did} is sparse ARFF, which is not supported")
    data_file = root / (urlparse(url).path.lstrip("/") + ".gz")
    if not data_file.is_file():
        raise _not_cached(root, name_or_id, f"data file {data_file.relative_to(root)} missing")
    if md5 and hashlib.md5(U.read_bytes(data_file)).hexdigest() != md5:
        raise UsageError(f"{data_file} does not match the MD5 checksum of its OpenML description: "
                         "the cached file is corrupt; delete it and fetch the data set again")
    try:
        # target_column=None: every column but OpenML's ignored and row-id ones, target included
        bunch = fetch_openml(data_id=did, data_home=str(root.parent.parent), target_column=None,
                             as_frame=True, parser="pandas")
    except OSError as err:  # URLError: a cache file was unreadable and sklearn went online
        raise _not_cached(root, name_or_id, f"fetch_openml could not read it offline ({err})"
                          ) from err
    frame = bunch.frame
    for f in features:  # the declared category order (as in the ARFF header), not sorted
        col, declared = f["name"], f.get("nominal_value")
        if f.get("data_type") != "nominal" or declared is None or col not in frame:
            continue
        declared = [str(v) for v in (declared if isinstance(declared, list) else [declared])]
        values = [None if pd.isna(v) else str(v) for v in frame[col].tolist()]
        unknown = sorted(set(values) - set(declared) - {None})
        if unknown:
            raise UsageError(f"{data_file}: values {unknown[:5]} of nominal attribute {col!r} "
                             f"are not among its declared values {declared[:10]}")
        frame[col] = pd.Categorical(values, categories=declared)
    targets = [f["name"] for f in features if str(f.get("is_target")).lower() == "true"]
    if not targets and desc.get("default_target_attribute"):
        targets = str(desc["default_target_attribute"]).split(",")
    return frame, {"targets": targets, "name": desc.get("name"), "id": did,
                   "path": str(data_file)}


def load_openml_cache(
    cache_dir: str | os.PathLike[str],
    name_or_id: str | int,
    *,
    target: str | None = None,
    features: Sequence[str] | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    task: str | None = None,
    version: int | None = None,
    **options: Any,
) -> Dataset:
    """A data set from an OpenML cache directory, read offline.

    Two layouts are understood:

    1. the cache that ``sklearn.datasets.fetch_openml(name, data_home=DIR)`` leaves; ``cache_dir``
       may be ``DIR``, ``DIR/openml`` or ``DIR/openml/openml.org``. A name is resolved to its data
       id through the cached name lookups (``api/v1/json/data/list/data_name/<name>/...``) or
       else the cached descriptions (``api/v1/json/data/<id>.gz``); with several versions the
       oldest active one is taken unless ``version`` is given. Once the description, features,
       qualities and data file of that id are found in the cache (and the data file matches its
       MD5 checksum), ``fetch_openml(data_id=..., data_home=DIR)`` reads them, offline. OpenML's
       ignored and row-id attributes are left out; the default target is the attribute flagged
       as target. A data set missing from the cache raises :class:`MissingDataError` saying
       which file is missing and how to fill the cache; nothing is downloaded.
    2. a plain directory holding ``<name>.csv``, ``<name>.parquet``, ``<name>.arff`` or
       ``<name>.arff.gz`` (name matched case-insensitively). A CSV / Parquet file needs
       ``target``; an ARFF file is read by :func:`read_arff` and its default target is its last
       attribute (Weka's convention).

    The frame is converted by :func:`table_dataset` (``options`` go there). ``task`` defaults to
    classification for a nominal / string target and regression otherwise. Grinsztajn et al.'s
    benchmark sets (``houses``, ``california``, ...) are read this way; see the module docstring.
    """
    folder = U.as_path(cache_dir, "load_openml_cache")
    if not folder.is_dir():
        raise MissingDataError(f"OpenML cache directory {folder} does not exist; pass the "
                               "data_home you gave fetch_openml, or a directory with <name>.csv")
    key = str(name_or_id)
    plain = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
    frame, info = None, {}
    for ext in (".csv", ".tsv", ".parquet", ".pq", ".arff", ".arff.gz", ".csv.gz"):
        p = plain.get(key.lower() + ext)
        if p is None:
            continue
        if ext.startswith(".arff"):
            frame, arff_info = read_arff(p)
            info = {"targets": [arff_info["attributes"][-1][0]], "path": str(p)}
        else:
            frame = _read_frame(p)
            info = {"targets": [], "path": str(p)}
        break
    if frame is None:
        root = _openml_root(folder)
        if root is None:
            raise MissingDataError(
                f"no data set {key!r} in {folder}: neither {key}.csv / .parquet / .arff[.gz] "
                "nor an OpenML cache (openml/openml.org/api/v1, .../data/v1) is there. Fill it "
                f"with sklearn.datasets.fetch_openml({key!r}, data_home={str(folder)!r}) on a "
                "machine with internet, or put the table there as CSV"
            )
        frame, info = _openml_frame(root, name_or_id, version)
    if target is None:
        if len(info["targets"]) != 1:
            raise UsageError(
                f"{info['path']}: no single default target (found {info['targets']}); "
                f"pass target= one of {list(frame.columns)}"
            )
        target = info["targets"][0]
    if target not in frame.columns:
        raise UsageError(f"{info['path']}: target column {target!r} not found; the "
                         f"columns are {list(frame.columns)}")
    if features is None:
        features = [c for c in frame.columns if c != target]
    if task is None:
        task = "classification" if _is_categorical(frame[target]) else "regression"
    name = re.sub(r"\W+", "_", str(info.get("name") or key)).strip("_") or "openml"
    ds = table_dataset(frame, target, features=features, n_train=n_train, n_test=n_test,
                       seed=seed, task=task, name=name, source=info["path"], **options)
    if "id" in info:
        ds.meta["openml_id"] = info["id"]
    return ds
