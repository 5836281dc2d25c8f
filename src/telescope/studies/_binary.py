"""The binary classification task shared by ``double-descent`` and ``approximation``.

:class:`BinaryData` (a nested config: which data set, which two classes, how many points) and
:func:`load_binary_task` (the two classes as a :class:`~telescope.data.Dataset` with ``+1`` /
``-1`` targets, cached), with :func:`check_data` (a clear error for a file-backed data set
without ``data.path``) and :func:`device` (``"auto"`` picks CUDA when available), and
:func:`sign_error`, the error measure of such a task.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated

import torch
from annotated_types import Ge

from telescope.data import Dataset, binary_subset, load_dataset
from telescope.errors import UsageError
from telescope.studies.constraints import PositiveInt, config_dataclass

__all__ = ["FILE_DATASETS", "BinaryData", "load_binary_task", "check_data", "sign_error"]

FILE_DATASETS = ("mnist", "cifar10")
"""Data sets read from files the user provides (``data.path``)."""


@config_dataclass
class BinaryData:
    """A binary classification task with ``+1`` / ``-1`` targets, built from a named data set
    (:func:`telescope.data.load_dataset`) restricted to two classes."""

    name: str = "mnist1d"            # mnist1d | digits | mnist | cifar10
    path: str = ""                   # directory or archive, for mnist and cifar10
    classes: tuple[int, int] = (3, 5)  # the first becomes +1 (CIFAR-10: 3 cat, 5 dog)
    n_train: Annotated[int, Ge(2)] = 200
    n_test: PositiveInt = 300
    size: PositiveInt | None = None  # mnist / cifar10: downsample to size x size (None: the
                                     # loader's default); the bundled sets ignore it
    seed: int = 0                    # the train/test split

    def __post_init__(self) -> None:
        if self.name not in ("mnist1d", "digits", *FILE_DATASETS):
            raise UsageError(f"data.name must be one of mnist1d, digits, "
                             f"{', '.join(FILE_DATASETS)}; got {self.name!r}")
        if self.path and self.name not in FILE_DATASETS:
            raise UsageError(f"data.name={self.name} does not read files: drop data.path "
                             f"({self.path!r}), or use one of {', '.join(FILE_DATASETS)}")
        if len(self.classes) != 2 or self.classes[0] == self.classes[1]:
            raise UsageError(f"data.classes must be two different classes, got {self.classes}")


def load_binary_task(data: BinaryData, *, dtype: torch.dtype = torch.float32) -> Dataset:
    """The two classes of ``data`` as a data set with ``[N, 1]`` targets ``+1`` (first class)
    and ``-1`` (second class); inputs flattened and standardized by the loader."""
    key = tuple(getattr(data, f.name) for f in dataclasses.fields(data))
    return _load_binary_cached(key, str(dtype).removeprefix("torch."))


@functools.lru_cache(maxsize=4)
def _load_binary_cached(key: tuple, dtype_name: str) -> Dataset:
    data = BinaryData(*key)
    kwargs: dict = {"n_train": data.n_train, "n_test": data.n_test,
                    "classes": tuple(data.classes), "seed": data.seed,
                    "dtype": getattr(torch, dtype_name)}
    check_data(data)
    if data.name in FILE_DATASETS and data.size is not None:
        kwargs["size"] = data.size
    ds = load_dataset(data.name, data.path or None, **kwargs)
    # the loader relabeled data.classes to 0 and 1: 0 -> +1, 1 -> -1
    return binary_subset(ds, (0, 1), targets="pm1")


def check_data(data: BinaryData) -> None:
    """A clear error, before anything runs, when a file-backed data set has no ``data.path``."""
    if data.name in FILE_DATASETS and not data.path:
        raise UsageError(
            f"data set {data.name!r} is read from files: give their location with "
            f"--set data.path=DIR (or use a bundled data set: --set data.name=mnist1d)")


def sign_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The share of points where ``pred`` and the ``+1``/``-1`` ``target`` differ in sign."""
    return float(((pred.reshape(-1) > 0) != (target.reshape(-1) > 0)).double().mean())
