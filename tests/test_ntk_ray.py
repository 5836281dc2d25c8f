"""``telescope.ntk(..., out=PATH, executor="ray")`` on a local Ray instance: the same numbers as
the in-memory kernel, every block on disk, and a resumed run that computes only missing
blocks."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

import telescope
from telescope.errors import UsageError
from telescope.models import MLP

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    for sig, handler in handlers.items():   # ray.init installed its own
        signal.signal(sig, handler)


def test_a_call_that_starts_ray_leaves_the_signal_handlers_as_they_were(tmp_path):
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running")
    model, x = _model_and_data()
    before = signal.getsignal(signal.SIGTERM)
    telescope.ntk(model, x, out=tmp_path / "k.npy", executor="ray", block_size=6)
    assert signal.getsignal(signal.SIGTERM) is before


def _model_and_data():
    torch.manual_seed(0)
    model = MLP(5, [16], 3, activation="relu").double()
    x = torch.randn(11, 5, dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("output", ["trace", "full"])
def test_ray_blocks_equal_the_in_memory_kernel(tmp_path, local_ray, output):
    model, x = _model_and_data()
    ref = telescope.ntk(model, x, output=output)
    got = telescope.ntk(model, x, output=output, out=tmp_path / "k.npy", executor="ray",
                        block_size=4)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-12, atol=1e-13)
    x2 = torch.randn(6, 5, dtype=torch.float64)
    cross = telescope.ntk(model, x, x2, output=output, out=tmp_path / "c.npy", executor="ray",
                          block_size=4)
    np.testing.assert_allclose(cross, telescope.ntk(model, x, x2, output=output).numpy(),
                               rtol=1e-12, atol=1e-13)


def test_ray_run_resumes_from_finished_blocks(tmp_path, local_ray):
    model, x = _model_and_data()
    path = tmp_path / "k.npy"
    ref = telescope.ntk(model, x)
    telescope.ntk(model, x, out=path, executor="ray", block_size=4)
    progress = path.with_name(path.name + ".progress.json")
    saved = json.loads(progress.read_text())
    assert sorted(map(tuple, saved["blocks"])) == [(0, 0), (0, 4), (0, 8), (4, 4), (4, 8),
                                                   (8, 8)]
    # as after a kill: one block lost (zeroed on disk, not recorded); the rerun fills only it
    # and a finished block marked on disk, which a rerun must not recompute
    kernel = np.lib.format.open_memmap(path, mode="r+")
    kernel[4:8, 8:] = 0.0
    kernel[8:, 4:8] = 0.0
    kernel[0:4, 0:4] = 7.0
    kernel.flush()
    del kernel
    saved["blocks"] = [b for b in saved["blocks"] if tuple(b) != (4, 8)]
    progress.write_text(json.dumps(saved))
    again = np.array(telescope.ntk(model, x, out=path, executor="ray", block_size=4))
    assert (again[0:4, 0:4] == 7.0).all()            # kept: it was recorded as finished
    again[0:4, 0:4] = ref.numpy()[0:4, 0:4]
    np.testing.assert_allclose(again, ref.numpy(), rtol=1e-12, atol=1e-13)


def test_ray_needs_a_file_and_a_known_executor():
    model, x = _model_and_data()
    with pytest.raises(UsageError, match="out=PATH"):
        telescope.ntk(model, x, executor="ray")
    with pytest.raises(UsageError, match="executor must be"):
        telescope.ntk(model, x, executor="dask")
    with pytest.raises(UsageError, match="address"):
        telescope.ntk(model, x, address="ray://head:10001")
