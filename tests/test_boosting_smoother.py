"""The boosting smoother against scikit-learn's predictions (the oracle)."""

import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingRegressor

from telescope.lens.boosting import (
    boosting_smoother,
    effective_parameters,
    kernel_weight_norms,
    max_kernel_weight_norm,
    replay_inbag_masks,
)


def _data(n=120, n_test=40, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + n_test, d))
    y = np.sin(2 * x[:, 0]) + x[:, 1] ** 2 + 0.1 * rng.normal(size=n + n_test)
    return x[:n], y[:n], x[n:], y[n:]


@pytest.mark.parametrize("n_est,depth,lr", [(1, 1, 0.1), (20, 2, 0.1), (30, 3, 0.5),
                                            (15, 5, 1.0)])
def test_smoother_reproduces_predictions(n_est, depth, lr):
    x, y, xt, _ = _data()
    model = GradientBoostingRegressor(n_estimators=n_est, max_depth=depth, learning_rate=lr,
                                      random_state=0).fit(x, y)
    s, c = boosting_smoother(model, x, y)
    np.testing.assert_allclose(s @ y + c, model.predict(x), rtol=0, atol=1e-10)
    sq, cq = boosting_smoother(model, x, y, xt)
    assert sq.shape == (len(xt), len(x)) and cq.shape == (len(xt),)
    np.testing.assert_allclose(sq @ y + cq, model.predict(xt), rtol=0, atol=1e-10)
    # mean initialization in the weights: same predictions, no offset
    sw, cw = boosting_smoother(model, x, y, xt, init_in_weights=True)
    np.testing.assert_allclose(cw, 0.0, atol=1e-12)
    np.testing.assert_allclose(sw @ y, model.predict(xt), rtol=0, atol=1e-10)


def test_weights_are_jacobian_of_frozen_structure():
    """With the trees' partitions frozen and leaf values recomputed as residual means, the
    predictions for any labels y' are S y' + c (an independent re-run of the boosting loop)."""
    x, y, xt, _ = _data(seed=1)
    model = GradientBoostingRegressor(n_estimators=25, max_depth=3, learning_rate=0.3,
                                      random_state=0).fit(x, y)
    s, c = boosting_smoother(model, x, y, xt)
    rng = np.random.default_rng(5)
    f0 = float(model.init_.predict(x[:1])[0])
    for _ in range(3):
        y2 = rng.normal(size=len(y))
        f_tr, f_q = np.full(len(x), f0), np.full(len(xt), f0)
        for est in model.estimators_[:, 0]:
            lt, lq = est.apply(x.astype(np.float32)), est.apply(xt.astype(np.float32))
            r = y2 - f_tr
            vals = {leaf: r[lt == leaf].mean() for leaf in np.unique(lt)}
            f_tr = f_tr + model.learning_rate * np.array([vals[v] for v in lt])
            f_q = f_q + model.learning_rate * np.array([vals[v] for v in lq])
        np.testing.assert_allclose(s @ y2 + c, f_q, atol=1e-10)
    # finite differences of the frozen-structure predictions equal the weights
    j = 7
    e = np.zeros(len(y)); e[j] = 1.0  # noqa: E702
    np.testing.assert_allclose((s @ (y + e) + c) - (s @ y + c), s[:, j], atol=1e-12)


def test_single_stump_is_leaf_kernel():
    x, y, xt, _ = _data(n=50)
    model = GradientBoostingRegressor(n_estimators=1, max_depth=1, learning_rate=1.0,
                                      random_state=0).fit(x, y)
    s, c = boosting_smoother(model, x, y)
    leaves = model.estimators_[0, 0].apply(x.astype(np.float32))
    same = (leaves[:, None] == leaves[None, :]).astype(float)
    expected = same / same.sum(1, keepdims=True)
    np.testing.assert_allclose(s, expected, atol=1e-14)
    np.testing.assert_allclose(s.sum(1), 1.0)           # rows of a mean smoother sum to 1
    np.testing.assert_allclose(c, 0.0, atol=1e-12)       # mean init cancels with lr = 1


def test_summaries_and_errors():
    x, y, xt, _ = _data()
    model = GradientBoostingRegressor(n_estimators=10, max_depth=2, random_state=0).fit(x, y)
    s, _ = boosting_smoother(model, x, y)
    sq, _ = boosting_smoother(model, x, y, xt)
    w = kernel_weight_norms(sq)
    assert w.shape == (len(xt),)
    np.testing.assert_allclose(w, np.sqrt(np.einsum("ij,ij->i", sq, sq)), rtol=1e-12)  # ||s||_2
    assert effective_parameters(s) == pytest.approx(len(x) * np.mean(np.sum(s**2, 1)))
    assert max_kernel_weight_norm(sq, s) == pytest.approx(w.max() / kernel_weight_norms(s).max())
    with pytest.raises(ValueError, match="squared_error"):
        boosting_smoother(GradientBoostingRegressor(loss="absolute_error", n_estimators=2)
                          .fit(x, y), x, y)
    with pytest.raises(ValueError, match="leaf values"):
        boosting_smoother(model, x, y + 1.0)             # not the training labels
    sub = GradientBoostingRegressor(n_estimators=3, subsample=0.5, random_state=0).fit(x, y)
    with pytest.raises(ValueError, match="inbag_masks"):
        boosting_smoother(sub, x, y)
    with pytest.raises(ValueError, match="leaf"):        # all-in-bag is the wrong in-bag set
        boosting_smoother(sub, x, y, inbag_masks=np.ones((3, len(x)), bool))


@pytest.mark.parametrize("subsample,max_features", [(0.5, None), (0.8, 2)])
def test_subsample_with_replayed_inbag_sets(subsample, max_features):
    x, y, xt, _ = _data(seed=2)
    model = GradientBoostingRegressor(n_estimators=20, max_depth=3, subsample=subsample,
                                      max_features=max_features, random_state=3).fit(x, y)
    masks = replay_inbag_masks(model, len(x))
    assert masks.shape == (20, len(x))
    assert (masks.sum(1) == int(subsample * len(x))).all()
    s, c = boosting_smoother(model, x, y, xt, inbag_masks=masks)
    np.testing.assert_allclose(s @ y + c, model.predict(xt), rtol=0, atol=1e-10)
    s, c = boosting_smoother(model, x, y, inbag_masks=masks)
    np.testing.assert_allclose(s @ y + c, model.predict(x), rtol=0, atol=1e-10)
    # out-of-bag points get no weight in a round: column j is untouched by rounds without j
    single = GradientBoostingRegressor(n_estimators=1, max_depth=2, subsample=0.5,
                                       random_state=1).fit(x, y)
    m1 = replay_inbag_masks(single, len(x))
    s1, _ = boosting_smoother(single, x, y, inbag_masks=m1)
    assert np.all(s1[:, ~m1[0]] == 0)
