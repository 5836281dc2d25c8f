"""Tests of monte_carlo_kernel: per-sample oracles, reproducibility, the global RNG, and
convergence to the infinite-width kernels."""

from __future__ import annotations

import math

import pytest
import torch
from _oracles import oracle_ntk
from torch import nn

import telescope
from telescope.errors import UsageError
from telescope.infinite.monte_carlo import monte_carlo_kernel
from telescope.models.mlp import NTKLinear


def _mlp(d_in: int = 3, width: int = 16, d_out: int = 2, *, w_std: float = 1.0,
         b_std: float = 0.0, dtype=torch.float64):
    def make() -> nn.Module:
        return nn.Sequential(NTKLinear(d_in, width, weight_std=w_std, bias_std=b_std), nn.ReLU(),
                             NTKLinear(width, d_out, weight_std=w_std, bias_std=b_std)).to(dtype)
    return make


def _inputs(n: int, d: int = 3, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype)


def _by_hand(make, x1, x2, n_samples, seed, method):
    """Per-sample kernels by hand: the module of seed + i, its outputs and its NTK (plain
    autograd oracle, or telescope.ntk with ``method``), averaged over the samples."""
    nngps, ntks = [], []
    for i in range(n_samples):
        torch.manual_seed(seed + i)
        model = make()
        with torch.no_grad():
            f1 = model(x1).reshape(x1.shape[0], -1)
            f2 = f1 if x2 is None else model(x2).reshape(x2.shape[0], -1)
        o = f1.shape[1]
        nngps.append(f1 @ f2.T / o)
        k = (oracle_ntk(model, x1, x2, "trace") if method == "oracle"
             else telescope.ntk(model, x1, x2, method=method, output="trace"))
        ntks.append(k / o)
    return torch.stack(nngps), torch.stack(ntks)


# ----------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("two_batches", [False, True])
def test_matches_per_sample_oracle(two_batches):
    make = _mlp(width=12, d_out=3, b_std=0.3)
    x1 = _inputs(5)
    x2 = _inputs(4, seed=1) if two_batches else None
    nngp, ntk = _by_hand(make, x1, x2, 4, seed=7, method="oracle")
    out = monte_carlo_kernel(make, x1, x2, n_samples=4, seed=7, standard_errors=True)
    assert set(out) == {"nngp", "ntk", "nngp_sem", "ntk_sem"}
    torch.testing.assert_close(out["nngp"], nngp.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["ntk"], ntk.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["nngp_sem"], nngp.std(0) / 2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["ntk_sem"], ntk.std(0) / 2, rtol=1e-9, atol=1e-12)
    if not two_batches:
        assert torch.equal(out["nngp"], out["nngp"].T)


@pytest.mark.parametrize("method", ["jacobian", "vector", "structured"])
def test_methods_agree_with_jacobian_loop(method):
    make = _mlp(width=10, d_out=2)
    x1, x2 = _inputs(4), _inputs(3, seed=2)
    _, ntk = _by_hand(make, x1, x2, 3, seed=0, method="jacobian")
    out = monte_carlo_kernel(make, x1, x2, n_samples=3, method=method)
    assert set(out) == {"nngp", "ntk"}
    torch.testing.assert_close(out["ntk"], ntk.mean(0), rtol=1e-10, atol=1e-12)


def test_vector_output_and_conv_module():
    """Outputs [N] (O = 1) and an image model; x2 equal to x1 takes the symmetric path."""
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16, 1),
                             nn.Flatten(0)).double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    nngp, ntk = _by_hand(make, x, None, 2, seed=3, method="jacobian")
    out = monte_carlo_kernel(make, x, x.clone(), n_samples=2, seed=3)
    torch.testing.assert_close(out["nngp"], nngp.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["ntk"], ntk.mean(0), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- RNG


def test_reproducible_and_sample_i_uses_seed_plus_i():
    make, x = _mlp(), _inputs(4)
    a = monte_carlo_kernel(make, x, n_samples=3, seed=5)
    b = monte_carlo_kernel(make, x, n_samples=3, seed=5)
    assert torch.equal(a["nngp"], b["nngp"]) and torch.equal(a["ntk"], b["ntk"])
    c = monte_carlo_kernel(make, x, n_samples=3, seed=6)
    assert not torch.allclose(a["ntk"], c["ntk"])
    first = monte_carlo_kernel(make, x, n_samples=1, seed=5)
    rest = monte_carlo_kernel(make, x, n_samples=2, seed=6)
    for k in ("nngp", "ntk"):
        torch.testing.assert_close(a[k], (first[k] + 2 * rest[k]) / 3, rtol=1e-12, atol=1e-13)


def test_global_rng_untouched_and_irrelevant():
    make, x = _mlp(), _inputs(4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = monte_carlo_kernel(make, x, n_samples=2)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    b = monte_carlo_kernel(make, x, n_samples=2)
    assert torch.equal(a["ntk"], b["ntk"]) and torch.equal(a["nngp"], b["nngp"])


# ----------------------------------------------------------------------------- convergence


@pytest.mark.parametrize("w_std,b_std", [(1.0, 0.0), (1.4, 0.3)])
def test_converges_to_infinite_width_kernels(w_std, b_std):
    """One hidden ReLU layer in NTK parametrization: its first-layer preactivations are exactly
    Gaussian at every width, so the expected empirical NNGP and NTK equal the infinite-width
    kernels exactly and the Monte Carlo estimates must agree within a few standard errors."""
    x = _inputs(5, d=4, seed=11)
    make = _mlp(d_in=4, width=256, d_out=1, w_std=w_std, b_std=b_std)
    out = monte_carlo_kernel(make, x, n_samples=400, seed=1, standard_errors=True)
    inf = telescope.infinite_ntk(x, depth=1, weight_std=w_std, bias_std=b_std)
    for k in ("nngp", "ntk"):
        z = (out[k] - inf[k]) / out[f"{k}_sem"]
        assert z.abs().max() < 4.5, (k, z)
        # and the sampling noise is small against the kernel itself
        assert (out[f"{k}_sem"] / inf[k].abs().max()).max() < 0.1


def test_multi_output_average_converges():
    """Several i.i.d. outputs: the per-output kernel (trace / O) estimates the same limit."""
    x = _inputs(4, d=3, seed=12)
    out = monte_carlo_kernel(_mlp(width=128, d_out=4), x, n_samples=100, standard_errors=True)
    inf = telescope.infinite_ntk(x, depth=1)
    for k in ("nngp", "ntk"):
        assert ((out[k] - inf[k]).abs() / out[f"{k}_sem"]).max() < 4.5


# ----------------------------------------------------------------------------- details


def test_dtype_device_and_single_sample_sem():
    x = _inputs(3, dtype=torch.float32)
    out = monte_carlo_kernel(_mlp(dtype=torch.float32), x, n_samples=1, device="cpu",
                             standard_errors=True)
    assert all(v.dtype == torch.float32 for v in out.values())
    assert out["nngp"].device.type == "cpu"
    assert torch.isnan(out["nngp_sem"]).all() and torch.isnan(out["ntk_sem"]).all()


def test_progress_bar(capsys):
    out = monte_carlo_kernel(_mlp(), _inputs(3), n_samples=2, progress=True)
    assert torch.isfinite(out["ntk"]).all()


def test_errors_name_the_fix():
    x = _inputs(3)
    make = _mlp()
    with pytest.raises(UsageError, match="lambda"):
        monte_carlo_kernel(make(), x, n_samples=2)
    with pytest.raises(UsageError, match="callable"):
        monte_carlo_kernel(3, x, n_samples=2)
    with pytest.raises(UsageError, match="must return a torch.nn.Module"):
        monte_carlo_kernel(lambda: "net", x, n_samples=2)
    with pytest.raises(UsageError, match="no trainable parameters"):
        monte_carlo_kernel(lambda: nn.ReLU(), x, n_samples=2)
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(UsageError, match="n_samples must be a positive int"):
            monte_carlo_kernel(make, x, n_samples=bad)
    with pytest.raises(UsageError, match="seed"):
        monte_carlo_kernel(make, x, n_samples=2, seed=-1)
    with pytest.raises(UsageError, match="method"):
        monte_carlo_kernel(make, x, n_samples=2, method="fast")
    with pytest.raises(UsageError, match="device"):
        monte_carlo_kernel(make, x, n_samples=2, device="nowhere")
    with pytest.raises(UsageError, match="x1"):
        monte_carlo_kernel(make, [[1.0, 2.0, 3.0]], n_samples=2)

    widths = iter([2, 3])

    def changing() -> nn.Module:
        return _mlp(d_out=next(widths))()

    with pytest.raises(UsageError, match="same architecture"):
        monte_carlo_kernel(changing, x, n_samples=2)


def test_large_n_samples_stays_accurate():
    """Float64 accumulation: a float32 model averaged over many samples matches the float64
    mean of the same per-sample kernels to float32 round-off (no drift with n_samples)."""
    x = _inputs(3, dtype=torch.float32)
    make = _mlp(width=8, dtype=torch.float32)
    nngp, ntk = _by_hand(make, x, None, 64, seed=0, method="jacobian")
    out = monte_carlo_kernel(make, x, n_samples=64)
    torch.testing.assert_close(out["ntk"].double(), ntk.double().mean(0), rtol=1e-6,
                               atol=1e-6)
    assert math.isfinite(float(out["nngp"].sum()))
