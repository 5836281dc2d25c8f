"""Tests for the telescope.data loaders, transformations and synthetic tasks.

Every file-backed loader reads tiny fixture files that the tests write into ``tmp_path``: IDX files
with hand-built headers, CIFAR-10 pickles, CSV / Parquet tables and an OpenML cache directory.
Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from telescope.data import (
    CIFAR10_CLASSES,
    DATASETS,
    Dataset,
    MissingDataError,
    add_label_noise,
    binary_subset,
    irregularity_split,
    load_bundled_table,
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist1d,
    load_mnist_idx,
    load_openml_cache,
    load_table,
    mnist1d_patches,
    modular_arithmetic,
    polynomial_activation,
    polynomial_task,
    read_arff,
    read_idx,
    sequence_task,
    subsample,
)

# ------------------------------------------------------------------------------------ digits


def test_digits_shapes_split_and_standardization():
    ds = load_digits(300, 100, seed=1)
    assert isinstance(ds, Dataset) and ds.name == "digits" and ds.n_classes == 10
    assert ds.x_train.shape == (300, 64) and ds.x_test.shape == (100, 64)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # stratified: every class in proportion (the bundled set is nearly balanced)
    counts = torch.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11
    # standardized with the training statistics; the raw pixels are recoverable
    from sklearn.datasets import load_digits as sk

    x_all, y_all = sk(return_X_y=True)
    tr, te = ds.meta["train_idx"].numpy(), ds.meta["test_idx"].numpy()
    assert not set(tr) & set(te)
    np.testing.assert_array_equal(ds.y_train.numpy(), y_all[tr])
    raw = ds.x_test.double() * ds.x_std.double() + ds.x_mean.double()
    np.testing.assert_allclose(raw.numpy(), x_all[te], atol=1e-4)
    np.testing.assert_allclose(ds.x_mean.numpy(), x_all[tr].mean(0), rtol=1e-5, atol=1e-6)
    raw01 = load_digits(300, 100, seed=1, standardize=False)
    assert raw01.x_mean is None and raw01.x_std is None
    assert torch.equal(raw01.meta["train_idx"], ds.meta["train_idx"])
    np.testing.assert_allclose(raw01.x_train.numpy(), x_all[tr] / 16.0, rtol=1e-6)  # pixels 0-16


def test_digits_deterministic_nested_and_classes():
    a, b = load_digits(100, 50, seed=3), load_digits(100, 50, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = load_digits(100, 50, seed=4)
    assert not torch.equal(a.meta["train_idx"], c.meta["train_idx"])
    big = load_digits(200, 50, seed=3)
    assert torch.equal(big.meta["test_idx"], a.meta["test_idx"])  # test set independent of n_train
    assert torch.equal(big.meta["train_idx"][:100], a.meta["train_idx"])  # nested training sets
    sub = load_digits(classes=(3, 5))
    assert sub.n_classes == 2 and sub.name == "digits[3,5]"
    assert sub.n_train + sub.n_test == 183 + 182 and set(sub.y_train.tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"classes": (3, 12)}, "unknown class 12"), ({"classes": (3,)}, "at least 2"),
     ({"n_train": 2000}, "1797 examples"), ({"n_train": 0}, "n_train must be")],
)
def test_digits_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits(**kwargs)


# --------------------------------------------------------------------------- transformations


def test_binary_subset_index_and_pm1():
    ds = load_digits(500, 200, seed=0)
    b = binary_subset(ds, (3, 5))
    keep = (ds.y_train == 3) | (ds.y_train == 5)
    assert b.n_classes == 2 and b.n_train == int(keep.sum())
    torch.testing.assert_close(b.x_train, ds.x_train[keep])
    assert torch.equal(b.y_train, (ds.y_train[keep] == 5).long())
    assert torch.equal(b.meta["train_idx"], ds.meta["train_idx"][keep])
    pm = binary_subset(ds, (3, 5), targets="pm1")
    assert pm.n_classes is None and pm.y_train.shape == (b.n_train, 1)
    assert pm.y_train.dtype == torch.float32
    assert torch.equal(pm.y_train.flatten(), 1.0 - 2.0 * b.y_train.float())  # 3 -> +1, 5 -> -1
    # on a loader that already relabeled, classes are the data set's labels
    sub = load_digits(classes=(7, 3, 5))
    b2 = binary_subset(sub, (1, 2))
    assert b2.meta["classes"] == (3, 5)
    with pytest.raises(ValueError, match="unknown class 11"):
        binary_subset(ds, (3, 11))
    with pytest.raises(ValueError, match="regression"):
        binary_subset(pm, (0, 1))
    with pytest.raises(ValueError, match="exactly 2"):
        binary_subset(ds, (1, 2, 3))


def test_label_noise_classification():
    ds = load_digits(400, 100, seed=0)
    noisy = add_label_noise(ds, 0.25, seed=7)
    idx = noisy.meta["noisy_indices"]
    assert idx.numel() == 100 and torch.equal(idx, idx.sort().values)
    changed = torch.nonzero(noisy.y_train != ds.y_train).flatten()
    assert torch.equal(changed, idx)  # exactly the recorded labels changed, each to another class
    assert torch.equal(noisy.meta["y_train_clean"], ds.y_train)
    assert torch.equal(noisy.y_test, ds.y_test) and torch.equal(noisy.x_train, ds.x_train)
    assert int(noisy.y_train.max()) < 10 and int(noisy.y_train.min()) >= 0
    again = add_label_noise(ds, 0.25, seed=7)
    assert torch.equal(again.y_train, noisy.y_train)
    other = add_label_noise(ds, 0.25, seed=8)
    assert not torch.equal(other.meta["noisy_indices"], idx)
    # the new labels are spread over the other classes
    assert len(set(noisy.y_train[idx].tolist())) >= 8
    with pytest.raises(ValueError, match="already has label noise"):
        add_label_noise(noisy, 0.1)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        add_label_noise(ds, 1.5)
    assert add_label_noise(ds, 0.0).meta["noisy_indices"].numel() == 0


def test_label_noise_pm1_and_regression():
    pm = binary_subset(load_digits(300, 50), (3, 5), targets="pm1")
    noisy = add_label_noise(pm, 0.2, seed=1)
    idx = noisy.meta["noisy_indices"]
    assert idx.numel() == round(0.2 * pm.n_train)
    assert torch.equal(noisy.y_train[idx], -pm.y_train[idx])
    reg = polynomial_task(50, 10, 5, seed=0)
    nreg = add_label_noise(reg, 0.5, seed=2)
    ridx = nreg.meta["noisy_indices"]
    assert ridx.numel() == 25
    # shuffled-label corruption: every corrupted target is another example's target
    for i in ridx.tolist():
        assert any(torch.equal(nreg.y_train[i], reg.y_train[j]) for j in range(50) if j != i)


def test_subsample_nested_and_meta():
    ds = add_label_noise(load_digits(400, 200, seed=0), 0.2, seed=0)
    s = subsample(ds, 100, 50, seed=3)
    assert s.n_train == 100 and s.n_test == 50
    assert torch.equal(s.meta["y_train_clean"][s.meta["noisy_indices"]] != s.y_train[
        s.meta["noisy_indices"]], torch.ones(s.meta["noisy_indices"].numel(), dtype=torch.bool))
    assert torch.equal(torch.nonzero(s.y_train != s.meta["y_train_clean"]).flatten(),
                       s.meta["noisy_indices"])
    big = subsample(ds, 200, None, seed=3)
    assert big.n_test == ds.n_test
    assert set(s.meta["train_idx"].tolist()) <= set(big.meta["train_idx"].tolist())
    assert torch.bincount(s.y_test, minlength=10).max() <= 6  # stratified
    with pytest.raises(ValueError, match="too many"):
        subsample(ds, 1000)


# ------------------------------------------------------------------------------------- MNIST


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    dt = {0x08: ">u1", 0x0D: ">f4"}[code]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return head + arr.astype(dt).tobytes()


def _write_mnist(folder: Path, n_train=40, n_test=20, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            raw = _idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
        data[prefix] = (images, labels)
    return data


def _area_oracle(img: np.ndarray, size: int) -> np.ndarray:
    """Adaptive average pooling written out: window [floor(i*H/s), ceil((i+1)*H/s))."""
    h, w = img.shape[-2:]
    out = np.empty(img.shape[:-2] + (size, size))
    for i in range(size):
        r0, r1 = (i * h) // size, -((-(i + 1) * h) // size)
        for j in range(size):
            c0, c1 = (j * w) // size, -((-(j + 1) * w) // size)
            out[..., i, j] = img[..., r0:r1, c0:c1].mean(axis=(-2, -1))
    return out


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    (tmp_path / "f.idx").write_bytes(_idx_bytes(arr, 0x0D))
    out = read_idx(tmp_path / "f.idx")
    assert out.shape == (2, 3, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_loader(tmp_path, gz):
    data = _write_mnist(tmp_path, gz=gz)
    ds = load_mnist_idx(tmp_path, standardize=False)
    assert ds.x_train.shape == (40, 784) and ds.x_test.shape == (20, 784) and ds.n_classes == 10
    tr = ds.meta["train_idx"].numpy()
    np.testing.assert_allclose(ds.x_train.numpy(), data["train"][0][tr].reshape(40, -1) / 255,
                               rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train.numpy(), data["train"][1][tr])
    # 8x8 area downsampling, class subset, relabeling, standardization
    small = load_mnist_idx(tmp_path, 6, 4, classes=(3, 5), size=8, seed=2, dtype=torch.float64)
    assert small.x_train.shape == (6, 64) and small.name == "mnist8x8[3,5]"
    tr = small.meta["train_idx"].numpy()
    assert set(data["train"][1][tr]) <= {3, 5}
    np.testing.assert_array_equal(small.y_train.numpy(), (data["train"][1][tr] == 5).astype(int))
    want = _area_oracle(data["train"][0][tr].astype(np.float64) / 255, 8).reshape(6, -1)
    mean, std = want.mean(0), want.std(0)
    np.testing.assert_allclose(small.x_train.numpy(), (want - mean) / std, rtol=1e-9, atol=1e-9)
    cnn = load_mnist_idx(tmp_path, 10, 5, size=8, flatten=False)
    assert cnn.x_train.shape == (10, 1, 8, 8)
    again = load_mnist_idx(tmp_path, 6, 4, classes=(3, 5), size=8, seed=2, dtype=torch.float64)
    assert torch.equal(again.x_train, small.x_train)


def test_mnist_idx_missing_and_malformed(tmp_path):
    with pytest.raises(MissingDataError, match="does not exist"):
        load_mnist_idx(tmp_path / "nowhere")
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"test labels \(t10k-labels-idx1-ubyte"):
        load_mnist_idx(tmp_path)
    _write_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(ValueError, match="not a valid IDX file: the magic number"):
        load_mnist_idx(tmp_path)
    images.write_bytes(good[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_mnist_idx(tmp_path)
    images.write_bytes(good[:3])
    with pytest.raises(ValueError, match="fewer than the 4-byte"):
        load_mnist_idx(tmp_path)
    images.write_bytes(bytes([0, 0, 0x42, 3]) + good[4:])
    with pytest.raises(ValueError, match="unknown data type code 0x42"):
        load_mnist_idx(tmp_path)
    images.write_bytes(_idx_bytes(np.zeros((30, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match="30 images but .* 40 labels"):
        load_mnist_idx(tmp_path)
    images.write_bytes(_idx_bytes(np.zeros((40, 784), np.uint8)))
    with pytest.raises(ValueError, match="images are 3-d"):
        load_mnist_idx(tmp_path)
    images.write_bytes(gzip.compress(good)[:30])
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        load_mnist_idx(tmp_path)


# ---------------------------------------------------------------------------------- CIFAR-10


def _write_cifar(folder: Path, per_batch=20, protocol=2, with_meta=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.permutation(np.arange(per_batch) % 10)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        out[name] = (data, np.array(labels))
    if with_meta:
        meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072,
                b"num_cases_per_batch": per_batch}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return out


def _cifar_oracle(data: np.ndarray) -> np.ndarray:
    img = data.reshape(-1, 3, 32, 32).astype(np.float64) / 255
    gray = 0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]
    return gray.reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(len(data), 64)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_cats_vs_dogs(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    raw = _write_cifar(folder, protocol=protocol)
    ds = load_cifar10(tmp_path, standardize=False)  # the parent folder is accepted
    assert ds.n_classes == 2 and ds.meta["classes"] == ("cat", "dog")
    assert ds.x_train.shape == (20, 64) and ds.x_test.shape == (4, 64)  # 2 cats + 2 dogs / batch
    assert ds.name == "cifar10[cat,dog]-gray8"
    x_all = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)])
    y_all = np.concatenate([raw[f"data_batch_{i}"][1] for i in range(1, 6)])
    tr = ds.meta["train_idx"].numpy()
    assert set(y_all[tr]) == {3, 5}
    np.testing.assert_array_equal(ds.y_train.numpy(), (y_all[tr] == 5).astype(int))
    np.testing.assert_allclose(ds.x_train.numpy(), _cifar_oracle(x_all[tr]), rtol=1e-5)
    std = load_cifar10(folder, n_train=8, n_test=2, seed=1, dtype=torch.float64)
    assert std.n_train == 8 and std.n_test == 2
    torch.testing.assert_close(std.x_train.mean(0), torch.zeros(64, dtype=torch.float64))
    rgb = load_cifar10(folder, classes=None, grayscale=False, size=None, flatten=False)
    assert rgb.x_train.shape == (100, 3, 32, 32) and rgb.n_classes == 10


def test_cifar10_archive_and_names(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, with_meta=False)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    a = load_cifar10(archive, classes=("airplane", 9), n_train=10)
    b = load_cifar10(folder, classes=(0, "truck"), n_train=10)
    assert torch.equal(a.x_train, b.x_train) and a.meta["classes"] == ("airplane", "truck")
    with pytest.raises(ValueError, match="unknown class 'wolf'.*'cat'"):
        load_cifar10(folder, classes=("cat", "wolf"))


def test_cifar10_missing_and_malformed(tmp_path):
    with pytest.raises(MissingDataError, match="does not exist"):
        load_cifar10(tmp_path / "nope")
    with pytest.raises(MissingDataError, match="no CIFAR-10 batches"):
        load_cifar10(tmp_path)
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(MissingDataError, match="data_batch_4"):
        load_cifar10(tmp_path)
    bad = {b"data": np.zeros((5, 100), np.uint8), b"labels": [0] * 5}
    (tmp_path / "data_batch_4").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_4: b'data' must be a \[N, 3072\]"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_4").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        load_cifar10(tmp_path)
    # a pickle that would call a function is refused, not run
    (tmp_path / "data_batch_4").write_bytes(pickle.dumps(print))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        load_cifar10(tmp_path)


# ------------------------------------------------------------------------------------ tables


def _frame(n=60, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "size": rng.normal(100, 20, n),
        "rooms": rng.integers(1, 6, n),
        "city": rng.choice(["oslo", "bergen", "tromso"], n),
        "price": rng.normal(5, 2, n),
        "kind": rng.choice(["flat", "house"], n),
    })


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".csv.gz"])
def test_load_table_csv_parquet(tmp_path, suffix):
    frame = _frame()
    path = tmp_path / f"homes{suffix}"
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
    ds = load_table(path, "price", n_train=40, n_test=20, seed=1)
    assert ds.name == "homes" and ds.n_classes is None
    assert ds.meta["feature_names"] == ["size", "rooms", "city=bergen", "city=oslo",
                                        "city=tromso", "kind=flat", "kind=house"]
    assert ds.x_train.shape == (40, 7) and ds.y_train.shape == (40, 1)
    tr, te = ds.meta["train_idx"].numpy(), ds.meta["test_idx"].numpy()
    assert sorted(np.concatenate([tr, te])) == list(range(60))
    # numeric columns standardized with training statistics, one-hot columns left 0/1
    size = frame["size"].to_numpy()
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(),
                               (size[te] - size[tr].mean()) / size[tr].std(), rtol=1e-4)
    np.testing.assert_array_equal(ds.x_train[:, 3].numpy(), (frame["city"].to_numpy()[tr] ==
                                                             "oslo").astype(np.float32))
    y = frame["price"].to_numpy()
    np.testing.assert_allclose(ds.y_train[:, 0].numpy() * ds.meta["y_std"] + ds.meta["y_mean"],
                               y[tr], rtol=1e-5)
    again = load_table(path, "price", n_train=40, n_test=20, seed=1)
    assert torch.equal(again.x_train, ds.x_train)
    cls = load_table(path, "kind", features=["size", "city"], task="classification")
    assert cls.n_classes == 2 and cls.meta["class_names"] == ["flat", "house"]
    assert cls.x_train.shape[1] == 4 and cls.n_train + cls.n_test == 60
    assert cls.y_train.dtype == torch.int64


def test_load_table_errors(tmp_path):
    frame = _frame()
    path = tmp_path / "homes.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"target column 'cost' not found; the columns are "
                                         r"\['size', 'rooms', 'city', 'price', 'kind'\]"):
        load_table(path, "cost")
    with pytest.raises(ValueError, match=r"feature column\(s\) \['area'\] not found"):
        load_table(path, "price", features=["size", "area"])
    with pytest.raises(ValueError, match="not numeric.*task='classification'"):
        load_table(path, "city")
    with pytest.raises(MissingDataError, match="does not exist"):
        load_table(tmp_path / "absent.csv", "price")
    (tmp_path / "homes.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unknown table format '.xlsx'"):
        load_table(tmp_path / "homes.xlsx", "price")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="could not read .*bad.parquet as PARQUET"):
        load_table(tmp_path / "bad.parquet", "price")
    (tmp_path / "ragged.csv").write_text("a,b,price\n1,2,3\n4,5,6,7,8\n")
    with pytest.raises(ValueError, match="could not read .*ragged.csv as CSV"):
        load_table(tmp_path / "ragged.csv", "price")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="could not read"):
        load_table(tmp_path / "empty.csv", "price")
    holes = frame.copy()
    holes.loc[[3, 7], "size"] = np.nan
    holes.to_csv(tmp_path / "holes.csv", index=False)
    ds = load_table(tmp_path / "holes.csv", "price")
    assert ds.meta["n_dropped"] == 2 and ds.n_train + ds.n_test == 58
    with pytest.raises(ValueError, match=r"missing values in columns \{'size': 2\}"):
        load_table(tmp_path / "holes.csv", "price", missing="error")


def test_bundled_table():
    ds = load_bundled_table("diabetes", n_test=42)
    assert ds.n_test == 42 and ds.n_train == 400 and ds.x_train.shape[1] == 10
    with pytest.raises(ValueError, match="unknown bundled table"):
        load_bundled_table("housing")


# ------------------------------------------------------------------------------ ARFF / OpenML

_ARFF = """% a toy copy of a housing table
@relation 'toy houses'

@attribute rowid numeric
@attribute 'median income' real
@attribute rooms INTEGER
@attribute ocean {NEAR,INLAND,ISLAND}
@attribute price numeric

@data
1,8.3,6,NEAR,4.5
2,7.2,5,INLAND,3.5
% a comment inside the data
3,5.6,7,NEAR,3.52
4,3.8,4,ISLAND,3.41
5,4.0,3,INLAND,?
6,6.1,6,NEAR,2.69
7,2.1,2,INLAND,1.99
8,9.9,8,NEAR,5.0
9,1.5,3,INLAND,1.2
10,6.6,5,NEAR,3.3
"""


def test_read_arff_types_and_quoting(tmp_path):
    path = tmp_path / "t.arff"
    path.write_text(_ARFF)
    frame, info = read_arff(path)
    assert info["relation"] == "toy houses"
    assert list(frame.columns) == ["rowid", "median income", "rooms", "ocean", "price"]
    assert frame["rooms"].dtype == np.float64 and frame.shape == (10, 5)
    assert list(frame["ocean"].cat.categories) == ["NEAR", "INLAND", "ISLAND"]
    assert math.isnan(frame["price"][4]) and frame["price"][0] == 4.5
    quoted = ("@relation q\n@attribute 'a b' numeric\n@attribute c {'x y',z,'u, v'}\n@data\n"
              "1.5,'x y'\n2,z\n3,'u, v'\n?,?\n")
    (tmp_path / "q.arff.gz").write_bytes(gzip.compress(quoted.encode()))
    q, _ = read_arff(tmp_path / "q.arff.gz")
    assert q["a b"].tolist()[:3] == [1.5, 2.0, 3.0]
    assert q["c"].tolist()[:3] == ["x y", "z", "u, v"]  # nominal values are str, not bytes
    assert q.isna().iloc[3].all()
    # scipy.io.arff reads no string attributes: a clear error, not a crash
    (tmp_path / "s.arff").write_text("@relation s\n@attribute a string\n@data\n'hello'\n")
    with pytest.raises(ValueError, match="String attributes not supported.*load_table"):
        read_arff(tmp_path / "s.arff")


@pytest.mark.parametrize(
    ("text", "match"),
    [("@relation r\n@attribute a numeric\n@attribute b numeric\n@data\n1,2\n3\n",
      r"a @data row has fewer values than there are attributes"),
     ("@relation r\n@attribute a numeric\n@data\n1\nabc\n",
      r"could not convert string to float: 'abc'"),
     ("@relation r\n@attribute a {x,y}\n@data\nx\nw\n", r"w value not in \('x', 'y'\)"),
     ("@relation r\n@attribute a numeric\n", "no @data section"),
     ("a,b\n1,2\n", "not ARFF"),
     ("@relation r\n@attribute a numeric\n@data\n{0 1}\n", r"'\{0 1\}'.*reads dense ARFF"),
     ("@relation r\n@attribute a relational\n@data\n", "Error while parsing header")],
)
def test_read_arff_malformed(tmp_path, text, match):
    path = tmp_path / "bad.arff"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_arff(path)


def _features_json():
    kinds = [("rowid", "numeric"), ("median income", "numeric"), ("rooms", "numeric"),
             ("ocean", "nominal"), ("price", "numeric")]
    return {"data_features": {"feature": [
        {"index": str(i), "name": n, "data_type": t, "is_target": str(n == "price").lower(),
         "is_ignore": "false", "is_row_identifier": str(n == "rowid").lower(),
         "number_of_missing_values": "0"} | ({"nominal_value": ["NEAR", "INLAND", "ISLAND"]}
                                           if t == "nominal" else {})
        for i, (n, t) in enumerate(kinds)]}}


def _openml_responses(did=4242, file_id=99):
    """The JSON and ARFF documents OpenML serves for a toy data set, by URL path."""
    arff = _ARFF.replace("5,4.0,3,INLAND,?", "5,4.0,3,INLAND,2.5").encode()
    desc = {"data_set_description": {
        "id": str(did), "name": "toyhouses", "version": "1", "format": "ARFF",
        "description": "toy", "upload_date": "2024-01-01T00:00:00", "licence": "Public",
        "url": f"https://api.openml.org/data/v1/download/{file_id}/toyhouses.arff",
        "file_id": str(file_id), "default_target_attribute": "price",
        "row_id_attribute": "rowid", "status": "active", "visibility": "public",
        "md5_checksum": hashlib.md5(arff).hexdigest()}}
    listing = {"data": {"dataset": [{"did": did, "name": "toyhouses", "version": 1,
                                     "status": "active", "format": "ARFF"}]}}
    quality = {"data_qualities": {"quality": [{"name": "NumberOfInstances", "value": "10.0"}]}}
    return arff, {
        "/api/v1/json/data/list/data_name/toyhouses/limit/2/status/active/": listing,
        f"/api/v1/json/data/{did}": desc,
        f"/api/v1/json/data/features/{did}": _features_json(),
        f"/api/v1/json/data/qualities/{did}": quality,
        f"/data/v1/download/{file_id}/toyhouses.arff": arff,
    }


def _write_openml_cache(data_home: Path, did=4242, file_id=99):
    """The cache layout of fetch_openml(data_home=...) (sklearn's ``_open_openml_url``: the URL's
    path under ``data_home/openml/openml.org``, plus ``.gz``), written by hand."""
    _, docs = _openml_responses(did, file_id)
    root = data_home / "openml" / "openml.org"
    for url_path, doc in docs.items():
        local = root / (url_path.lstrip("/") + ".gz")
        local.parent.mkdir(parents=True, exist_ok=True)
        raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        local.write_bytes(gzip.compress(raw))
    return root


def _check_toyhouses(ds: Dataset):
    assert ds.n_classes is None and ds.n_train + ds.n_test == 10
    assert ds.meta["feature_names"] == ["median income", "rooms", "ocean=NEAR", "ocean=INLAND",
                                        "ocean=ISLAND"]  # rowid ignored, price the target
    assert ds.meta["openml_id"] == 4242 and ds.name == "toyhouses"


def _no_network(monkeypatch):
    """Make any attempt of fetch_openml to go online fail the test."""
    import sklearn.datasets._openml as sk_openml

    def urlopen(request, *args, **kwargs):
        raise AssertionError(f"fetch_openml went online: {request.full_url}")

    monkeypatch.setattr(sk_openml, "urlopen", urlopen)


def test_openml_cache_layout(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    root = _write_openml_cache(tmp_path)
    by_name = load_openml_cache(tmp_path, "toyhouses", n_train=7, n_test=3, seed=0)
    _check_toyhouses(by_name)
    by_id = load_openml_cache(tmp_path / "openml", 4242, n_train=7, n_test=3, seed=0)
    assert torch.equal(by_id.x_train, by_name.x_train)
    by_root = load_openml_cache(root, "4242", n_train=7, n_test=3, seed=0)
    assert torch.equal(by_root.y_test, by_name.y_test)
    rooms = load_openml_cache(tmp_path, "toyhouses", target="rooms", features=["price"])
    assert rooms.meta["feature_names"] == ["price"]
    with pytest.raises(MissingDataError, match="fetch_openml\\('california', data_home="):
        load_openml_cache(tmp_path, "california")
    with pytest.raises(ValueError, match="target column 'value' not found"):
        load_openml_cache(tmp_path, "toyhouses", target="value")
    # a corrupt cached description is reported as such
    (root / "api/v1/json/data/4242.gz").write_bytes(gzip.compress(b"{not json"))
    with pytest.raises(ValueError, match="not a \\(gzipped\\) JSON file"):
        load_openml_cache(tmp_path, 4242)
    assert (root / "api/v1/json/data/4242.gz").is_file()  # not deleted by sklearn's retry


@pytest.mark.parametrize("part", ["api/v1/json/data/qualities/4242.gz",
                                  "api/v1/json/data/features/4242.gz",
                                  "data/v1/download/99/toyhouses.arff.gz"])
def test_openml_incomplete_cache_is_reported_offline(tmp_path, monkeypatch, part):
    """A cache that lacks a file fetch_openml needs: a MissingDataError naming the file and how
    to fill the cache, before fetch_openml could try the network."""
    _no_network(monkeypatch)
    root = _write_openml_cache(tmp_path)
    (root / part).unlink()
    with pytest.raises(MissingDataError, match=f"{part}.*fetch_openml\\('toyhouses', data_home="
                                               f"'{tmp_path}'\\)"):
        load_openml_cache(tmp_path, "toyhouses")
    with pytest.raises(MissingDataError, match="fetch_openml\\(data_id=4242, data_home="):
        load_openml_cache(tmp_path, 4242)


def test_openml_corrupt_or_misplaced_cache(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    root = _write_openml_cache(tmp_path)
    data = root / "data/v1/download/99/toyhouses.arff.gz"
    data.write_bytes(gzip.compress(b"@relation x\n@data\n"))
    with pytest.raises(ValueError, match="MD5 checksum.*fetch the data set again"):
        load_openml_cache(tmp_path, "toyhouses")
    assert data.is_file()
    moved = tmp_path / "elsewhere"
    root.rename(moved)  # api/v1 directly in a folder that is not DIR/openml/openml.org
    with pytest.raises(ValueError, match="only from DIR/openml/openml.org"):
        load_openml_cache(moved, "toyhouses")


def test_openml_cache_written_by_sklearn(tmp_path, monkeypatch):
    """Fill the cache with scikit-learn's own fetch_openml (network replaced by the fixture)."""
    import sklearn.datasets._openml as sk_openml

    if not hasattr(sk_openml, "urlopen"):
        pytest.skip("this scikit-learn fetches OpenML differently")
    _, docs = _openml_responses()

    class Response(io.BytesIO):
        def info(self):
            return {}

    def fake_urlopen(request, *args, **kwargs):
        path = request.full_url.split("openml.org", 1)[1]
        doc = docs[path]
        return Response(doc if isinstance(doc, bytes) else json.dumps(doc).encode())

    monkeypatch.setattr(sk_openml, "urlopen", fake_urlopen)
    bunch = sk_openml.fetch_openml("toyhouses", data_home=str(tmp_path), parser="pandas",
                                   as_frame=True)
    _no_network(monkeypatch)  # the loader reads what sklearn cached, offline
    ds = load_openml_cache(tmp_path, "toyhouses", n_train=7, n_test=3, standardize=False,
                           standardize_target=False, dtype=torch.float64)
    _check_toyhouses(ds)
    frame = bunch.frame
    rows = ds.meta["train_idx"].numpy()
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(),
                               frame["median income"].to_numpy(dtype=float)[rows])
    np.testing.assert_allclose(ds.y_train[:, 0].numpy(), bunch.target.to_numpy(dtype=float)[rows])
    ocean = frame["ocean"].astype(str).to_numpy()[rows]
    np.testing.assert_array_equal(ds.x_train[:, 3].numpy(), (ocean == "INLAND").astype(float))


def test_openml_plain_directory(tmp_path):
    _frame().to_csv(tmp_path / "Homes.csv", index=False)
    ds = load_openml_cache(tmp_path, "homes", target="price")
    assert ds.n_train + ds.n_test == 60
    with pytest.raises(ValueError, match="no single default target.*pass target="):
        load_openml_cache(tmp_path, "homes")
    (tmp_path / "toy.arff").write_text(_ARFF)
    arff = load_openml_cache(tmp_path, "toy")  # ARFF: the last attribute is the target
    assert arff.meta["target"] == "price" and arff.meta["n_dropped"] == 1
    with pytest.raises(MissingDataError, match="no data set 'houses'"):
        load_openml_cache(tmp_path, "houses")


# ------------------------------------------------------------------------------ irregularity


def test_irregularity_split_against_numpy_pca():
    rng = np.random.default_rng(0)
    n, d = 200, 5
    x = rng.normal(size=(n, d)) * np.array([3.0, 1.0, 0.5, 0.2, 0.1]) @ np.linalg.qr(
        rng.normal(size=(d, d)))[0]
    y = rng.normal(size=(n, 1))
    split = irregularity_split(torch.tensor(x), torch.tensor(y), (0.0, 0.3, 1.0), n_test=40,
                               seed=5)
    # independent PCA: leading eigenvector of the covariance
    xc = x - x.mean(0)
    evals, evecs = np.linalg.eigh(xc.T @ xc)
    v = evecs[:, -1]
    r = np.abs(xc @ v)
    np.testing.assert_allclose(split.score.numpy(), r, rtol=1e-8)
    assert abs(abs(float(split.direction.numpy() @ v)) - 1) < 1e-10
    most = np.argsort(-r, kind="stable")
    assert split.n_irregular == [0, 12, 40]
    assert torch.equal(split.irregular_idx, torch.from_numpy(most[:40]))
    assert torch.equal(split.test_idx[2], torch.from_numpy(most[:40]))  # f = 1: most irregular
    assert torch.equal(split.test_idx[1][:12], torch.from_numpy(most[:12]))
    regular = split.test_idx[0]
    assert not set(regular.tolist()) & set(most[:40].tolist())
    assert torch.equal(split.test_idx[1][12:], regular[:28])
    train = set(split.train_idx.tolist())
    assert len(train) == n - 80 and not train & set(most[:40].tolist())
    assert not train & set(regular.tolist())
    # the training set never reaches the irregular points along the component
    assert r[split.train_idx.numpy()].max() <= r[most[39]]
    x_te, y_te = split.tests[1]
    torch.testing.assert_close(x_te, torch.tensor(x)[split.test_idx[1]])
    torch.testing.assert_close(split.y_train, torch.tensor(y)[split.train_idx])
    ds = split.dataset(2)
    assert ds.n_test == 40 and ds.meta["fraction"] == 1.0
    same = irregularity_split(torch.tensor(x), torch.tensor(y), (0.0, 0.3, 1.0), n_test=40,
                              seed=5)
    assert torch.equal(same.train_idx, split.train_idx)
    with pytest.raises(ValueError, match="too few"):
        irregularity_split(x, y, (1.0,), n_test=150)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        irregularity_split(x, y, (0.5, 2.0))
    from_ds = irregularity_split(load_bundled_table("diabetes"), fractions=(0.5,), n_test=50)
    assert from_ds.tests[0][0].shape == (50, 10) and from_ds.n_irregular == [25]


# ------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_modular_arithmetic_table(op):
    p = 11
    ds = modular_arithmetic(p, op=op, train_fraction=0.3, seed=2)
    n = p * p if op != "div" else p * (p - 1)
    assert ds.n_train == round(0.3 * n) and ds.n_train + ds.n_test == n and ds.n_classes == p
    x = torch.cat([ds.x_train, ds.x_test])
    y = torch.cat([ds.y_train, ds.y_test])
    assert x.shape == (n, 2) and x.dtype == torch.int64
    pairs = {(a, b) for a, b in x.tolist()}
    assert len(pairs) == n  # every pair exactly once, train and test disjoint
    for (a, b), c in zip(x.tolist(), y.tolist(), strict=True):
        want = {"add": (a + b) % p, "sub": (a - b) % p, "mul": (a * b) % p}.get(op)
        if op == "div":
            assert (c * b) % p == a % p  # c = a / b: c * b == a (mod p)
        else:
            assert c == want
    tr = set(ds.meta["train_pairs"].tolist())
    assert tr == {a * p + b for a, b in ds.x_train.tolist()}


def test_modular_arithmetic_formats():
    ds = modular_arithmetic(7, equals=True, train_fraction=0.5, seed=0)
    assert ds.x_train.shape[1] == 3 and (ds.x_train[:, 2] == 7).all()
    assert ds.meta["vocab_size"] == 8 and ds.meta["equals_token"] == 7
    oh = modular_arithmetic(7, encoding="onehot", train_fraction=0.5, seed=0)
    assert oh.x_train.shape == (ds.n_train, 14) and oh.x_train.dtype == torch.float32
    assert torch.equal(oh.x_train[:, :7].argmax(1), ds.x_train[:, 0])
    assert torch.equal(oh.x_train[:, 7:].argmax(1), ds.x_train[:, 1])
    assert torch.equal(oh.y_train, ds.y_train)
    again = modular_arithmetic(7, equals=True, train_fraction=0.5, seed=0)
    assert torch.equal(again.x_train, ds.x_train)
    with pytest.raises(ValueError, match="prime"):
        modular_arithmetic(12, op="div")
    with pytest.raises(ValueError, match="op must be one of"):
        modular_arithmetic(7, op="pow")


def test_polynomial_task():
    ds = polynomial_task(50, 20, 10, epsilon=0.1, seed=3, dtype=torch.float64)
    beta = ds.meta["beta"].numpy()
    x = ds.x_test.numpy()
    np.testing.assert_allclose(ds.y_test[:, 0].numpy(), 0.5 * (x @ beta[0]) ** 2, rtol=1e-12)
    np.testing.assert_allclose(ds.y_train[:, 0].numpy(),
                               0.5 * (ds.x_train.numpy() @ beta[0]) ** 2, rtol=1e-12)
    assert ds.meta["epsilon"] == 0.1 and ds.n_classes is None
    bigger = polynomial_task(80, 20, 10, epsilon=0.1, seed=3, dtype=torch.float64)
    assert torch.equal(bigger.x_train[:50], ds.x_train) and torch.equal(bigger.x_test, ds.x_test)
    cubic = polynomial_task(30, 5, 8, degree=3, n_directions=2, seed=0, dtype=torch.float64)
    b = cubic.meta["beta"].numpy()
    z = cubic.x_train.numpy() @ b.T
    np.testing.assert_allclose(cubic.y_train[:, 0].numpy(),
                               (z**3).sum(1) / 6 / math.sqrt(2), rtol=1e-12)
    h = torch.linspace(-2, 2, 5)
    torch.testing.assert_close(polynomial_activation(h, 0.2), h + 0.1 * h**2)


def test_sequence_tasks(tmp_path):
    flat = load_mnist1d(60, 20, seed=1, cache_dir=tmp_path)
    seq = mnist1d_patches(60, 20, patch=4, seed=1, cache_dir=tmp_path)
    assert seq.x_train.shape == (60, 10, 4) and seq.meta["seq_len"] == 10
    assert torch.equal(seq.x_train.reshape(60, 40), flat.x_train)
    assert torch.equal(seq.y_train, flat.y_train)
    with pytest.raises(ValueError, match="must divide"):
        mnist1d_patches(60, 20, patch=3, cache_dir=tmp_path)
    rows = sequence_task("digits-rows", 50, 10)
    assert rows.x_train.shape == (50, 8, 8)
    with pytest.raises(ValueError, match="unknown sequence task"):
        sequence_task("words")


def test_load_dataset_by_name(tmp_path):
    assert "cifar10" in DATASETS and "digits" in DATASETS
    ds = load_dataset("digits", n_train=50, n_test=10)
    assert ds.n_train == 50
    with pytest.raises(ValueError, match="--set data.path"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="does not read files"):
        load_dataset("digits", path=tmp_path)
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        load_dataset("imagenet")
    _frame().to_csv(tmp_path / "h.csv", index=False)
    assert load_dataset("table", tmp_path / "h.csv", target="price").n_train == 48
