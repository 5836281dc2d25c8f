"""Shared helpers of the loaders: argument checks, seeded (stratified) splits, standardization.

Private to :mod:`telescope.data`; the loaders document the conventions these implement.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from telescope.errors import UsageError

__all__ = ["MissingDataError"]


class MissingDataError(UsageError, FileNotFoundError):
    """A data file or directory a loader needs does not exist.

    Both a :class:`FileNotFoundError` and a :class:`ValueError`, so callers can catch either;
    the message says what was looked for, where, and how to provide it.
    """


# Streams of the seeded generators (``np.random.default_rng([seed, stream])``), so the split, the
# label noise and subsampling of one seed are independent of each other.
SPLIT, NOISE, SUBSAMPLE, SUBSAMPLE_TEST, IRREGULAR = 101, 102, 103, 104, 105


def check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UsageError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value: object, low: int) -> int | None:
    return None if value is None else check_int(name, value, low)


def check_nonnegative(name: str, value: object) -> None:
    if not float(value) >= 0.0 or not np.isfinite(value):
        raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")


def check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UsageError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


def rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([check_int("seed", seed, 0), stream])


def as_path(path: object, what: str) -> Path:
    if path is None:
        raise UsageError(f"{what}: a path is required (set data.path=... on the command line)")
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"{what}: path must be a str or os.PathLike, got {path!r}")
    return Path(path).expanduser()


def read_bytes(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped when the file is gzip-compressed (by content, not name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise MissingDataError(f"{path} does not exist") from err
    except OSError as err:
        raise UsageError(f"could not read {path}: {err}") from err
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise UsageError(
                f"{path} is a corrupt or truncated gzip file ({err}); download it again or "
                "decompress it yourself and pass the uncompressed file"
            ) from err
    return raw


def check_classes(
    classes: Sequence[object] | None, n_classes: int, names: Sequence[str] | None = None
) -> tuple[int, ...]:
    """``classes`` (ints in ``0..n_classes-1`` or, with ``names``, class names) as indices."""
    if classes is None:
        return tuple(range(n_classes))
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise UsageError(f"classes must be a sequence of classes, e.g. (3, 5), got {classes!r}")
    out = []
    for c in classes:
        if isinstance(c, str) and names is not None:
            if c not in names:
                raise UsageError(f"unknown class {c!r}; the classes are {list(names)}")
            out.append(list(names).index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < n_classes:
            out.append(int(c))
        else:
            known = f"names {list(names)} or " if names is not None else ""
            raise UsageError(
                f"unknown class {c!r} in classes={tuple(classes)!r}: use {known}"
                f"ints in 0..{n_classes - 1}"
            )
    if len(out) < 2 or len(set(out)) != len(out):
        raise UsageError(f"classes must name at least 2 distinct classes, got {tuple(classes)!r}")
    return tuple(out)


def relabel(labels: np.ndarray, classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label is in ``classes`` and their labels relabeled by position in ``classes``."""
    keep = np.flatnonzero(np.isin(labels, classes))
    table = np.full(int(max(labels.max(initial=0), max(classes))) + 1, -1, dtype=np.int64)
    table[list(classes)] = np.arange(len(classes))
    return keep, table[labels[keep]]


def order(labels: np.ndarray | None, n: int, seed: int, stream: int, stratify: bool) -> np.ndarray:
    """A seeded random order of ``range(n)``; stratified by ``labels`` when asked.

    Stratified: the examples of each class get keys ``(j + u) / n_c`` (``j`` their rank in a random
    order of the class, ``u ~ U(0, 1)``, ``n_c`` the class size) and the order sorts the keys, so
    every prefix of the order holds each class in proportion to its size, up to one example.
    """
    gen = rng(seed, stream)
    if labels is None or not stratify:
        return gen.permutation(n)
    key = np.empty(n)
    jitter = gen.random(n)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[gen.permutation(idx.size)]
        key[idx] = (np.arange(idx.size) + jitter[idx]) / idx.size
    return np.argsort(key, kind="stable")


def split_sizes(
    n_avail: int, n_train: int | None, n_test: int | None, what: str, test_fraction: float = 0.2
) -> tuple[int, int]:
    """Sizes of a random train/test split of ``n_avail`` examples (``None``: the rest / 20 %)."""
    n_train = check_optional_int("n_train", n_train, 1)
    n_test = check_optional_int("n_test", n_test, 0)
    if n_train is None and n_test is None:
        n_test = int(round(test_fraction * n_avail))
    if n_test is None:
        n_test = n_avail - n_train
    if n_train is None:
        n_train = n_avail - n_test
    if n_train < 1 or n_test < 0 or n_train + n_test > n_avail:
        raise UsageError(
            f"{what} holds {n_avail} examples; n_train={n_train} plus n_test={n_test} do not "
            f"fit: ask for at most {n_avail} in total"
        )
    return n_train, n_test


def take(n_avail: int, n: int | None, name: str, what: str) -> int:
    n = check_optional_int(name, n, 1 if name == "n_train" else 0)
    if n is None:
        return n_avail
    if n > n_avail:
        raise UsageError(f"{what} holds {n_avail} examples; {name}={n} is too many")
    return n


def standardize(
    x_train: np.ndarray, x_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-feature standardization with the training mean and population std (constant: 1)."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return (x_train - mean) / std, (x_test - mean) / std, mean, std


def tensor(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def labels_tensor(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
