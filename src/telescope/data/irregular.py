"""Test sets of increasing irregularity, for the trees-vs-nets study (paper Fig. 5 / 14).

The paper asks how neural networks and gradient-boosted trees degrade as test inputs become
*irregular*, i.e. unlike the training inputs. Following it, irregularity is measured along the
first principal component of the inputs: the examples most extreme along it are the irregular
ones, and test sets are built in which a given fraction of the points are those most irregular
examples. :func:`irregularity_split` implements this; its docstring gives the exact procedure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from telescope.data import Dataset
from telescope.data import _util as U
from telescope.errors import UsageError

__all__ = ["IrregularitySplit", "irregularity_split", "first_pc_scores"]


def first_pc_scores(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projections of the rows of ``x`` on its first principal component.

    Returns ``(scores, direction, center)``: ``center`` is the column mean, ``direction`` the
    unit first right-singular vector of ``x - center`` (sign fixed so that its largest-magnitude
    entry is positive), ``scores = (x - center) @ direction``.
    """
    x = np.asarray(x, dtype=np.float64)
    center = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - center, full_matrices=False)
    direction = vt[0]
    if direction[np.argmax(np.abs(direction))] < 0:
        direction = -direction
    return (x - center) @ direction, direction, center


@dataclass
class IrregularitySplit:
    """One training set and one test set per irregularity fraction.

    Attributes
    ----------
    x_train, y_train : Tensor
        The shared training set.
    fractions : tuple of float
        The requested fractions, in the order given.
    tests : list of (Tensor, Tensor)
        ``tests[i] = (x_test, y_test)`` for ``fractions[i]``.
    train_idx : Tensor
        Rows of the input pool in the training set.
    test_idx : list of Tensor
        Rows of each test set: its irregular points first (most irregular first), then its
        regular ones.
    irregular_idx : Tensor
        The reserved irregular rows, most irregular first.
    n_irregular : list of int
        Number of irregular points in each test set, ``round(fraction * n_test)``.
    score : Tensor
        Irregularity of every row of the pool: ``|projection on the first PC|`` (float64).
    direction, center : Tensor
        The first principal direction and the mean of the pool's inputs (float64).
    """

    x_train: Tensor
    y_train: Tensor
    fractions: tuple[float, ...]
    tests: list[tuple[Tensor, Tensor]]
    train_idx: Tensor
    test_idx: list[Tensor]
    irregular_idx: Tensor
    n_irregular: list[int]
    score: Tensor
    direction: Tensor
    center: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def dataset(self, i: int, *, n_classes: int | None = None, name: str = "irregular") -> Dataset:
        """The training set with test set ``i`` as a :class:`Dataset`."""
        x_te, y_te = self.tests[i]
        meta = dict(self.meta)
        meta.update(fraction=self.fractions[i], n_irregular=self.n_irregular[i],
                    train_idx=self.train_idx, test_idx=self.test_idx[i])
        return Dataset(x_train=self.x_train, y_train=self.y_train, x_test=x_te, y_test=y_te,
                       n_classes=n_classes, name=f"{name}(p={self.fractions[i]:g})", meta=meta)


def irregularity_split(
    x: Tensor | np.ndarray | Dataset,
    y: Tensor | np.ndarray | None = None,
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    *,
    n_test: int | None = None,
    n_train: int | None = None,
    seed: int = 0,
) -> IrregularitySplit:
    """Split a pool of examples into one training set and test sets of increasing irregularity.

    Procedure, for a pool of ``N`` examples (rows of ``x``; a :class:`Dataset` passed as ``x``
    contributes its training then its test examples, and its labels):

    1. Irregularity. Center the inputs at their mean ``c`` and take the first principal
       direction ``v`` (first right-singular vector of ``x - c``, computed with
       ``np.linalg.svd`` in float64). Each example's irregularity is its distance from the
       center along that direction, ``r_i = |(x_i - c) . v|``. The direction is computed from
       the whole pool that the training and test sets are drawn from; labels are not used.
       Pass standardized features (the table loaders standardize) so that no column dominates
       the principal component by its units alone.
    2. Irregular reserve. With ``m(f) = round(f * n_test)`` irregular points in the test set of
       fraction ``f`` (halves round up) and ``k = max_f m(f)``, the ``k`` examples of largest
       ``r`` (ties broken by lower row index) are reserved, ordered most irregular first. They
       never enter the training set, so at ``f > 0`` test points lie beyond the training data
       along the principal component.
    3. Regular pool. The remaining examples are put in a seeded random order; its first
       ``n_test`` examples are the regular test candidates, the rest (or their first
       ``n_train``) the training set, shared by all test sets.
    4. Test sets. The test set of fraction ``f`` holds the ``m(f)`` most irregular reserved
       examples followed by the first ``n_test - m(f)`` regular candidates: ``f = 0`` is an
       ordinary random test set, ``f = 1`` the ``n_test`` most irregular examples, and the
       irregular parts of the test sets are nested.

    Parameters
    ----------
    x : Tensor, ndarray or Dataset
        Inputs ``[N, d]`` (or ``[N, ...]``, flattened for the PCA).
    y : Tensor or ndarray
        Labels or targets ``[N, ...]`` (omit when ``x`` is a Dataset).
    fractions : sequence of float, default (0, 0.25, 0.5, 0.75, 1)
        Fractions of irregular points in the test sets, each in ``[0, 1]``.
    n_test : int, optional
        Size of every test set (default: 20 % of ``N``).
    n_train : int, optional
        Size of the training set (default: all examples not used for testing).
    seed : int, default 0
        Seed of the random order of the regular examples.
    """
    meta: dict[str, Any] = {"seed": seed}
    if isinstance(x, Dataset):
        if y is not None:
            raise UsageError("pass either a Dataset or x and y, not both")
        meta["source"] = x.name
        y = torch.cat([x.y_train, x.y_test])
        x = torch.cat([x.x_train, x.x_test])
    if y is None:
        raise UsageError("y is required: the labels or targets of the rows of x")
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y)
    if xt.ndim < 2:
        raise UsageError(f"x must be [N, d] (one row per example), got shape {tuple(xt.shape)}")
    n = xt.shape[0]
    if yt.shape[0] != n:
        raise UsageError(f"x has {n} rows but y has {yt.shape[0]}")
    fr = tuple(float(f) for f in fractions)
    if not fr or any(not 0.0 <= f <= 1.0 for f in fr):
        raise UsageError(f"fractions must be a non-empty sequence of numbers in [0, 1], got "
                         f"{fractions!r}")
    if n_test is None:
        n_test = max(1, int(round(0.2 * n)))
    n_test = U.check_int("n_test", n_test, 1)
    m = [int(math.floor(f * n_test + 0.5)) for f in fr]
    k = max(m)
    if n - k - n_test < 1:
        raise UsageError(f"{n} examples are too few for n_test={n_test} with {k} reserved "
                         "irregular examples: lower n_test or the largest fraction")
    n_avail = n - k - n_test
    if n_train is not None:
        n_train = U.check_int("n_train", n_train, 1)
        if n_train > n_avail:
            raise UsageError(f"n_train={n_train} is too many: {n} examples minus n_test="
                             f"{n_test} and {k} reserved irregular ones leave {n_avail}")
    else:
        n_train = n_avail

    xf = xt.reshape(n, -1).detach().cpu().numpy().astype(np.float64)
    scores, direction, center = first_pc_scores(xf)
    r = np.abs(scores)
    by_irregularity = np.lexsort((np.arange(n), -r))  # largest r first, ties by index
    reserve = by_irregularity[:k]
    rest = np.setdiff1d(np.arange(n), reserve)  # sorted
    rest = rest[U.rng(seed, U.IRREGULAR).permutation(rest.size)]
    regular, train = rest[:n_test], rest[n_test:n_test + n_train]

    def rows(idx: np.ndarray) -> Tensor:
        return torch.from_numpy(idx.astype(np.int64))

    train_t = rows(train)
    tests, test_idx = [], []
    for mi in m:
        idx = rows(np.concatenate([reserve[:mi], regular[:n_test - mi]]))
        test_idx.append(idx)
        tests.append((xt[idx], yt[idx]))
    meta.update(n_test=n_test, n_train=n_train)
    return IrregularitySplit(
        x_train=xt[train_t], y_train=yt[train_t], fractions=fr, tests=tests, train_idx=train_t,
        test_idx=test_idx, irregular_idx=rows(reserve), n_irregular=m,
        score=torch.from_numpy(r), direction=torch.from_numpy(direction),
        center=torch.from_numpy(center), meta=meta,
    )
