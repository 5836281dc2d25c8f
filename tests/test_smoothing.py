"""telescope.kernels.smoothing against closed forms and explicit per-row solves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from telescope.errors import UsageError
from telescope.kernels import (
    absolute_ridge,
    effective_parameters,
    kernel_weight_norms,
    max_kernel_weight_norm,
    smoother_weights,
)
from telescope.kernels.smoothing import RIDGE_CONVENTIONS


def _kernels(n: int = 9, m: int = 4, p: int = 30, seed: int = 0):
    """A full-rank train kernel (p > n) and its test kernel, from explicit features."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n + m, p, generator=g, dtype=torch.float64)
    return phi[:n] @ phi[:n].T, phi[n:] @ phi[:n].T


def _row_oracle(k: np.ndarray, ks: np.ndarray, lam: float) -> np.ndarray:
    """``s(x_j) = (K + lam I)^{-1} k(x_j)`` one row at a time with an explicit inverse."""
    inv = np.linalg.inv(k + lam * np.eye(k.shape[0]))
    return np.stack([inv @ ks[j] for j in range(ks.shape[0])])


def _p_oracle(s: np.ndarray, n: int, outputs: int = 1) -> float:
    """``n / (|I| O) sum_j sum_entries S(x_j)^2`` by a plain loop."""
    total = 0.0
    for row in s.reshape(s.shape[0], -1):
        total += sum(float(v) ** 2 for v in row)
    return n * total / (s.shape[0] * outputs)


# ----------------------------------------------------------------------------- closed forms


def test_ridge_zero_invertible_kernel_interpolates():
    k, ks = _kernels()
    n = k.shape[0]
    s_test, s_train = smoother_weights(k, ks, ridge=0.0, ridge_convention="absolute",
                                       return_train=True)
    torch.testing.assert_close(s_train, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(s_test, torch.linalg.solve(k, ks.T).T, rtol=1e-8, atol=1e-10)
    assert effective_parameters(s_train) == pytest.approx(n, rel=1e-9)


@pytest.mark.parametrize("convention, lam_of", [
    ("absolute", lambda ridge, n, c: ridge),
    ("per_example", lambda ridge, n, c: n * ridge),
    ("relative_trace", lambda ridge, n, c: ridge * c),
])
def test_scaled_identity_kernel(convention, lam_of):
    """``K = c I``: ``S = c / (c + lam) I`` and ``p = n (c / (c + lam))^2``; on test points
    ``S_* = K_* / (c + lam)``."""
    n, c, ridge = 7, 2.5, 0.3
    k = c * torch.eye(n, dtype=torch.float64)
    ks = torch.arange(3 * n, dtype=torch.float64).reshape(3, n) / 10
    lam = lam_of(ridge, n, c)
    assert absolute_ridge(k, ridge, convention) == pytest.approx(lam, rel=1e-15)
    s_test, s_train = smoother_weights(k, ks, ridge=ridge, ridge_convention=convention,
                                       return_train=True)
    torch.testing.assert_close(s_train, c / (c + lam) * torch.eye(n, dtype=torch.float64),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s_test, ks / (c + lam), rtol=1e-12, atol=1e-14)
    assert effective_parameters(s_train) == pytest.approx(n * (c / (c + lam)) ** 2, rel=1e-12)
    assert effective_parameters(s_test) == pytest.approx(
        n * float((ks**2).sum()) / (3 * (c + lam) ** 2), rel=1e-12)


@pytest.mark.parametrize("convention", RIDGE_CONVENTIONS)
def test_matches_a_per_row_inverse(convention):
    k, ks = _kernels(n=11, m=6, p=8)           # rank 8 < n: the ridge matters
    n, ridge = k.shape[0], 0.05
    lam = {"absolute": ridge, "per_example": n * ridge,
           "relative_trace": ridge * float(np.trace(k.numpy())) / n}[convention]
    s = smoother_weights(k, ks, ridge=ridge, ridge_convention=convention)
    np.testing.assert_allclose(s.numpy(), _row_oracle(k.numpy(), ks.numpy(), lam), rtol=1e-9,
                               atol=1e-11)
    s_train = smoother_weights(k, ridge=ridge, ridge_convention=convention)
    np.testing.assert_allclose(s_train.numpy(), _row_oracle(k.numpy(), k.numpy(), lam),
                               rtol=1e-9, atol=1e-11)
    # p on the training points = sum_i (d_i / (d_i + lam))^2 over the eigenvalues of K
    d = np.linalg.eigvalsh(k.numpy()).clip(min=0)
    assert effective_parameters(s_train) == pytest.approx(float(((d / (d + lam)) ** 2).sum()),
                                                          rel=1e-8)
    assert effective_parameters(s) == pytest.approx(_p_oracle(s.numpy(), n), rel=1e-12)


def test_ridge_zero_rank_deficient_is_the_projector_and_p_is_the_rank():
    g = torch.Generator().manual_seed(3)
    phi = torch.randn(10, 4, generator=g, dtype=torch.float64)
    k = phi @ phi.T                                          # rank 4
    s = smoother_weights(k, ridge=0.0, ridge_convention="absolute")
    proj = torch.from_numpy(np.linalg.pinv(k.numpy()) @ k.numpy())
    torch.testing.assert_close(s, proj, rtol=1e-8, atol=1e-9)
    assert effective_parameters(s) == pytest.approx(4.0, rel=1e-9)


def test_relative_trace_is_invariant_to_the_kernel_scale():
    k, ks = _kernels(n=8, m=3, p=5)
    a = smoother_weights(k, ks, ridge=0.1, ridge_convention="relative_trace")
    b = smoother_weights(1e3 * k, 1e3 * ks, ridge=0.1, ridge_convention="relative_trace")
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    c = smoother_weights(1e3 * k, 1e3 * ks, ridge=0.1, ridge_convention="absolute")
    assert not torch.allclose(a, c)


def test_same_numbers_as_kernel_regression_with_identity_targets():
    """The smoother is the converged regression of the identity: bit for bit."""
    from telescope.kernels import kernel_regression

    k, ks = _kernels(n=7, m=5, p=4)
    eye = torch.eye(7, dtype=torch.float64)
    ref_test, ref_train = kernel_regression(k, ks, eye, ridge=0.2 * float(k.diagonal().mean()),
                                            return_train=True)
    s_test, s_train = smoother_weights(k, ks, ridge=0.2, ridge_convention="relative_trace",
                                       return_train=True)
    assert torch.equal(s_test, ref_test) and torch.equal(s_train, ref_train)


def test_dtype_follows_the_train_kernel():
    k, ks = _kernels()
    s = smoother_weights(k.float(), ks.float(), ridge=0.1, ridge_convention="absolute")
    assert s.dtype == torch.float32 and s.shape == ks.shape


# ----------------------------------------------------------------------------- summaries


def test_norms_and_effective_parameters_single_output():
    g = np.random.default_rng(0)
    s = g.normal(size=(6, 10))
    w = kernel_weight_norms(s)
    assert isinstance(w, np.ndarray) and w.shape == (6,)
    np.testing.assert_allclose(w, [np.sqrt(sum(v * v for v in row)) for row in s], rtol=1e-14)
    assert effective_parameters(s) == pytest.approx(_p_oracle(s, 10), rel=1e-13)
    assert effective_parameters(s.tolist()) == effective_parameters(s)     # array-like
    t = torch.from_numpy(s)
    wt = kernel_weight_norms(t)
    assert isinstance(wt, torch.Tensor)
    np.testing.assert_allclose(wt.numpy(), w, rtol=1e-14)
    assert effective_parameters(t) == pytest.approx(effective_parameters(s), rel=1e-14)


def test_multi_output_counts_identical_copies_once():
    """``[m, O, n O]`` weights: ``p = n / (|I| O) sum ||S||_F^2``; O independent copies of a
    single-output smoother (block structure ``S(x)[o, j O + o'] = s(x)_j [o = o']``) have the
    single-output norms and ``p``."""
    g = np.random.default_rng(1)
    m, n, o = 5, 8, 3
    s = g.normal(size=(m, n))
    multi = np.zeros((m, o, n * o))
    for c in range(o):
        multi[:, c, c::o] = s
    np.testing.assert_allclose(kernel_weight_norms(multi), kernel_weight_norms(s), rtol=1e-14)
    assert effective_parameters(multi) == pytest.approx(effective_parameters(s), rel=1e-14)
    dense = g.normal(size=(m, o, n * o))
    assert effective_parameters(dense) == pytest.approx(_p_oracle(dense, n, o), rel=1e-13)
    assert effective_parameters(torch.from_numpy(dense)) == pytest.approx(
        _p_oracle(dense, n, o), rel=1e-13)


def test_max_kernel_weight_norm():
    s_train = np.array([[3.0, 4.0], [0.0, 1.0]])             # norms 5, 1
    s = np.array([[6.0, 8.0], [1.0, 0.0]])                   # norms 10, 1
    assert max_kernel_weight_norm(s, s_train) == pytest.approx(2.0)
    assert max_kernel_weight_norm(s, normalize=False) == pytest.approx(10.0)
    assert max_kernel_weight_norm(torch.from_numpy(s), torch.from_numpy(s_train)) == \
        pytest.approx(2.0)


# ----------------------------------------------------------------------------- errors


def test_errors():
    k, ks = _kernels(n=5, m=2)
    with pytest.raises(UsageError, match="ridge_convention must be one of"):
        smoother_weights(k, ks, ridge=0.1, ridge_convention="relative")
    with pytest.raises(TypeError, match="ridge_convention"):
        smoother_weights(k, ks, ridge=0.1)                                # no default
    with pytest.raises(UsageError, match="ridge must be finite and >= 0"):
        smoother_weights(k, ks, ridge=-1.0, ridge_convention="absolute")
    with pytest.raises(UsageError, match="ridge must be a real number"):
        absolute_ridge(k, True, "absolute")
    with pytest.raises(UsageError, match="k_train must be square"):
        smoother_weights(ks, ridge=0.1, ridge_convention="absolute")
    with pytest.raises(UsageError, match="k_train must be a torch.Tensor"):
        smoother_weights(k.numpy(), ridge=0.1, ridge_convention="absolute")
    with pytest.raises(UsageError, match="k_test has 4 columns but k_train has 5"):
        smoother_weights(k, ks[:, :4], ridge=0.1, ridge_convention="absolute")
    with pytest.raises(UsageError, match="NaN"):
        smoother_weights(k, ks * float("nan"), ridge=0.1, ridge_convention="absolute")
    with pytest.raises(UsageError, match="return_train=True needs k_test"):
        smoother_weights(k, ridge=0.1, ridge_convention="absolute", return_train=True)
    with pytest.raises(UsageError, match="non-negative mean diagonal"):
        smoother_weights(-k, ridge=0.1, ridge_convention="relative_trace")
    with pytest.raises(UsageError, match=r"\[m, n\] or \[m, O, n O\]"):
        effective_parameters(np.ones(4))
    with pytest.raises(UsageError, match=r"\[m, n\] or \[m, O, n O\]"):
        kernel_weight_norms(np.ones((2, 3, 4)))                           # 4 % 3 != 0
    with pytest.raises(UsageError, match="no rows"):
        effective_parameters(np.ones((0, 3)))
    with pytest.raises(UsageError, match="array of real numbers"):
        effective_parameters([["a"]])
    with pytest.raises(UsageError, match="needs train_weights"):
        max_kernel_weight_norm(np.ones((2, 2)))
