"""Tests for telescope.data: MNIST-1D generation/caching and the synthetic generators."""

from __future__ import annotations

import math
import random

import mnist1d.data
import numpy as np
import pytest
import torch

from telescope.data import (
    Dataset,
    load_mnist1d,
    one_hot,
    random_tokens,
    sinusoid_tasks,
    teacher_regression,
)


@pytest.fixture
def counted(monkeypatch):
    """Count (and record the raw output of) every call of mnist1d's make_dataset."""
    calls: list[dict] = []
    real = mnist1d.data.make_dataset

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(mnist1d.data, "make_dataset", wrapper)
    return calls


def _raw(calls: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    out = calls[-1]
    return np.concatenate([out["x"], out["x_test"]]), np.concatenate([out["y"], out["y_test"]])


def test_mnist1d_shapes_and_types(tmp_path, counted):
    ds = load_mnist1d(120, 40, cache_dir=tmp_path)
    assert isinstance(ds, Dataset)
    assert ds.x_train.shape == (120, 40) and ds.x_test.shape == (40, 40)
    assert ds.y_train.shape == (120,) and ds.y_test.shape == (40,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.n_classes == 10 and ds.name == "mnist1d"
    assert ds.n_train == 120 and ds.n_test == 40 and ds.input_shape == (40,)
    assert set(ds.y_train.tolist()) <= set(range(10))
    assert len(counted) == 1
    ds64 = load_mnist1d(120, 40, cache_dir=tmp_path, dtype=torch.float64)
    assert ds64.x_train.dtype == torch.float64
    torch.testing.assert_close(ds64.x_train.float(), ds.x_train)
    # the raw samples are split in order: train first, then test
    x_raw, y_raw = _raw(counted)
    assert np.array_equal(ds.y_train.numpy(), y_raw[:120])
    assert np.array_equal(ds.y_test.numpy(), y_raw[120:160])


def test_mnist1d_standardization(tmp_path, counted):
    ds = load_mnist1d(150, 50, cache_dir=tmp_path, dtype=torch.float64)
    x_raw, _ = _raw(counted)
    mean, std = x_raw[:150].mean(0), x_raw[:150].std(0)
    np.testing.assert_allclose(ds.x_train.mean(0).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(ds.x_train.std(0, unbiased=False).numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(ds.x_mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(ds.x_std.numpy(), std, rtol=1e-12)
    # test inputs use the training statistics
    np.testing.assert_allclose(ds.x_test.numpy(), (x_raw[150:200] - mean) / std, rtol=1e-12)


def test_mnist1d_deterministic_by_seed(tmp_path):
    a = load_mnist1d(60, 20, seed=3, cache_dir=tmp_path / "a")
    b = load_mnist1d(60, 20, seed=3, cache_dir=tmp_path / "b")
    c = load_mnist1d(60, 20, seed=4, cache_dir=tmp_path / "a")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


def test_mnist1d_leaves_global_rng_alone(tmp_path):
    # make_dataset seeds the legacy global generators; the loader must restore them
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    load_mnist1d(30, 10, cache_dir=tmp_path)
    assert random.getstate() == py_state
    after = np.random.get_state()  # noqa: NPY002
    assert np.array_equal(after[1], np_state[1]) and after[2] == np_state[2]


def test_mnist1d_binary_subset_relabels(tmp_path, counted):
    ds = load_mnist1d(80, 20, classes=(5, 3), cache_dir=tmp_path)
    assert ds.n_classes == 2 and ds.name == "mnist1d[5,3]"
    _, y_raw = _raw(counted)
    assert set(np.unique(y_raw)) == {3, 5}  # only the chosen classes are generated
    expected = np.where(y_raw[:80] == 5, 0, 1)  # relabeled by position in `classes`
    assert np.array_equal(ds.y_train.numpy(), expected)
    assert set(ds.y_train.tolist()) == {0, 1}
    # None sizes: the standard 80/20 split restricted to the classes (400k / 100k)
    full = load_mnist1d(None, None, classes=(3, 5), cache_dir=tmp_path)
    assert full.n_train == 800 and full.n_test == 200
    assert abs(int((full.y_train == 0).sum()) - 400) < 60


def test_mnist1d_cache_reuse(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("TELESCOPE_CACHE", str(tmp_path / "env"))
    a = load_mnist1d(50, 20)  # cache dir from the environment variable
    assert len(counted) == 1
    files = list((tmp_path / "env").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    b = load_mnist1d(50, 20)
    assert len(counted) == 1  # not regenerated
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    # another split of the same 70 samples reuses the file
    c = load_mnist1d(40, 30)
    assert len(counted) == 1
    assert torch.equal(c.y_train, a.y_train[:40])
    # a different seed or class subset is generated (and cached separately)
    load_mnist1d(50, 20, seed=1)
    load_mnist1d(50, 20, classes=(3, 5))
    assert len(counted) == 3
    assert len(list((tmp_path / "env").iterdir())) == 3  # no temporary files left behind
    # an explicit cache_dir wins over the environment variable
    load_mnist1d(50, 20, cache_dir=tmp_path / "arg")
    assert len(counted) == 4 and len(list((tmp_path / "arg").iterdir())) == 1


def test_mnist1d_corrupt_cache_is_regenerated(tmp_path, counted):
    a = load_mnist1d(30, 10, cache_dir=tmp_path)
    (path,) = list(tmp_path.iterdir())
    path.write_bytes(b"not a zip file")
    b = load_mnist1d(30, 10, cache_dir=tmp_path)
    assert len(counted) == 2
    assert torch.equal(a.x_train, b.x_train)
    load_mnist1d(30, 10, cache_dir=tmp_path)
    assert len(counted) == 2  # the rewritten file is good


def test_mnist1d_bad_arguments(tmp_path):
    for classes in [(3,), (3, 3), (3, 10), (-1, 2), (1.0, 2)]:
        with pytest.raises(ValueError, match="classes"):
            load_mnist1d(10, 10, classes=classes, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="n_train"):
        load_mnist1d(0, 10, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="n_test"):
        load_mnist1d(10, -1, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_mnist1d(10, 10, dtype=torch.int64, cache_dir=tmp_path)


def test_one_hot():
    y = torch.tensor([2, 0, 1])
    oh = one_hot(y, 3)
    assert oh.dtype == torch.float32
    assert torch.equal(oh, torch.eye(3)[[2, 0, 1]])
    with pytest.raises(ValueError):
        one_hot(torch.tensor([3]), 3)
    with pytest.raises(ValueError):
        one_hot(torch.tensor([0.0]), 3)
    ds = Dataset(torch.zeros(3, 2, dtype=torch.float64), y, torch.zeros(0, 2), y[:0], 3, "toy")
    assert ds.one_hot(y).dtype == torch.float64 and ds.one_hot(y).shape == (3, 3)
    reg = teacher_regression(4, 2, 3)
    with pytest.raises(ValueError, match="regression"):
        reg.one_hot(y)
    moved = ds.to(dtype=torch.float32)
    assert moved.x_train.dtype == torch.float32 and moved.y_train.dtype == torch.int64


def test_teacher_regression():
    ds = teacher_regression(200, 100, 5, noise=0.0, seed=1, n_outputs=2)
    assert ds.x_train.shape == (200, 5) and ds.y_train.shape == (200, 2)
    assert ds.x_test.shape == (100, 5) and ds.y_test.shape == (100, 2)
    assert ds.n_classes is None and ds.x_train.dtype == torch.float32
    # the targets are the teacher's function of the inputs
    w, a = ds.meta["W"], ds.meta["A"]
    x = ds.x_test.double()
    y = (2.0 / w.shape[0]) ** 0.5 * torch.relu(x @ w.T / 5**0.5) @ a
    torch.testing.assert_close(ds.y_test.double(), y, rtol=1e-5, atol=1e-5)
    assert 0.2 < float(ds.y_train.var()) < 5.0
    # deterministic, nested training sets, test set independent of n_train
    again = teacher_regression(200, 100, 5, seed=1, n_outputs=2)
    small = teacher_regression(50, 100, 5, seed=1, n_outputs=2)
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_train, again.y_train)
    assert torch.equal(small.x_train, ds.x_train[:50])
    assert torch.equal(small.x_test, ds.x_test) and torch.equal(small.y_test, ds.y_test)
    other = teacher_regression(200, 100, 5, seed=2, n_outputs=2)
    assert not torch.equal(other.x_train, ds.x_train)
    # noise goes on the training targets only
    noisy = teacher_regression(200, 100, 5, noise=0.5, seed=1, n_outputs=2, dtype=torch.float64)
    resid = noisy.y_train - ds.y_train.double()
    assert 0.4 < float(resid.std()) < 0.6
    torch.testing.assert_close(noisy.y_test.float(), ds.y_test)
    with pytest.raises(ValueError):
        teacher_regression(10, 10, 0)
    with pytest.raises(ValueError):
        teacher_regression(10, 10, 3, noise=-1.0)


def test_sinusoid_tasks():
    data = sinusoid_tasks(4, 5, 3, seed=7, amplitude=(1.0, 3.0), dtype=torch.float64)
    assert data.x_train.shape == (20, 4) and data.x_test.shape == (12, 4)
    assert data.y_train.shape == (20, 1) and data.y_test.shape == (12, 1)
    assert data.n_classes is None and data.x_train.dtype == torch.float64
    z, amplitude, phase = data.meta["z"], data.meta["amplitude"], data.meta["phase"]
    assert z.shape == (4, 3) and amplitude.shape == phase.shape == (4,)
    assert ((amplitude >= 1) & (amplitude <= 3)).all()
    assert ((phase >= 0) & (phase <= math.pi)).all()
    torch.testing.assert_close(z.norm(dim=1), torch.full((4,), math.sqrt(3), dtype=torch.float64))
    # the targets from the inputs: x = u[:, 0] * pi / sqrt 3 (x_std), task-major
    torch.testing.assert_close(data.x_std[0], torch.tensor(math.pi / math.sqrt(3),
                                                           dtype=torch.float64))
    for u, y, per in ((data.x_train, data.y_train, 5), (data.x_test, data.y_test, 3)):
        x = u[:, 0] * data.x_std[0] + data.x_mean[0]
        assert (x.abs() <= math.pi).all()
        task = torch.arange(4).repeat_interleave(per)
        torch.testing.assert_close(u[:, 1:], z[task])
        ref = amplitude[task] * torch.sin(x + phase[task])
        torch.testing.assert_close(y[:, 0], ref)
    # the embedding encodes the task: its first two coordinates point along the phase
    torch.testing.assert_close(torch.atan2(z[:, 1], z[:, 0]), phase)
    again = sinusoid_tasks(4, 5, 3, seed=7, amplitude=(1.0, 3.0), dtype=torch.float64)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)
    assert not torch.equal(sinusoid_tasks(4, 5, 3, seed=8).x_train, data.x_train.float())
    single = sinusoid_tasks(4, 5, 3, seed=7, amplitude=(1.0, 3.0))
    assert single.x_train.dtype == single.y_train.dtype == single.x_std.dtype == torch.float32
    torch.testing.assert_close(single.x_train, data.x_train.float())
    assert sinusoid_tasks(2, 3, 0).x_test.shape == (0, 4)
    with pytest.raises(ValueError, match="amplitude"):
        sinusoid_tasks(2, 2, 2, seed=0, amplitude=(2.0, 1.0))
    with pytest.raises(ValueError, match="amplitude"):
        sinusoid_tasks(2, 2, 2, seed=0, amplitude=(-1.0, 1.0))
    with pytest.raises(ValueError, match="n_tasks"):
        sinusoid_tasks(0, 2, 2)
    with pytest.raises(ValueError, match="n_train"):
        sinusoid_tasks(2, 0, 2)


def test_random_tokens():
    t = random_tokens(8, 12, 5, seed=3)
    assert t.shape == (8, 12) and t.dtype == torch.int64
    assert int(t.min()) >= 0 and int(t.max()) < 5
    assert torch.equal(t, random_tokens(8, 12, 5, seed=3))
    assert not torch.equal(t, random_tokens(8, 12, 5, seed=4))
    assert len(torch.unique(random_tokens(50, 50, 7))) == 7
    with pytest.raises(ValueError):
        random_tokens(0, 3, 5)
    with pytest.raises(ValueError):
        random_tokens(2, 3, 0)
