"""Transformations of a :class:`Dataset`: binary subsets, label noise and subsampling.

Each returns a new :class:`Dataset` (the input is not modified) and records what it did in
``meta``. Index bookkeeping in ``meta`` is carried through: ``train_idx`` / ``test_idx`` (positions
in the loader's source array), ``y_train_clean`` and ``noisy_indices`` (from
:func:`add_label_noise`) are subset along with the examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from telescope.data import Dataset
from telescope.data import _util as U
from telescope.errors import UsageError

__all__ = ["binary_subset", "add_label_noise", "subsample"]


def _is_classification(ds: Dataset) -> bool:
    return ds.n_classes is not None and not ds.y_train.is_floating_point()


def _is_pm1(y: Tensor) -> bool:
    return bool(y.is_floating_point() and y.numel() and ((y == 1) | (y == -1)).all())


def _subset_meta(meta: dict[str, Any], n_train: int, tr: Tensor, te: Tensor) -> dict[str, Any]:
    """``meta`` with its per-example entries restricted to training rows ``tr``, test rows ``te``
    (of a training set of ``n_train`` examples)."""
    out = dict(meta)
    for key, rows in (("train_idx", tr), ("test_idx", te), ("y_train_clean", tr)):
        if isinstance(out.get(key), Tensor):
            out[key] = out[key][rows]
    if isinstance(out.get("noisy_indices"), Tensor):
        noisy = torch.zeros(n_train, dtype=torch.bool)
        noisy[out["noisy_indices"]] = True
        out["noisy_indices"] = torch.nonzero(noisy[tr]).flatten()
    return out


def _pair(ds: Dataset, classes: Sequence[int]) -> tuple[int, int]:
    if not _is_classification(ds):
        raise UsageError(
            f"binary_subset needs a classification data set with int64 labels; {ds.name} has "
            f"{'regression targets' if ds.n_classes is None else 'floating labels'}"
        )
    pair = U.check_classes(classes, ds.n_classes)
    if len(pair) != 2:
        raise UsageError(f"binary_subset takes exactly 2 classes, e.g. (3, 5), got {classes!r}")
    return pair


def binary_subset(
    ds: Dataset, classes: Sequence[int] = (3, 5), *, targets: str = "index"
) -> Dataset:
    """The examples of two classes of ``ds``, relabeled.

    Parameters
    ----------
    ds : Dataset
        A classification data set. The classes are given as ``ds``'s own labels: if the loader
        already selected and relabeled classes, label ``i`` stands for ``ds.meta["classes"][i]``.
        (Loaders that take ``classes=`` also standardize on the selected classes only; this
        function keeps ``ds``'s standardization.)
    classes : pair of int, default (3, 5)
        The two classes; ``classes[0]`` becomes label 0 (target ``+1``), ``classes[1]`` label 1
        (target ``-1``).
    targets : {"index", "pm1"}, default "index"
        ``"index"``: ``int64`` labels 0/1 and ``n_classes = 2``. ``"pm1"``: floating targets
        ``[N, 1]`` equal to ``+1`` for ``classes[0]`` and ``-1`` for ``classes[1]``, for
        squared-loss studies with one output; ``n_classes = None`` (a regression data set) and
        ``meta["targets"] = "pm1"``. Accuracy is then ``sign(f(x)) == y``.
    """
    a, b = _pair(ds, classes)
    if targets not in ("index", "pm1"):
        raise UsageError(f"targets must be 'index' or 'pm1', got {targets!r}")
    tr = torch.nonzero((ds.y_train == a) | (ds.y_train == b)).flatten()
    te = torch.nonzero((ds.y_test == a) | (ds.y_test == b)).flatten()

    def new(y: Tensor) -> Tensor:
        label = (y == b).long()
        if targets == "index":
            return label
        dtype = ds.x_train.dtype if ds.x_train.is_floating_point() else torch.float32
        return (1.0 - 2.0 * label.to(dtype)).unsqueeze(1)

    meta = _subset_meta(ds.meta, ds.n_train, tr, te)
    if isinstance(meta.get("y_train_clean"), Tensor):
        meta["y_train_clean"] = new(meta["y_train_clean"])
    source = ds.meta.get("classes")
    if isinstance(source, (tuple, list)) and len(source) == ds.n_classes:
        meta["classes"] = (source[a], source[b])
    else:
        meta["classes"] = (a, b)
    meta["targets"] = targets
    return replace(
        ds,
        x_train=ds.x_train[tr], y_train=new(ds.y_train[tr]),
        x_test=ds.x_test[te], y_test=new(ds.y_test[te]),
        n_classes=2 if targets == "index" else None,
        name=f"{ds.name}[{a}v{b}{',pm1' if targets == 'pm1' else ''}]",
        meta=meta,
    )


def add_label_noise(ds: Dataset, fraction: float, *, seed: int = 0) -> Dataset:
    """Corrupt the labels of a fraction of the training examples (test labels stay clean).

    Exactly ``round(fraction * n_train)`` training examples, drawn without replacement by a
    generator seeded with ``seed``, are corrupted:

    - classification (``int64`` labels): the label becomes a uniformly random *different* class;
    - ``+/-1`` targets (see :func:`binary_subset`): the sign is flipped;
    - other regression targets: the target is replaced by that of another training example drawn
      at random (a shuffled-label corruption, which keeps the marginal distribution of targets).

    ``meta`` records ``label_noise`` (the fraction), ``noisy_indices`` (sorted ``int64`` positions
    in the training set) and ``y_train_clean`` (the original training labels). Adding noise to a
    noisy data set is an error: add the total fraction once.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
        0.0 <= fraction <= 1.0
    ):
        raise UsageError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if "noisy_indices" in ds.meta:
        raise UsageError(
            f"{ds.name} already has label noise (fraction {ds.meta.get('label_noise')}); "
            "add the total fraction to the clean data set once"
        )
    n = ds.n_train
    m = int(math.floor(fraction * n + 0.5))
    gen = U.rng(seed, U.NOISE)
    idx = np.sort(gen.choice(n, size=m, replace=False)) if m else np.zeros(0, dtype=np.int64)
    idx_t = torch.from_numpy(idx.astype(np.int64))
    y = ds.y_train.clone()
    if _is_classification(ds):
        k = int(ds.n_classes)
        if k < 2:
            raise UsageError("label noise needs at least 2 classes")
        shift = torch.from_numpy(gen.integers(1, k, size=m).astype(np.int64))
        y[idx_t] = (y[idx_t] + shift) % k
    elif _is_pm1(y):
        y[idx_t] = -y[idx_t]
    else:
        if n < 2 and m:
            raise UsageError("shuffled-label noise needs at least 2 training examples")
        other = gen.integers(0, n - 1, size=m)
        other = other + (other >= idx)  # uniform over the other examples
        y[idx_t] = ds.y_train[torch.from_numpy(other.astype(np.int64))]
    meta = dict(ds.meta)
    meta.update(label_noise=float(fraction), label_noise_seed=seed, noisy_indices=idx_t,
                y_train_clean=ds.y_train.clone())
    return replace(ds, y_train=y, name=f"{ds.name}+noise{fraction:g}", meta=meta)


def subsample(
    ds: Dataset,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    *,
    stratify: bool = True,
) -> Dataset:
    """Seeded random subsets of the training and test sets (``None`` keeps a set whole).

    For classification the subsets are stratified by class (proportional up to one example) unless
    ``stratify=False``. The chosen examples keep their relative order, the standardization
    statistics of ``ds`` are kept, and subsets of one seed are nested (the ``n`` chosen for a
    smaller ``n`` are among those chosen for a larger one).
    """
    n_tr = U.take(ds.n_train, n_train, "n_train", ds.name + "'s training set")
    n_te = U.take(ds.n_test, n_test, "n_test", ds.name + "'s test set")
    cls = _is_classification(ds)

    def pick(y: Tensor, n: int, stream: int) -> Tensor:
        labels = y.numpy() if cls else None
        perm = U.order(labels, y.shape[0], seed, stream, stratify)
        return torch.from_numpy(np.sort(perm[:n]).astype(np.int64))

    tr = pick(ds.y_train, n_tr, U.SUBSAMPLE)
    te = pick(ds.y_test, n_te, U.SUBSAMPLE_TEST)
    meta = _subset_meta(ds.meta, ds.n_train, tr, te)
    meta["subsample"] = {"n_train": n_tr, "n_test": n_te, "seed": seed}
    return replace(
        ds,
        x_train=ds.x_train[tr], y_train=ds.y_train[tr],
        x_test=ds.x_test[te], y_test=ds.y_test[te], meta=meta,
    )
