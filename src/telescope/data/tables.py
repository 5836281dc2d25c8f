"""Tables as data sets: a DataFrame, a CSV / Parquet file or a scikit-learn bundled table.

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

ARFF files are read by :func:`~telescope.data.arff.read_arff`, OpenML cache directories (the
Grinsztajn et al. tabular benchmark) by :func:`~telescope.data.openml.load_openml_cache`; both
convert their frame with :func:`table_dataset`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from telescope.data import Dataset
from telescope.data import _util as U
from telescope.data._util import MissingDataError
from telescope.errors import UsageError

__all__ = ["table_dataset", "load_table", "load_bundled_table"]

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
