"""scikit-learn's bundled 8x8 handwritten digits: a stand-in for the paper's 8x8 MNIST.

The paper (Jeffares et al.) downsamples MNIST to 8x8 pixels for several experiments. scikit-learn
ships a real 8x8 digit set (1797 images from the UCI "optical recognition of handwritten digits"
data, 16 grey levels) with the package, so it needs no download and no path. For MNIST itself,
downsampled the paper's way, see :func:`telescope.data.load_mnist_idx` with ``size=8``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from telescope.data import Dataset
from telescope.data import _util as U

__all__ = ["load_digits"]

_N_CLASSES = 10
_MAX_PIXEL = 16.0


def load_digits(
    n_train: int | None = None,
    n_test: int | None = None,
    *,
    classes: Sequence[int] | None = None,
    seed: int = 0,
    standardize: bool = True,
    stratify: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """The bundled 8x8 digits as a :class:`Dataset` of flattened 64-pixel inputs.

    Split: a seeded random order of the (selected) images, stratified by class by default (every
    prefix of the order holds each class in proportion, up to one image); the first ``n_test``
    images are the test set and the next ``n_train`` the training set. So the test set does not
    change with ``n_train``, and the training sets of one seed are nested.

    Parameters
    ----------
    n_train, n_test : int or None
        Split sizes. Both ``None``: 20 % test, the rest training. One ``None``: all the images
        the other leaves. Too many for the selected classes is a ``ValueError`` giving the count.
    classes : sequence of int, optional
        Digits to keep, e.g. ``(3, 5)``; relabeled by position (``classes[i]`` becomes ``i``).
    seed : int, default 0
        Seed of the split.
    standardize : bool, default True
        Standardize each pixel with the training mean and population standard deviation
        (constant pixels keep scale 1); the statistics are kept in ``x_mean`` / ``x_std``. When
        ``False``, pixels are scaled to ``[0, 1]`` (divided by 16).
    stratify : bool, default True
        Stratify the split by class (else a plain random split).
    dtype : torch.dtype, default torch.float32
        Floating dtype of the inputs; labels are ``int64``.

    Returns
    -------
    Dataset
        ``x_*``: ``[N, 64]`` (row-major 8x8 images), ``y_*``: ``[N]`` in ``0..k-1``,
        ``n_classes = k``; ``meta["train_idx"]`` / ``["test_idx"]`` index the bundled array.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    dtype = U.check_dtype(dtype)
    cls = U.check_classes(classes, _N_CLASSES)
    x_all, y_all = _sk_load_digits(return_X_y=True)
    keep, y = U.relabel(np.asarray(y_all, dtype=np.int64), cls)
    x = np.asarray(x_all, dtype=np.float64)[keep]
    what = "the bundled digits" + ("" if classes is None else f" of classes {cls}")
    n_tr, n_te = U.split_sizes(len(keep), n_train, n_test, what)
    perm = U.order(y, len(keep), seed, U.SPLIT, stratify)
    te, tr = perm[:n_te], perm[n_te:n_te + n_tr]
    if standardize:
        x_tr, x_te, mean, std = U.standardize(x[tr], x[te])
    else:
        x_tr, x_te, mean, std = x[tr] / _MAX_PIXEL, x[te] / _MAX_PIXEL, None, None
    name = "digits" if classes is None else f"digits[{','.join(map(str, cls))}]"
    return Dataset(
        x_train=U.tensor(x_tr, dtype),
        y_train=U.labels_tensor(y[tr]),
        x_test=U.tensor(x_te, dtype),
        y_test=U.labels_tensor(y[te]),
        n_classes=len(cls),
        name=name,
        x_mean=None if mean is None else U.tensor(mean, dtype),
        x_std=None if std is None else U.tensor(std, dtype),
        meta={"seed": seed, "classes": cls, "source": "sklearn.datasets.load_digits",
              "train_idx": torch.from_numpy(keep[tr]), "test_idx": torch.from_numpy(keep[te]),
              "image_shape": (8, 8)},
    )
