"""Data sets by name, for study configs and the command line (``--set data.path=...``).

:func:`load_dataset` maps a name to a loader and checks that a path is given exactly when the
loader reads files, so a study can hold ``name``, ``path`` and keyword options in its config.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from telescope.data import Dataset
from telescope.errors import UsageError

__all__ = ["DATASETS", "load_dataset"]


def _registry() -> dict[str, tuple[Callable[..., Dataset], bool, str]]:
    from telescope.data import digits, images, mnist1d, openml, synthetic, tables

    return {
        "mnist1d": (mnist1d.load_mnist1d, False, "MNIST-1D, generated offline"),
        "digits": (digits.load_digits, False, "scikit-learn's bundled 8x8 digits"),
        "mnist": (images.load_mnist_idx, True, "MNIST IDX files in a directory"),
        "cifar10": (images.load_cifar10, True, "CIFAR-10 python batches (cats vs dogs, 8x8)"),
        "table": (tables.load_table, True, "a CSV or Parquet table"),
        "openml": (openml.load_openml_cache, True, "a data set in an OpenML cache directory"),
        "bundled-table": (tables.load_bundled_table, False, "a table bundled with scikit-learn"),
        "teacher": (synthetic.teacher_regression, False, "random-features ReLU teacher"),
        "polynomial": (synthetic.polynomial_task, False, "Kumar et al.'s polynomial task"),
        "modular": (synthetic.modular_arithmetic, False, "modular arithmetic pairs"),
        "mnist1d-patches": (synthetic.mnist1d_patches, False, "MNIST-1D as a patch sequence"),
        "sequence": (synthetic.sequence_task, False, "a sequence task by kind"),
    }


DATASETS: tuple[str, ...] = (
    "mnist1d", "digits", "mnist", "cifar10", "table", "openml", "bundled-table", "teacher",
    "polynomial", "modular", "mnist1d-patches", "sequence",
)


def describe() -> dict[str, str]:
    """One line per data set name."""
    return {name: desc for name, (_, _, desc) in _registry().items()}


def load_dataset(name: str, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Dataset:
    """Load the data set called ``name`` (one of :data:`DATASETS`).

    File-backed data sets (``mnist``, ``cifar10``, ``table``, ``openml``) need ``path``; the others
    must not get one. Keyword arguments go to the loader, e.g.
    ``load_dataset("cifar10", "/data/cifar-10-batches-py", n_train=1000)`` or
    ``load_dataset("table", "houses.csv", target="price")``.
    """
    reg = _registry()
    if name not in reg:
        raise UsageError(f"unknown data set {name!r}; choose one of {list(reg)}")
    loader, needs_path, desc = reg[name]
    if needs_path:
        if path is None or str(path) == "":
            raise UsageError(f"data set {name!r} ({desc}) reads files: give their location with "
                             "path=... (on the command line: --set data.path=...)")
        return loader(path, **kwargs)
    if path is not None and str(path) != "":
        raise UsageError(f"data set {name!r} ({desc}) does not read files; drop path={path!r}")
    return loader(**kwargs)
