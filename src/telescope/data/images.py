"""Real image data read from files the user provides: MNIST (IDX format) and CIFAR-10 (python).

Nothing is downloaded. Point the loaders at the files you have (``--set data.path=DIR`` in a
study):

- MNIST: the four IDX files of http://yann.lecun.com/exdb/mnist/ (or a mirror), gzipped or not:
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte`` (``.gz`` optional; the ``train-images.idx3-ubyte`` spelling of some
  mirrors and torchvision's ``DIR/MNIST/raw/`` layout are found too). Fashion-MNIST uses the same
  names and format, so it loads the same way.
- CIFAR-10: the "python version" (``cifar-10-python.tar.gz``), either the archive itself or its
  extracted ``cifar-10-batches-py/`` folder with ``data_batch_1`` .. ``data_batch_5``,
  ``test_batch`` and ``batches.meta``.

The IDX header is parsed here with NumPy (no third-party reader). The CIFAR batches are pickles;
they are read with an unpickler that only admits the NumPy array constructors such a batch needs,
so a file from elsewhere cannot run code.

Downsampling (the paper uses 8x8 images) is area averaging with
``torch.nn.functional.adaptive_avg_pool2d``: output pixel ``(i, j)`` is the mean of input rows
``floor(i*H/s) .. ceil((i+1)*H/s) - 1`` and the same columns. For CIFAR-10 (32 -> 8) these are
exact, disjoint 4x4 blocks; for MNIST (28 -> 8) the windows are 4 or 5 pixels wide and neighbouring
windows share a row or column where 28/8 is fractional.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from telescope.data import Dataset
from telescope.data import _util as U
from telescope.data._util import MissingDataError
from telescope.errors import UsageError

__all__ = ["read_idx", "area_downsample", "load_mnist_idx", "load_cifar10", "CIFAR10_CLASSES"]

# IDX type codes (third byte of the magic number) and their big-endian NumPy dtypes
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


# --------------------------------------------------------------------------------------- IDX


def _parse_idx(raw: bytes, where: str) -> np.ndarray:
    def bad(msg: str) -> ValueError:
        return ValueError(
            f"{where} is not a valid IDX file: {msg}. MNIST files start with the magic number "
            "0x00000803 (images) or 0x00000801 (labels); re-download the file (and gunzip it "
            "only once) if it is damaged"
        )

    if len(raw) < 4:
        raise bad(f"it has {len(raw)} bytes, fewer than the 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0:
        raise bad(f"the magic number starts with bytes {raw[0]:#04x} {raw[1]:#04x}, not 0x00 0x00")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise bad(f"unknown data type code {code:#04x} (known: "
                  f"{', '.join(f'{c:#04x}' for c in _IDX_TYPES)})")
    if ndim == 0:
        raise bad("it declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise bad(f"the header of {ndim} dimensions needs {header} bytes, the file has {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "followed by extra bytes"
        raise bad(f"dimensions {dims} of {dtype.itemsize}-byte values need {expected} bytes, the "
                  f"file has {len(raw)} ({what})")
    arr = np.frombuffer(raw, dtype=dtype, count=int(np.prod(dims, dtype=np.int64)), offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not) into a NumPy array of its declared shape.

    The header is a 4-byte magic number -- two zero bytes, a type code (``0x08`` unsigned byte,
    ``0x09`` signed byte, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64) and
    the number of dimensions ``n`` -- followed by ``n`` big-endian ``uint32`` sizes and the values
    in row-major, big-endian order. Raises ``ValueError`` naming the problem when the magic number
    is wrong or the file size does not match the header (truncated or padded files).
    """
    p = U.as_path(path, "read_idx")
    if not p.is_file():
        raise MissingDataError(f"IDX file {p} does not exist")
    return _parse_idx(U.read_bytes(p), str(p))


def area_downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Area-average ``[N, H, W]`` or ``[N, C, H, W]`` images to ``size x size`` (float64).

    Uses ``torch.nn.functional.adaptive_avg_pool2d`` (see the module docstring for the windows).
    """
    size = U.check_int("size", size, 1)
    a = np.asarray(images, dtype=np.float64)
    if a.ndim not in (3, 4):
        raise UsageError(f"images must be [N, H, W] or [N, C, H, W], got shape {a.shape}")
    t = torch.from_numpy(np.ascontiguousarray(a))
    squeeze = t.ndim == 3
    if squeeze:
        t = t.unsqueeze(1)
    if size > t.shape[-1] or size > t.shape[-2]:
        raise UsageError(f"size {size} is larger than the images ({t.shape[-2]}x{t.shape[-1]})")
    out = torch.nn.functional.adaptive_avg_pool2d(t, size)
    return (out.squeeze(1) if squeeze else out).numpy()


_MNIST_FILES = {
    "train images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_mnist(root: Path) -> dict[str, Path]:
    if not root.exists():
        raise MissingDataError(
            f"MNIST directory {root} does not exist; pass the directory holding the IDX files "
            f"({', '.join(v[0] for v in _MNIST_FILES.values())}, optionally .gz)"
        )
    if not root.is_dir():
        raise UsageError(f"MNIST path {root} is a file; pass the directory holding the IDX files")
    folders = [root, root / "MNIST" / "raw", root / "raw"]
    found: dict[str, Path] = {}
    for key, names in _MNIST_FILES.items():
        for folder in folders:
            hits = [folder / (n + ext) for n in names for ext in ("", ".gz")
                    if (folder / (n + ext)).is_file()]
            if hits:
                found[key] = hits[0]
                break
    missing = [k for k in _MNIST_FILES if k not in found]
    if missing:
        listing = sorted(p.name for p in root.iterdir())[:20]
        raise MissingDataError(
            f"MNIST files missing in {root}: "
            + "; ".join(f"{k} ({_MNIST_FILES[k][0]}[.gz])" for k in missing)
            + f". The directory holds {listing}. Put the four IDX files of MNIST there "
            "(gzipped or not) and pass the directory."
        )
    return found


def _read_mnist_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise UsageError(f"{images_path} holds an array of shape {images.shape}; MNIST images "
                         "are 3-d [N, rows, cols] (magic number 0x00000803)")
    if labels.ndim != 1:
        raise UsageError(f"{labels_path} holds an array of shape {labels.shape}; MNIST labels "
                         "are 1-d [N] (magic number 0x00000801)")
    if images.shape[0] != labels.shape[0]:
        raise UsageError(f"{images_path} has {images.shape[0]} images but {labels_path} has "
                         f"{labels.shape[0]} labels; the files do not belong together")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UsageError(f"{labels_path}: labels must be digits 0..9, found range "
                         f"[{labels.min()}, {labels.max()}]")
    return images, labels.astype(np.int64)


def _prepare(
    x_tr: np.ndarray, x_te: np.ndarray, scale: float, standardize: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    x_tr = x_tr.reshape(x_tr.shape[0], -1) / scale
    x_te = x_te.reshape(x_te.shape[0], -1) / scale
    if standardize:
        return U.standardize(x_tr, x_te)
    return x_tr, x_te, None, None


def _image_dataset(
    x_tr, x_te, y_tr, y_te, shape, flatten, standardize, scale, dtype, n_classes, name, meta
) -> Dataset:
    x_tr, x_te, mean, std = _prepare(x_tr, x_te, scale, standardize)
    if not flatten:
        x_tr = x_tr.reshape((-1, *shape))
        x_te = x_te.reshape((-1, *shape))
        mean = None if mean is None else mean.reshape(shape)
        std = None if std is None else std.reshape(shape)
    return Dataset(
        x_train=U.tensor(x_tr, dtype), y_train=U.labels_tensor(y_tr),
        x_test=U.tensor(x_te, dtype), y_test=U.labels_tensor(y_te),
        n_classes=n_classes, name=name,
        x_mean=None if mean is None else U.tensor(mean, dtype),
        x_std=None if std is None else U.tensor(std, dtype),
        meta=meta,
    )


def load_mnist_idx(
    path: str | os.PathLike[str],
    n_train: int | None = None,
    n_test: int | None = None,
    *,
    classes: Sequence[int] | None = None,
    size: int | None = None,
    seed: int = 0,
    standardize: bool = True,
    flatten: bool = True,
    stratify: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """MNIST from its IDX files in directory ``path`` (see the module docstring for the names).

    The training set is drawn from the official 60 000 training images and the test set from the
    official 10 000 test images: seeded random subsets, stratified by class by default (every
    prefix of the order holds each class in proportion, so subsets of one seed are nested).

    Parameters
    ----------
    path : str or path
        Directory holding the four IDX files (``.gz`` or not). Missing files raise
        :class:`MissingDataError` (a ``FileNotFoundError`` and ``ValueError``) listing them;
        malformed files raise ``ValueError`` naming the file and the problem.
    n_train, n_test : int or None
        Sizes; ``None`` takes the whole official split (of the selected classes).
    classes : sequence of int, optional
        Digits to keep, e.g. ``(3, 5)``, relabeled by position (``classes[i]`` becomes ``i``).
    size : int, optional
        Downsample to ``size x size`` by area averaging (``size=8`` is the paper's 8x8 MNIST);
        ``None`` keeps 28x28.
    seed : int, default 0
        Seed of the subsets.
    standardize : bool, default True
        Standardize each pixel with the training mean and population std (constant pixels keep
        scale 1); otherwise pixels are scaled to ``[0, 1]``.
    flatten : bool, default True
        ``[N, size*size]`` inputs; ``False`` gives ``[N, 1, size, size]`` for CNNs.
    stratify : bool, default True
        Stratify the subsets by class.
    dtype : torch.dtype, default torch.float32
        Floating dtype of the inputs (labels are ``int64``).
    """
    root = U.as_path(path, "load_mnist_idx")
    dtype = U.check_dtype(dtype)
    cls = U.check_classes(classes, 10)
    files = _find_mnist(root)
    x_tr_all, y_tr_all = _read_mnist_split(files["train images"], files["train labels"])
    x_te_all, y_te_all = _read_mnist_split(files["test images"], files["test labels"])
    if x_tr_all.shape[1:] != x_te_all.shape[1:]:
        raise UsageError(f"training images are {x_tr_all.shape[1:]} but test images are "
                         f"{x_te_all.shape[1:]}; the files are from different data sets")
    keep_tr, y_tr = U.relabel(y_tr_all, cls)
    keep_te, y_te = U.relabel(y_te_all, cls)
    n_tr = U.take(keep_tr.size, n_train, "n_train", f"the MNIST training set of classes {cls}")
    n_te = U.take(keep_te.size, n_test, "n_test", f"the MNIST test set of classes {cls}")
    tr = U.order(y_tr, keep_tr.size, seed, U.SPLIT, stratify)[:n_tr]
    te = U.order(y_te, keep_te.size, seed, U.SUBSAMPLE_TEST, stratify)[:n_te]
    x_tr, x_te = x_tr_all[keep_tr[tr]], x_te_all[keep_te[te]]
    if size is not None:
        x_tr, x_te = area_downsample(x_tr, size), area_downsample(x_te, size)
    shape = (1, *x_tr.shape[1:])
    tag = "" if size is None else f"{size}x{size}"
    name = f"mnist{tag}" + ("" if classes is None else f"[{','.join(map(str, cls))}]")
    meta = {"seed": seed, "classes": cls, "size": size, "source": str(root),
            "train_idx": torch.from_numpy(keep_tr[tr]), "test_idx": torch.from_numpy(keep_te[te]),
            "image_shape": shape}
    return _image_dataset(x_tr, x_te, y_tr[tr], y_te[te], shape, flatten, standardize, 255.0,
                          dtype, len(cls), name, meta)


# ---------------------------------------------------------------------------------- CIFAR-10

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that only constructs NumPy arrays and builtin containers."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _unpickle(raw: bytes, where: str) -> object:
    try:
        return _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:
        raise UsageError(
            f"{where} is not a CIFAR-10 python batch (could not unpickle it: {err}); use the "
            "'CIFAR-10 python version' files (cifar-10-python.tar.gz)"
        ) from err


_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _cifar_files(path: Path) -> tuple[dict[str, bytes], str]:
    """The raw bytes of the batch files (and ``batches.meta`` if present), and their location."""
    wanted = (*_CIFAR_BATCHES, "batches.meta")
    if not path.exists():
        raise MissingDataError(
            f"CIFAR-10 path {path} does not exist; pass the extracted cifar-10-batches-py "
            "directory (data_batch_1..5, test_batch, batches.meta) or cifar-10-python.tar.gz"
        )
    archive = None
    if path.is_file():
        archive = path
    else:
        for folder in (path, path / "cifar-10-batches-py"):
            if (folder / "test_batch").is_file() or (folder / "data_batch_1").is_file():
                out = {n: (folder / n).read_bytes() for n in wanted if (folder / n).is_file()}
                return out, str(folder)
        if (path / "cifar-10-python.tar.gz").is_file():
            archive = path / "cifar-10-python.tar.gz"
    if archive is None:
        listing = sorted(p.name for p in path.iterdir())[:20]
        raise MissingDataError(
            f"no CIFAR-10 batches in {path} (it holds {listing}); expected data_batch_1..5, "
            "test_batch and batches.meta (the extracted cifar-10-batches-py folder), or "
            "cifar-10-python.tar.gz"
        )
    try:
        with tarfile.open(archive, "r:*") as tar:
            out = {}
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted:
                    out[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UsageError(f"{archive} is not a readable tar archive ({err}); download "
                         "cifar-10-python.tar.gz again") from err
    return out, str(archive)


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(raw, where)
    if not isinstance(batch, dict):
        raise UsageError(f"{where}: a CIFAR-10 batch is a dict, got {type(batch).__name__}")
    get = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in get or "labels" not in get:
        raise UsageError(f"{where}: a CIFAR-10 batch has keys b'data' and b'labels', found "
                         f"{sorted(map(str, get))}")
    data, labels = get["data"], np.asarray(get["labels"])
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        raise UsageError(f"{where}: b'data' must be a [N, 3072] uint8 array (3x32x32 images, "
                         f"channel-major), got {getattr(data, 'shape', type(data).__name__)}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise UsageError(f"{where}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
                        or labels.max() > 9):
        raise UsageError(f"{where}: labels must be ints in 0..9")
    return data, labels.astype(np.int64)


def load_cifar10(
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str | int] | None = ("cat", "dog"),
    grayscale: bool = True,
    size: int | None = 8,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    standardize: bool = True,
    flatten: bool = True,
    stratify: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """CIFAR-10 from its python batches, by default the paper's cats-vs-dogs, grayscale, 8x8.

    Parameters
    ----------
    path : str or path
        The extracted ``cifar-10-batches-py`` directory (or its parent), or the archive
        ``cifar-10-python.tar.gz``. Missing batches raise :class:`MissingDataError`; malformed
        ones ``ValueError`` naming the file.
    classes : sequence of str or int, optional
        Class names (from ``batches.meta``; the standard ten if it is absent) or indices,
        relabeled by position: the default ``("cat", "dog")`` gives cat = 0, dog = 1. ``None``
        keeps all ten. An unknown name is a ``ValueError`` listing the names.
    grayscale : bool, default True
        Convert to luminance ``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601 weights).
    size : int or None, default 8
        Area-average to ``size x size`` (32 -> 8 averages disjoint 4x4 blocks); ``None`` keeps
        32x32.
    n_train, n_test : int or None
        Seeded subsets of the official training batches (``data_batch_1..5``) and of
        ``test_batch``; ``None`` takes all images of the selected classes.
    seed, standardize, flatten, stratify, dtype
        As in :func:`load_mnist_idx`: pixels are scaled to ``[0, 1]`` and, with ``standardize``,
        standardized per feature with the training statistics; ``flatten=False`` gives
        ``[N, C, size, size]`` (``C`` = 1 for grayscale, else 3).
    """
    root = U.as_path(path, "load_cifar10")
    dtype = U.check_dtype(dtype)
    if size is not None:
        size = U.check_int("size", size, 1)
        if size > 32:
            raise UsageError(f"size must be at most 32 (CIFAR-10 images are 32x32), got {size}")
    files, where = _cifar_files(root)
    missing = [b for b in _CIFAR_BATCHES if b not in files]
    if missing:
        raise MissingDataError(f"CIFAR-10 batches missing in {where}: {missing}; the python "
                               "version has data_batch_1..5 and test_batch")
    names = list(CIFAR10_CLASSES)
    if "batches.meta" in files:
        meta_obj = _unpickle(files["batches.meta"], f"{where}/batches.meta")
        got = meta_obj.get(b"label_names", meta_obj.get("label_names")) if isinstance(
            meta_obj, dict) else None
        if not isinstance(got, (list, tuple)) or len(got) != 10:
            raise UsageError(f"{where}/batches.meta: expected b'label_names' with 10 names")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in got]
    cls = U.check_classes(classes, 10, names)
    parts = [_cifar_batch(files[b], f"{where}/{b}") for b in _CIFAR_BATCHES]
    x_tr_all = np.concatenate([p[0] for p in parts[:5]])
    y_tr_all = np.concatenate([p[1] for p in parts[:5]])
    x_te_all, y_te_all = parts[5]
    keep_tr, y_tr = U.relabel(y_tr_all, cls)
    keep_te, y_te = U.relabel(y_te_all, cls)
    label = ",".join(names[c] for c in cls)
    n_tr = U.take(keep_tr.size, n_train, "n_train", f"the CIFAR-10 training set of [{label}]")
    n_te = U.take(keep_te.size, n_test, "n_test", f"the CIFAR-10 test set of [{label}]")
    tr = U.order(y_tr, keep_tr.size, seed, U.SPLIT, stratify)[:n_tr]
    te = U.order(y_te, keep_te.size, seed, U.SUBSAMPLE_TEST, stratify)[:n_te]

    def preprocess(raw: np.ndarray) -> np.ndarray:
        img = raw.reshape(-1, 3, 32, 32).astype(np.float64)
        if grayscale:
            img = np.tensordot(img, np.array([0.299, 0.587, 0.114]), axes=([1], [0]))[:, None]
        if size is not None and size != 32:
            img = area_downsample(img, size)
        return img

    x_tr, x_te = preprocess(x_tr_all[keep_tr[tr]]), preprocess(x_te_all[keep_te[te]])
    shape = tuple(x_tr.shape[1:])
    res = 32 if size is None else size
    name = (f"cifar10[{label}]" if classes is not None else "cifar10") + (
        f"-gray{res}" if grayscale else f"-rgb{res}")
    meta = {"seed": seed, "classes": tuple(names[c] for c in cls), "grayscale": grayscale,
            "size": res, "source": where, "train_idx": torch.from_numpy(keep_tr[tr]),
            "test_idx": torch.from_numpy(keep_te[te]), "image_shape": shape}
    return _image_dataset(x_tr, x_te, y_tr[tr], y_te[te], shape, flatten, standardize, 255.0,
                          dtype, len(cls), name, meta)
