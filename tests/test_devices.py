"""The main paths on every test device (``TELESCOPE_TEST_DEVICES``, default ``cpu``): the same
numbers on the device as on the CPU, outputs on the device. ``bench/gpu_check.py`` runs this file
with ``cuda``."""

from __future__ import annotations

import pytest
import torch

import telescope
from telescope import infinite as inf
from telescope.lens import Telescope
from telescope.models import MLP, TinyTransformer
from telescope.train import fit


def _on(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"device {device!r} was asked for (TELESCOPE_TEST_DEVICES) but torch sees no "
                    "CUDA device")
    return torch.device(device)


def test_structured_ntk_matches_the_cpu(device):
    dev = _on(device)
    torch.manual_seed(0)
    model = MLP(6, [32, 32], 3, activation="relu").double()
    x = torch.randn(9, 6, dtype=torch.float64)
    ref = telescope.ntk(model, x, output="full")
    got = telescope.ntk(model.to(dev), x.to(dev), output="full")
    assert got.device.type == dev.type
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-10, atol=1e-12)


def test_transformer_trace_ntk_matches_the_cpu(device):
    dev = _on(device)
    torch.manual_seed(0)
    model = TinyTransformer(vocab=11, d_model=16, n_heads=2, n_layers=1, seq_len=5).double()
    x = torch.randint(0, 11, (4, 5))
    ref = telescope.ntk(model, x)
    got = telescope.ntk(model.to(dev), x.to(dev))
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-9, atol=1e-11)


def test_infinite_kernels_match_the_cpu(device):
    dev = _on(device)
    arch = inf.serial(inf.Conv(8, (3, 3), padding="same"), inf.Relu(), inf.GlobalAvgPool(),
                      inf.Dense(1))
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    ref = arch.kernel(x)
    got = arch.kernel(x.to(dev))
    for name in ("nngp", "ntk"):
        assert got[name].device.type == dev.type
        torch.testing.assert_close(got[name].cpu(), ref[name], rtol=1e-12, atol=1e-14)
    tanh = inf.serial(inf.Dense(4, 0.8), inf.Tanh(), inf.Dense(1))
    flat = 0.5 * torch.randn(6, 3, dtype=torch.float64)   # variances where deg=25 is accurate
    torch.testing.assert_close(tanh.kernel(flat.to(dev))["ntk"].cpu(), tanh.kernel(flat)["ntk"],
                               rtol=1e-12, atol=1e-14)


def test_fit_and_telescope_on_the_device(device):
    dev = _on(device)
    torch.manual_seed(0)
    model = MLP(5, [16], 1, activation="relu").double().to(dev)
    x = torch.randn(20, 5, dtype=torch.float64, device=dev)
    y = torch.randn(20, 1, dtype=torch.float64, device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    lens = Telescope(model, opt, {"x": x[:4]})
    history = fit(model, opt, x, y, steps=5, loss="mse", eval_at=[5],
                  evaluate=lambda m: {"loss": float(((m(x) - y) ** 2).mean())})
    lens.close()
    assert history.rows[-1]["loss"] >= 0
    with torch.no_grad():
        gap = (lens.telescoping("x") - model(x[:4])).abs().max()
    assert lens.telescoping("x").device.type == dev.type
    assert float(gap) < 0.05   # five small steps: first order is close


def test_kernel_on_disk_and_cg_regression_from_the_device(device, tmp_path):
    """``out=`` with a model on the device writes the CPU kernel's numbers; ``solver="cg"`` on a
    kernel tensor on the device solves there and matches the eigendecomposition on the CPU."""
    dev = _on(device)
    torch.manual_seed(0)
    model = MLP(6, [32], 3, activation="relu").double()
    x = torch.randn(40, 6, dtype=torch.float64)
    ref = telescope.ntk(model, x)
    on_disk = telescope.ntk(model.to(dev), x.to(dev), out=tmp_path / "k.npy", block_size=16)
    torch.testing.assert_close(torch.from_numpy(on_disk.copy()), ref, rtol=1e-10, atol=1e-12)
    y = torch.randn(40, 2, dtype=torch.float64)
    k_test = ref[:7]
    eigh = telescope.kernel_regression(ref, k_test, y, ridge=1e-2)
    cg = telescope.kernel_regression(ref.to(dev), k_test.to(dev), y.to(dev), ridge=1e-2,
                                     solver="cg", solver_options={"tol": 1e-12})
    assert cg.device.type == dev.type
    torch.testing.assert_close(cg.cpu(), eigh, rtol=1e-8, atol=1e-10)
