"""Data sets for telescope's studies and tests.

Every loader returns a :class:`Dataset`: train and test tensors, the number of classes (``None``
for regression) and a name. Inputs are floating point in the requested dtype; class labels are
``int64`` tensors of shape ``[N]``; regression targets are floating ``[N, O]`` tensors. Use
:func:`one_hot` (or :meth:`Dataset.one_hot`) to regress on class labels with the MSE loss.

Bundled or generated (no files needed):

- :func:`load_mnist1d` -- MNIST-1D (Greydanus & Kobak 2020), generated offline and cached.
- :func:`load_digits` -- scikit-learn's bundled 8x8 digits (a stand-in for the paper's 8x8 MNIST).
- :func:`load_bundled_table` -- small tables bundled with scikit-learn (diabetes, ...).
- :func:`teacher_regression` -- Gaussian inputs, targets from a random-features ReLU teacher.
- :func:`polynomial_task` -- Kumar et al.'s polynomial task of the grokking experiment.
- :func:`sinusoid_tasks` -- a family of sinusoid regression tasks with task embeddings.
- :func:`modular_arithmetic` -- ``a op b mod p`` pairs for grokking transformers.
- :func:`mnist1d_patches`, :func:`sequence_task` -- sequence tasks for transformers.
- :func:`random_tokens` -- integer token batches for sequence models.

Read from files the user provides (nothing is ever downloaded):

- :func:`load_mnist_idx` -- MNIST IDX files (optionally downsampled to 8x8 like the paper).
- :func:`load_cifar10` -- CIFAR-10 python batches (default: cats vs dogs, grayscale, 8x8).
- :func:`load_table` -- CSV / Parquet tables; :func:`load_openml_cache` -- OpenML cache
  directories as ``fetch_openml(data_home=...)`` leaves them (the Grinsztajn et al. benchmark).
- :func:`read_idx`, :func:`read_arff` -- the file-format parsers.

Transformations: :func:`binary_subset` (e.g. 3 vs 5, optional +/-1 targets),
:func:`add_label_noise`, :func:`subsample`, :func:`irregularity_split` (test sets of increasing
irregularity along the first principal component). :func:`load_dataset` picks a loader by name.

Missing files raise :class:`MissingDataError` (both ``FileNotFoundError`` and ``ValueError``);
malformed files, missing columns, wrong shapes and unknown classes raise ``ValueError`` saying
what is wrong and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from telescope.errors import UsageError

__all__ = [
    "Dataset",
    "one_hot",
    "MissingDataError",
    # generated / bundled
    "load_mnist1d",
    "load_digits",
    "load_bundled_table",
    "teacher_regression",
    "random_tokens",
    "polynomial_task",
    "polynomial_activation",
    "sinusoid_tasks",
    "modular_arithmetic",
    "mnist1d_patches",
    "sequence_task",
    "SEQUENCE_TASKS",
    # files
    "read_idx",
    "area_downsample",
    "load_mnist_idx",
    "load_cifar10",
    "CIFAR10_CLASSES",
    "table_dataset",
    "load_table",
    "read_arff",
    "load_openml_cache",
    # transformations
    "binary_subset",
    "add_label_noise",
    "subsample",
    "IrregularitySplit",
    "irregularity_split",
    "first_pc_scores",
    "low_rank_data",
    "singular_value_profile",
    # by name
    "DATASETS",
    "load_dataset",
]


def one_hot(y: Tensor, n_classes: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot regression targets ``[N, n_classes]`` from integer labels ``y`` of shape ``[N]``.

    Parameters
    ----------
    y : Tensor
        Integer class labels in ``[0, n_classes)``.
    n_classes : int
        Number of classes (columns of the result).
    dtype : torch.dtype, default torch.float32
        Floating dtype of the result.

    Returns
    -------
    Tensor
        ``[N, n_classes]`` with ``1`` at ``(i, y[i])`` and ``0`` elsewhere.
    """
    if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.ndim != 1:
        raise UsageError(f"y must be a 1-d integer tensor of labels, got {y!r:.80}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise UsageError(f"n_classes must be a positive int, got {n_classes!r}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise UsageError(
            f"labels must lie in [0, {n_classes}), got range [{int(y.min())}, {int(y.max())}]"
        )
    return torch.nn.functional.one_hot(y.long(), n_classes).to(dtype)


@dataclass
class Dataset:
    """A train/test split held in memory.

    Attributes
    ----------
    x_train, x_test : Tensor
        Inputs ``[N, ...]`` (floating point; token data sets hold integers).
    y_train, y_test : Tensor
        ``int64`` labels ``[N]`` for classification, floating targets ``[N, O]`` for regression.
    n_classes : int or None
        Number of classes; ``None`` for a regression data set.
    name : str
        Short description, e.g. ``"mnist1d"`` or ``"mnist1d[3,5]"``.
    x_mean, x_std : Tensor or None
        Per-feature statistics the inputs were standardized with (``x = (raw - mean) / std``),
        when the loader standardizes.
    meta : dict
        Loader-specific details (seed, sizes, where the data came from).
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int | None
    name: str
    x_mean: Tensor | None = None
    x_std: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.x_train.shape[1:])

    def one_hot(self, targets: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """One-hot regression targets ``[N, n_classes]`` for labels of this data set.

        ``dtype`` defaults to the dtype of the inputs (float32 unless they are not floating).
        """
        if self.n_classes is None:
            raise UsageError(f"{self.name} is a regression data set: it has no classes")
        if dtype is None:
            dtype = self.x_train.dtype if self.x_train.is_floating_point() else torch.float32
        return one_hot(targets, self.n_classes, dtype=dtype)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Dataset:
        """A copy on ``device`` with floating tensors cast to ``dtype`` (integer ones kept)."""

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return replace(
            self,
            x_train=move(self.x_train), y_train=move(self.y_train),
            x_test=move(self.x_test), y_test=move(self.y_test),
            x_mean=move(self.x_mean), x_std=move(self.x_std), meta=dict(self.meta),
        )


# The loaders import Dataset from this module, so they are imported after it is defined.
from telescope.data._util import MissingDataError  # noqa: E402
from telescope.data.arff import read_arff  # noqa: E402
from telescope.data.digits import load_digits  # noqa: E402
from telescope.data.images import (  # noqa: E402
    CIFAR10_CLASSES,
    area_downsample,
    load_cifar10,
    load_mnist_idx,
    read_idx,
)
from telescope.data.irregular import (  # noqa: E402
    IrregularitySplit,
    first_pc_scores,
    irregularity_split,
)
from telescope.data.low_rank import low_rank_data, singular_value_profile  # noqa: E402
from telescope.data.mnist1d import load_mnist1d  # noqa: E402
from telescope.data.openml import load_openml_cache  # noqa: E402
from telescope.data.registry import DATASETS, load_dataset  # noqa: E402
from telescope.data.synthetic import (  # noqa: E402
    SEQUENCE_TASKS,
    mnist1d_patches,
    modular_arithmetic,
    polynomial_activation,
    polynomial_task,
    random_tokens,
    sequence_task,
    sinusoid_tasks,
    teacher_regression,
)
from telescope.data.tables import load_bundled_table, load_table, table_dataset  # noqa: E402
from telescope.data.transforms import add_label_noise, binary_subset, subsample  # noqa: E402
