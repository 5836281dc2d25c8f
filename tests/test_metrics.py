"""Tests of the kernel metrics against hand numpy computations and known special cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from telescope.kernels.metrics import (
    alignment,
    effective_rank,
    kernel_distance,
    kernel_target_alignment,
    normalized_variance,
    spectrum,
)


def _gram(n: int = 10, p: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    return x @ x.T


def _np_alignment(a: np.ndarray, b: np.ndarray, centered: bool) -> float:
    """Independent numpy reference: explicit H = I - 11^T/n and traces."""
    if centered:
        h = np.eye(len(a)) - np.ones_like(a) / len(a)
        a, b = h @ a @ h, h @ b @ h
    return float(np.trace(a @ b.T) / np.sqrt(np.trace(a @ a.T) * np.trace(b @ b.T)))


@pytest.mark.parametrize("centered", [True, False])
def test_alignment_matches_numpy(centered):
    k1, k2 = _gram(seed=1), _gram(seed=2)
    expected = _np_alignment(k1.numpy(), k2.numpy(), centered)
    assert alignment(k1, k2, centered=centered) == pytest.approx(expected, rel=1e-12)
    assert kernel_distance(k1, k2, centered=centered) == pytest.approx(1 - expected, rel=1e-12)


def test_kernel_distance_default_is_uncentered_fort():
    k1, k2 = _gram(seed=3), _gram(seed=4)
    a, b = k1.numpy(), k2.numpy()
    fort = 1 - np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
    assert kernel_distance(k1, k2) == pytest.approx(fort, rel=1e-12)
    assert alignment(k1, k2) == pytest.approx(_np_alignment(a, b, True), rel=1e-12)


def test_alignment_scale_invariance_and_self():
    k = _gram()
    assert alignment(k, 3.7 * k) == pytest.approx(1.0, abs=1e-12)
    assert alignment(k, 3.7 * k, centered=False) == pytest.approx(1.0, abs=1e-12)
    assert kernel_distance(k, 0.2 * k) == pytest.approx(0.0, abs=1e-12)
    assert alignment(k.float(), k.float()) == pytest.approx(1.0, abs=1e-6)


def test_alignment_of_orthogonal_complement_kernels_is_zero():
    # Projectors on complementary subspaces of the centered space: <P1, P2>_F = tr(P1 P2) = 0.
    n = 8
    g = torch.Generator().manual_seed(5)
    basis = torch.randn(n, n, generator=g, dtype=torch.float64)
    basis[:, 0] = 1.0  # the first direction is the constant vector, removed by centering
    q, _ = torch.linalg.qr(basis)
    p1 = q[:, 1:4] @ q[:, 1:4].T
    p2 = q[:, 4:] @ q[:, 4:].T
    assert alignment(p1, p2) == pytest.approx(0.0, abs=1e-12)
    assert alignment(p1, p2, centered=False) == pytest.approx(0.0, abs=1e-12)
    assert kernel_distance(p1, p2) == pytest.approx(1.0, abs=1e-12)
    # adding a constant kernel changes nothing once centered
    assert alignment(p1 + 5.0, p2 + 2.0) == pytest.approx(0.0, abs=1e-12)
    assert alignment(p1 + 5.0, p2 + 2.0, centered=False) > 0.5


def test_kernel_target_alignment():
    k = _gram(n=12, seed=6)
    g = torch.Generator().manual_seed(7)
    y = torch.randn(12, 3, generator=g, dtype=torch.float64)
    target = (y @ y.T).numpy()
    for centered in (True, False):
        expected = _np_alignment(k.numpy(), target, centered)
        got = kernel_target_alignment(k, y, centered=centered)
        assert got == pytest.approx(expected, rel=1e-12)
    # a kernel built from the targets is perfectly aligned; vector targets work too
    assert kernel_target_alignment(y @ y.T, y) == pytest.approx(1.0, abs=1e-12)
    v = y[:, 0]
    assert kernel_target_alignment(torch.outer(v, v) * 2, v) == pytest.approx(1.0, abs=1e-12)
    # constant targets have a zero centered target kernel: undefined
    assert math.isnan(kernel_target_alignment(k, torch.ones(12)))


def test_spectrum_matches_numpy():
    k = _gram(n=9, p=5, seed=8)
    noisy = k + 1e-3 * torch.randn(9, 9, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(9))
    s = spectrum(noisy)
    assert s.dtype == torch.float64 and s.shape == (9,)
    expected = np.linalg.eigvalsh(0.5 * (noisy.numpy() + noisy.numpy().T))[::-1]
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.all(s[:-1] >= s[1:])
    assert spectrum(k.float()).dtype == torch.float64


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_effective_rank_of_projector(rank):
    n = 10
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(rank)))
    proj = q[:, :rank] @ q[:, :rank].T
    assert effective_rank(proj) == pytest.approx(rank, rel=1e-9)
    assert effective_rank(2.5 * proj, method="participation") == pytest.approx(rank, rel=1e-9)


def test_effective_rank_matches_formulas():
    k = _gram(n=8, p=8, seed=10)
    lam = np.abs(np.linalg.eigvalsh(k.numpy()))
    p = lam / lam.sum()
    assert effective_rank(k) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-10)
    assert effective_rank(k, method="participation") == pytest.approx(
        lam.sum() ** 2 / np.sum(lam**2), rel=1e-10
    )
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_normalized_variance_against_known_variances():
    """Draws ``K_j = A + sigma Z_j`` (``Z`` standard normal, ``[n, n]``) have ``E ||K - A||^2 /
    ||A||^2 = sigma^2 n^2 / ||A||^2``; the estimator recovers it on average even when the noise
    is as large as the signal and there are only 4 draws (the uncorrected ``||Kbar||^2`` in the
    denominator would read ``1 / (1 + V / D)`` of it)."""
    g = torch.Generator().manual_seed(1)
    n = 6
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    for sigma, draws in ((0.05, 50), (float(a.norm()) / n, 4)):
        truth = sigma ** 2 * n * n / float((a ** 2).sum())
        estimates, naive = [], []
        for _ in range(3000):
            ks = [a + sigma * torch.randn(n, n, generator=g, dtype=torch.float64)
                  for _ in range(draws)]
            v, mean = normalized_variance(ks)
            estimates.append(v)
            naive.append(float(sum(((k - mean) ** 2).sum() for k in ks)) / (draws - 1)
                         / float((mean ** 2).sum()))
        assert np.nanmean(estimates) == pytest.approx(truth, rel=0.05)
        if draws == 4:
            assert np.mean(naive) < 0.85 * truth
    ks = [torch.zeros(2, 2), torch.ones(2, 2), -torch.ones(2, 2)]
    assert math.isnan(normalized_variance(ks)[0])   # all noise, no signal


def test_normalized_variance_mean_scale_and_stacked_draws():
    draws = [_gram(seed=s) for s in range(5)]
    v, mean = normalized_variance(draws)
    torch.testing.assert_close(mean, torch.stack(draws).mean(0), rtol=0, atol=0)
    assert mean.dtype == torch.float64
    stacked = normalized_variance(torch.stack(draws))
    assert stacked[0] == v and torch.equal(stacked[1], mean)
    assert normalized_variance([3.0 * k for k in draws])[0] == pytest.approx(v, rel=1e-12)
    assert normalized_variance(tuple(k.float() for k in draws))[0] == pytest.approx(v, rel=1e-6)
    assert normalized_variance([draws[0], draws[0].clone()])[0] == 0.0


def test_bad_inputs():
    k = _gram()
    with pytest.raises(ValueError, match="square"):
        alignment(k[:, :5], k[:, :5])
    with pytest.raises(ValueError, match="same shape"):
        alignment(k, k[:5, :5])
    with pytest.raises(ValueError, match="same shape"):
        kernel_distance(k[:4, :4], k)
    with pytest.raises(ValueError, match="square"):
        spectrum(k[0])
    with pytest.raises(ValueError, match="square"):
        effective_rank(torch.ones(2, 3))
    with pytest.raises(ValueError, match="method"):
        effective_rank(k, method="stable")
    with pytest.raises(ValueError, match=r"N = 10"):
        kernel_target_alignment(k, torch.ones(9))
    with pytest.raises(ValueError, match=r"N = 10"):
        kernel_target_alignment(k, torch.ones(10, 2, 2))
    bad = k.clone()
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        alignment(bad, k)
    with pytest.raises(TypeError, match="torch.Tensor"):
        spectrum(k.numpy())
    with pytest.raises(ValueError, match="at least 2 draws"):
        normalized_variance([k])
    with pytest.raises(ValueError, match=r"same shape.*kernels\[1\] is \(5, 5\)"):
        normalized_variance([k, k[:5, :5]])
    with pytest.raises(ValueError, match=r"kernels\[1\] must be a square"):
        normalized_variance([k, k[:, :5]])
    with pytest.raises(ValueError, match=r"\[D, N, N\]"):
        normalized_variance(k)
    with pytest.raises(TypeError, match="sequence"):
        normalized_variance(k.numpy())
    with pytest.raises(ValueError, match=r"kernels\[0\] contains NaN"):
        normalized_variance([bad, k])
