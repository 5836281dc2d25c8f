"""Gradient-boosted regression trees as a linear smoother of the training labels.

Derivation (squared error, scikit-learn's :class:`~sklearn.ensemble.GradientBoostingRegressor`)
------------------------------------------------------------------------------------------------
Boosting with the squared error builds ``F_M(x) = F_0 + lr * sum_{m=1..M} h_m(x)``. Round ``m``
fits a regression tree ``h_m`` to the residuals ``r_m = y - F_{m-1}(X)`` of the ``n`` training
points ``X`` (the negative gradient of ``(y - F)^2 / 2``). For the squared-error criterion a
leaf's value is the (sample-weighted) mean of the targets of the training points that reach it,
so with ``leaf_m(x)`` the leaf of ``x`` in tree ``m`` and ``B_m`` the in-bag points of round
``m`` (all points when ``subsample == 1``; with ``subsample < 1`` scikit-learn gives the
out-of-bag points weight 0, so only in-bag points enter the means):

    h_m(x) = W_m(x, X) r_m,   W_m(x, x_i) = [leaf_m(x) = leaf_m(x_i)] [i in B_m] / |{j in B_m :
    leaf_m(x_j) = leaf_m(x)}|,

the normalized leaf co-membership kernel. Write every prediction as a linear smoother
``F_m(x) = S_m(x) y + c_m(x)`` (``S_m(x)`` a row of ``n`` weights). Then ``r_m = (I - S_{m-1}(X))
y - c_{m-1}(X)`` and

    S_m(x) = S_{m-1}(x) + lr * W_m(x, X) (I - S_{m-1}(X)),
    c_m(x) = c_{m-1}(x) + lr * W_m(x, X) (0 - c_{m-1}(X)),

telescoped from ``S_0 = 0``, ``c_0 = F_0`` (the ``init`` prediction: the training mean for the
default ``DummyRegressor``, 0 for ``init="zero"``). With ``init_in_weights=True`` the default
mean initialization is instead put in the weights (``S_0(x) = 1/n`` everywhere, ``c_0 = 0``),
which is the same function of the *given* labels; the leaf values then depend on ``y`` only
through ``S``.

What the weights mean. The split points of the trees are chosen from the labels, so the fitted
model is *not* a linear function of ``y``: refitting on other labels gives other trees. The
smoother is exact for the fitted model (``S(x) y + c(x) = model.predict(x)`` to round-off) and
is the Jacobian of the predictions with respect to the labels *with the tree structures (the
partitions and in-bag sets) frozen* and the leaf values recomputed as means: the smoother of
the fitted structure, the object the paper compares with a network's telescoped kernel.

Leaf values are read from each tree's ``tree_.value`` and checked against the residual means
(:func:`boosting_smoother` raises if they disagree, e.g. for a loss other than squared error,
sample weights it did not get, or a wrong in-bag set). scikit-learn does not store the in-bag
sets of ``subsample < 1``; pass them as ``inbag_masks`` (one boolean row per round), or get
them from :func:`replay_inbag_masks`, which replays scikit-learn's random draws for a model
fitted with an integer ``random_state`` (this relies on scikit-learn internals; the leaf-value
check of :func:`boosting_smoother` tells if the replay is wrong).

Summaries follow :class:`telescope.Smoother` through :mod:`telescope.kernels.smoothing`
(re-exported here: :func:`kernel_weight_norms`, :func:`effective_parameters`,
:func:`max_kernel_weight_norm`): the kernel weight norm of a point is ``||S(x)||_2``, the
effective parameters of a set ``I`` are ``p(I) = n / |I| sum_{j in I} ||S(x_j)||^2``, and the
normalized maximum kernel weight norm of a set is its largest norm divided by the largest over
the training set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from telescope.errors import UsageError
from telescope.kernels.smoothing import (  # re-exported: one formula for every smoother
    effective_parameters,
    kernel_weight_norms,
    max_kernel_weight_norm,
)

__all__ = ["boosting_smoother", "replay_inbag_masks", "kernel_weight_norms", "effective_parameters",
           "max_kernel_weight_norm"]


def _leaf_means(a: np.ndarray, leaves: np.ndarray, inbag: np.ndarray, n_nodes: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the in-bag rows of ``a`` in each leaf: ``[n_nodes, ...]`` and the counts."""
    lv, ab = leaves[inbag], a[inbag]
    counts = np.bincount(lv, minlength=n_nodes).astype(np.float64)
    sums = np.zeros((n_nodes,) + a.shape[1:], dtype=np.float64)
    np.add.at(sums, lv, ab)
    safe = np.where(counts > 0, counts, 1.0)
    return sums / safe.reshape((-1,) + (1,) * (a.ndim - 1)), counts


def boosting_smoother(model, x_train, y_train, x_query=None, *,
                      inbag_masks: Sequence[np.ndarray] | np.ndarray | None = None,
                      init_in_weights: bool = False, check: bool = True, atol: float = 1e-8
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The smoother ``(S [m, n], c [m])`` of a fitted gradient-boosted regressor (see module doc).

    Parameters
    ----------
    model : sklearn.ensemble.GradientBoostingRegressor
        Fitted with ``loss="squared_error"`` on ``(x_train, y_train)`` without sample weights.
    x_train, y_train : array-like
        The exact training data of the fit (``[n, d]``, ``[n]``).
    x_query : array-like, optional
        Points ``[m, d]`` to give weights for (default: the training points).
    inbag_masks : array ``[n_rounds, n]`` of bool, optional
        In-bag points of each round; required when ``model.subsample < 1``.
    init_in_weights : bool, default False
        Put the mean initialization into the weights (``1/n`` each) instead of the offset.
    check : bool, default True
        Check every tree's leaf values against the in-bag residual means (``atol``).

    Returns
    -------
    S : ndarray ``[m, n]`` float64 and c : ndarray ``[m]`` float64 with
    ``S @ y_train + c == model.predict(x_query)`` up to round-off.
    """
    from sklearn.dummy import DummyRegressor

    loss = getattr(model, "loss", None)
    if loss not in ("squared_error", "ls"):
        raise UsageError(f"the boosting smoother needs loss='squared_error', got {loss!r}")
    if not hasattr(model, "estimators_"):
        raise UsageError("the model is not fitted")
    x = np.asarray(x_train, dtype=np.float64)
    y = np.asarray(y_train, dtype=np.float64).reshape(-1)
    n = x.shape[0]
    if y.shape[0] != n:
        raise UsageError(f"x_train has {n} rows but y_train has {y.shape[0]}")
    q = x if x_query is None else np.asarray(x_query, dtype=np.float64)
    trees = [est[0] for est in model.estimators_]
    n_rounds = len(trees)
    if inbag_masks is None:
        if model.subsample < 1.0:
            raise UsageError("subsample < 1: scikit-learn does not keep the in-bag sets; pass "
                             "inbag_masks (one boolean row of length n per round)")
        masks = np.ones((n_rounds, n), dtype=bool)
    else:
        masks = np.asarray(inbag_masks, dtype=bool)
        if masks.shape != (n_rounds, n):
            raise UsageError(f"inbag_masks must have shape {(n_rounds, n)}, got {masks.shape}")
    lr = float(model.learning_rate)

    init = model.init_
    s_tr = np.zeros((n, n))
    s_q = np.zeros((q.shape[0], n))
    if isinstance(init, str) and init == "zero":
        c_tr, c_q = np.zeros(n), np.zeros(q.shape[0])
    elif init_in_weights:
        if not (isinstance(init, DummyRegressor) and init.strategy == "mean"):
            raise UsageError("init_in_weights needs the default mean initialization")
        s_tr[:] = 1.0 / n
        s_q[:] = 1.0 / n
        c_tr, c_q = np.zeros(n), np.zeros(q.shape[0])
    else:
        c_tr = np.asarray(init.predict(x), dtype=np.float64).reshape(-1)
        c_q = np.asarray(init.predict(q), dtype=np.float64).reshape(-1)

    x32 = x.astype(np.float32)
    q32 = q.astype(np.float32)
    eye = np.eye(n)
    for m, tree in enumerate(trees):
        t = tree.tree_
        leaves_tr = tree.apply(x32)
        leaves_q = leaves_tr if x_query is None else tree.apply(q32)
        # W_m (I - S_{m-1}(X)) and W_m (0 - c_{m-1}(X)), one leaf mean per row block
        resid_w = eye - s_tr
        resid_c = -c_tr
        both = np.concatenate([resid_w, resid_c[:, None]], axis=1)
        means, counts = _leaf_means(both, leaves_tr, masks[m], t.node_count)
        if check:
            used = np.unique(np.concatenate([leaves_tr[masks[m]], leaves_q]))
            if np.any(counts[used] == 0):
                raise UsageError(f"round {m}: a leaf holds no in-bag training point; wrong "
                                 "x_train or inbag_masks")
            values = t.value.reshape(t.node_count, -1)[:, 0]
            mine = means[used, :n] @ y + means[used, n]
            if not np.allclose(mine, values[used], rtol=0, atol=atol * max(1.0, np.abs(y).max())):
                worst = float(np.abs(mine - values[used]).max())
                raise UsageError(f"round {m}: leaf values differ from the in-bag residual means "
                                 f"by {worst:.3g}; was the model fitted on (x_train, y_train) "
                                 "with squared error, no sample weights and these in-bag sets?")
        s_tr = s_tr + lr * means[leaves_tr, :n]
        c_tr = c_tr + lr * means[leaves_tr, n]
        if x_query is not None:
            s_q = s_q + lr * means[leaves_q, :n]
            c_q = c_q + lr * means[leaves_q, n]
    if x_query is None:
        return s_tr, c_tr
    return s_q, c_q


def replay_inbag_masks(model, n: int) -> np.ndarray:
    """The in-bag sets ``[n_rounds, n]`` of a model fitted with ``subsample < 1``, recomputed.

    scikit-learn (checked with 1.9) draws, in each boosting round, the in-bag mask of
    ``max(1, int(subsample * n))`` points from its ``RandomState`` and then one integer seed for
    the tree's splitter. Replaying those draws from ``RandomState(model.random_state)`` gives the
    masks; it needs an integer ``random_state``, no warm start and no early stopping
    (``n_iter_no_change=None``). Pass the result to :func:`boosting_smoother`, whose leaf check
    fails loudly if another scikit-learn version draws differently.
    """
    from sklearn.ensemble._gradient_boosting import _random_sample_mask

    rs_seed = model.random_state
    if isinstance(rs_seed, bool) or not isinstance(rs_seed, (int, np.integer)):
        raise UsageError("replaying the in-bag sets needs an integer model.random_state")
    if getattr(model, "n_iter_no_change", None) is not None:
        raise UsageError("replaying the in-bag sets does not support early stopping")
    n_rounds = len(model.estimators_)
    if model.subsample >= 1.0:
        return np.ones((n_rounds, n), dtype=bool)
    rng = np.random.RandomState(int(rs_seed))
    n_inbag = max(1, int(model.subsample * n))
    masks = np.zeros((n_rounds, n), dtype=bool)
    for m in range(n_rounds):
        masks[m] = np.asarray(_random_sample_mask(n, n_inbag, rng), dtype=bool)
        rng.randint(0, 2147483647)  # the splitter's seed of this round's tree (RAND_R_MAX)
    return masks
