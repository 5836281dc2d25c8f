"""Tabular data: CSV / Parquet files, OpenML cache directories, scikit-learn's bundled tables.

Every table becomes a :class:`Dataset` the same way (:func:`table_dataset`):

- the target column is chosen by name; the feature columns are all others unless ``features``
  lists them;
- numeric (and boolean) feature columns are standardized with the training mean and population
  standard deviation (constant columns keep scale 1);
- categorical columns (pandas ``object`` / ``string`` / ``category`` dtypes, ARFF nominal and
  string attributes, and any column named in ``categorical=``) are one-hot encoded, one 0/1
  column per category, named ``"column=value"``; the categories are those declared (ARFF nominal,
  pandas ``Categorical``) or else the sorted distinct values of the whole column. One-hot columns
  are not rescaled (their ``x_mean`` is 0 and ``x_std`` 1). Feature order follows the columns;
  ``meta["feature_names"]`` names every input column;
- rows with a missing value in a used column are dropped (``missing="drop"``, the count is in
  ``meta["n_dropped"]``) or rejected (``missing="error"``);
- regression targets become ``[N, 1]`` floats, standardized with the training statistics by
  default (``meta["y_mean"]``, ``meta["y_std"]`` undo it); classification targets become ``int64``
  class indices over the sorted distinct values (declared order for categoricals), whose names are
  in ``meta["class_names"]``;
- the split is a seeded random order of the rows (stratified by class for classification); the
  first ``n_test`` rows are the test set, the next ``n_train`` the training set.

The tabular benchmark of Grinsztajn, Oyallon & Varoquaux (2022, "Why do tree-based models still
outperform deep learning on tabular data?"), used by the paper's trees-vs-nets experiment, is
published on OpenML (e.g. ``houses``, ``california``, ``house_16H``, ``elevators``, ...).
Fetch a set once on a machine with internet, e.g.
``sklearn.datasets.fetch_openml("houses", data_home=DIR)``, then read it offline with
``load_openml_cache(DIR, "houses")`` (or by its numeric id); or export it to CSV / Parquet and
use :func:`load_table`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch

from telescope.data import Dataset
from telescope.data import _util as U
from telescope.data._util import MissingDataError
from telescope.errors import UsageError

__all__ = ["table_dataset", "load_table", "load_bundled_table", "read_arff", "load_openml_cache"]

_TASKS = ("regression", "classification")


# ----------------------------------------------------------------------------- frame -> Dataset


def _is_categorical(col: pd.Series) -> bool:
    return not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col))


def _categories(col: pd.Series) -> list[Any]:
    if isinstance(col.dtype, pd.CategoricalDtype):
        return list(col.cat.categories)
    return sorted(col.dropna().unique().tolist(), key=lambda v: (str(type(v)), v))


def table_dataset(
    frame: pd.DataFrame,
    target: str,
    *,
    features: Sequence[str] | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    task: str = "regression",
    categorical: Sequence[str] = (),
    standardize: bool = True,
    standardize_target: bool = True,
    missing: str = "drop",
    max_categories: int = 100,
    dtype: torch.dtype = torch.float32,
    name: str = "table",
    source: str | None = None,
) -> Dataset:
    """A :class:`Dataset` from a pandas DataFrame (conventions in the module docstring).

    Parameters
    ----------
    frame : pandas.DataFrame
        One row per example.
    target : str
        Name of the target column.
    features : sequence of str, optional
        Feature columns (default: all but the target).
    n_train, n_test : int or None
        Split sizes; both ``None``: 20 % test and the rest training; one ``None``: the rest.
    seed : int, default 0
        Seed of the split.
    task : {"regression", "classification"}, default "regression"
        How to read the target.
    categorical : sequence of str, default ()
        Extra columns to one-hot encode even though they are numeric (e.g. integer codes).
    standardize : bool, default True
        Standardize numeric features with the training statistics.
    standardize_target : bool, default True
        Standardize a regression target with the training statistics.
    missing : {"drop", "error"}, default "drop"
        What to do with rows that have a missing value in a used column.
    max_categories : int, default 100
        A categorical column with more distinct values is an error (usually an identifier):
        exclude it with ``features=`` or raise the limit.
    dtype : torch.dtype, default torch.float32
        Floating dtype of the inputs and regression targets.
    name, source : str
        Name of the data set and where it came from (kept in ``meta["source"]``).
    """
    if not isinstance(frame, pd.DataFrame):
        raise UsageError(f"frame must be a pandas DataFrame, got {type(frame).__name__}")
    dtype = U.check_dtype(dtype)
    if task not in _TASKS:
        raise UsageError(f"task must be one of {_TASKS}, got {task!r}")
    if missing not in ("drop", "error"):
        raise UsageError(f"missing must be 'drop' or 'error', got {missing!r}")
    where = source or name
    columns = list(frame.columns)
    if target not in columns:
        raise UsageError(f"{where}: target column {target!r} not found; the columns are "
                         f"{columns}. Pass target= one of them")
    if features is None:
        features = [c for c in columns if c != target]
    else:
        if isinstance(features, str):
            features = [features]
        features = list(features)
        unknown = [f for f in features if f not in columns]
        if unknown:
            raise UsageError(f"{where}: feature column(s) {unknown} not found; the columns are "
                             f"{columns}")
        if target in features:
            raise UsageError(f"{where}: the target {target!r} is also listed as a feature")
    if not features:
        raise UsageError(f"{where}: no feature columns besides the target {target!r}")
    unknown = [c for c in categorical if c not in features]
    if unknown:
        raise UsageError(f"{where}: categorical column(s) {unknown} are not among the features "
                         f"{features}")

    used = frame[[*features, target]]
    bad = used.isna()
    n_dropped = int(bad.any(axis=1).sum())
    if n_dropped and missing == "error":
        counts = {c: int(v) for c, v in bad.sum().items() if v}
        raise UsageError(f"{where}: missing values in columns {counts}; clean the table or pass "
                         "missing='drop' to drop those rows")
    rows = np.flatnonzero(~bad.any(axis=1).to_numpy())
    used = used.iloc[rows]
    n = len(used)
    if n < 2:
        raise UsageError(f"{where}: {n} complete rows; need at least 2 to split")

    y_col = used[target]
    meta: dict[str, Any] = {"seed": seed, "target": target, "task": task, "n_dropped": n_dropped,
                            "source": source or name}
    if task == "regression":
        if _is_categorical(y_col):
            example = y_col.iloc[0]
            raise UsageError(f"{where}: target column {target!r} is not numeric (dtype "
                             f"{y_col.dtype}, e.g. {example!r}); use task='classification'")
        y = y_col.to_numpy(dtype=np.float64)
        labels = None
    else:
        classes = _categories(y_col)
        present = set(y_col.unique().tolist())
        classes = [c for c in classes if c in present]
        lookup = {c: i for i, c in enumerate(classes)}
        labels = np.array([lookup[v] for v in y_col.tolist()], dtype=np.int64)
        meta["class_names"] = classes
        if len(classes) < 2:
            raise UsageError(f"{where}: target {target!r} has {len(classes)} class; need 2+")

    n_tr, n_te = U.split_sizes(n, n_train, n_test, f"{where} ({n} complete rows)")
    perm = U.order(labels, n, seed, U.SPLIT, task == "classification")
    te, tr = perm[:n_te], perm[n_te:n_te + n_tr]

    blocks, names, scaled, cat_cols = [], [], [], []
    for col in features:
        series = used[col]
        if col in categorical or _is_categorical(series):
            cats = _categories(series)
            if len(cats) > max_categories:
                raise UsageError(
                    f"{where}: categorical column {col!r} has {len(cats)} distinct values "
                    f"(max_categories={max_categories}); it looks like an identifier: exclude it "
                    "with features=[...] or raise max_categories"
                )
            values = series.to_numpy()
            blocks.append(np.stack([values == c for c in cats], axis=1).astype(np.float64)
                          if cats else np.zeros((n, 0)))
            names += [f"{col}={c}" for c in cats]
            scaled += [False] * len(cats)
            cat_cols.append(col)
        else:
            blocks.append(series.to_numpy(dtype=np.float64)[:, None])
            names.append(str(col))
            scaled.append(True)
    x = np.concatenate(blocks, axis=1)
    scaled = np.array(scaled)
    mean = np.zeros(x.shape[1])
    std = np.ones(x.shape[1])
    if standardize and scaled.any():
        _, _, m, s = U.standardize(x[tr][:, scaled], x[te][:, scaled])
        mean[scaled], std[scaled] = m, s
    x = (x - mean) / std

    def tensor(a: np.ndarray) -> torch.Tensor:
        return U.tensor(a, dtype)

    if task == "regression":
        y_mean, y_std = 0.0, 1.0
        if standardize_target:
            y_mean = float(y[tr].mean())
            y_std = float(y[tr].std())
            y_std = y_std if y_std > 1e-12 else 1.0
        y = (y - y_mean) / y_std
        y_train, y_test = tensor(y[tr][:, None]), tensor(y[te][:, None])
        meta.update(y_mean=y_mean, y_std=y_std)
        n_classes = None
    else:
        y_train, y_test = U.labels_tensor(labels[tr]), U.labels_tensor(labels[te])
        n_classes = len(meta["class_names"])
    meta.update(feature_names=names, categorical=cat_cols,
                train_idx=torch.from_numpy(rows[tr]), test_idx=torch.from_numpy(rows[te]))
    return Dataset(
        x_train=tensor(x[tr]), y_train=y_train, x_test=tensor(x[te]), y_test=y_test,
        n_classes=n_classes, name=name, x_mean=tensor(mean), x_std=tensor(std), meta=meta,
    )


# ------------------------------------------------------------------------------- CSV / Parquet


def _table_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zip", ".zst"):
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    formats = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
    if last not in formats:
        raise UsageError(f"{path}: unknown table format {last or '(no suffix)'!r}; use a .csv, "
                         ".tsv (optionally compressed, e.g. .csv.gz) or .parquet file")
    return formats[last]


def _read_frame(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise MissingDataError(f"table file {path} does not exist (or is not a file); pass the "
                               "path of a .csv or .parquet file")
    fmt = _table_format(path)
    try:
        if fmt == "parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, sep="\t" if fmt == "tsv" else ",")
    except Exception as err:
        raise UsageError(f"could not read {path} as {fmt.upper()}: {err}. Check that the file "
                         f"is a complete {fmt.upper()} table with a header row") from err
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise UsageError(f"{path}: the table is empty ({frame.shape[0]} rows, {frame.shape[1]} "
                         "columns)")
    return frame


def load_table(
    path: str | os.PathLike[str],
    target: str,
    *,
    features: Sequence[str] | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    task: str = "regression",
    **options: Any,
) -> Dataset:
    """A CSV (``.csv``, ``.tsv``, optionally compressed) or Parquet (``.parquet``, ``.pq``) table.

    The format is chosen by the file's suffix and the file read with pandas; the conversion
    follows the module docstring (numeric features standardized, categorical ones one-hot,
    target by name). ``options`` are passed to :func:`table_dataset` (``categorical``,
    ``standardize``, ``standardize_target``, ``missing``, ``max_categories``, ``dtype``).
    A missing file raises :class:`MissingDataError`; an unreadable one, a missing column or a
    non-numeric regression target raise ``ValueError`` naming the problem.
    """
    p = U.as_path(path, "load_table")
    frame = _read_frame(p)
    return table_dataset(frame, target, features=features, n_train=n_train, n_test=n_test,
                         seed=seed, task=task, name=p.name.split(".")[0], source=str(p),
                         **options)


_BUNDLED = {"diabetes": "regression", "wine": "classification",
            "breast_cancer": "classification", "iris": "classification"}


def load_bundled_table(
    name: str = "diabetes",
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    **options: Any,
) -> Dataset:
    """A small table bundled with scikit-learn (no download): ``"diabetes"`` (regression, 442 rows,
    10 features) or ``"wine"``, ``"breast_cancer"``, ``"iris"`` (classification).

    Converted by :func:`table_dataset` with target column ``"target"``; ``options`` go there too.
    """
    if name not in _BUNDLED:
        raise UsageError(f"unknown bundled table {name!r}; choose one of {sorted(_BUNDLED)}")
    import sklearn.datasets

    frame = getattr(sklearn.datasets, f"load_{name}")(as_frame=True).frame
    options.setdefault("task", _BUNDLED[name])
    return table_dataset(frame, "target", n_train=n_train, n_test=n_test, seed=seed, name=name,
                         source=f"sklearn.datasets.load_{name}", **options)


# ------------------------------------------------------------------------------------- ARFF

_RELATION = re.compile(r"^\s*@relation\s+(.*?)\s*$", re.IGNORECASE | re.MULTILINE)


def read_arff(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A dense ARFF file (plain or gzipped) as a DataFrame, read by :func:`scipy.io.arff.loadarff`.

    scipy reads ``numeric`` / ``real`` / ``integer`` attributes (float64 columns), nominal
    ``{a, b, ...}`` ones (here pandas ``Categorical`` columns with the declared categories, values
    decoded to ``str``) and ``date`` ones (``datetime64``); ``?`` is a missing value (NaN).
    ``string`` attributes and sparse rows (``{...}``) are not supported by scipy: convert such a
    file to CSV and use :func:`load_table`. A file scipy cannot read raises ``ValueError`` with
    scipy's reason.

    Returns
    -------
    frame : pandas.DataFrame
        One column per attribute, in file order.
    info : dict
        ``{"relation": str, "attributes": [(name, "numeric" | "date" | [categories])]}``.
    """
    from scipy.io import arff

    p = U.as_path(path, "read_arff")
    if not p.is_file():
        raise MissingDataError(f"ARFF file {p} does not exist")
    try:
        text = U.read_bytes(p).decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{p} is not a UTF-8 text (ARFF) file: {err}") from err
    hints = {StopIteration: "no @attribute lines or no @data section: the file is truncated or "
                            "not ARFF",
             IndexError: "a @data row has fewer values than there are attributes"}
    try:
        data, meta = arff.loadarff(io.StringIO(text))
    except (ValueError, IndexError, StopIteration, NotImplementedError, arff.ArffError) as err:
        why = hints.get(type(err)) or f"{type(err).__name__}: {err}"
        raise UsageError(f"could not read {p} as ARFF ({why}). scipy.io.arff reads dense ARFF "
                         "with numeric, nominal and date attributes; convert other files to CSV "
                         "and use load_table") from err
    frame, attributes = {}, []
    for name in meta.names():
        kind, values = meta[name]
        column = data[name]
        if kind == "nominal":
            strings = [None if v == b"?" else v.decode("utf-8") for v in column.tolist()]
            frame[name] = pd.Categorical(strings, categories=list(values))
            attributes.append((name, list(values)))
        else:
            frame[name] = column
            attributes.append((name, kind))
    match = _RELATION.search(text)
    relation = match.group(1).strip("'\"") if match else meta.name
    return pd.DataFrame(frame), {"relation": relation, "attributes": attributes}


# ------------------------------------------------------------------------------ OpenML cache


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
