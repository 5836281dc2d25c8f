"""Synthetic data: a random-features regression teacher and random token batches.

All generators are seeded NumPy ``Generator`` streams, one per component (teacher, test inputs,
training inputs, noise), drawn in float64 and cast at the end. So results depend only on the
seed (not on global random state or the requested dtype), the test set does not change when
``n_train`` does, and the training sets of one seed are nested: the first ``n`` points of a
larger training set are the training set of size ``n``. That is what sample-wise
double-descent sweeps need.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from telescope.data import Dataset

__all__ = ["teacher_regression", "random_tokens"]

_TEACHER, _TEST, _TRAIN, _NOISE = range(4)


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def teacher_regression(
    n_train: int,
    n_test: int,
    d: int,
    *,
    noise: float = 0.0,
    seed: int = 0,
    width: int = 256,
    n_outputs: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    r"""Regression on a random-features ReLU teacher with Gaussian inputs.

    .. math::

        x \sim \mathcal N(0, I_d), \qquad
        y^*(x) = \sqrt{2 / m}\; A^T \operatorname{relu}(W x / \sqrt d),
        \qquad W_{ij}, A_{jk} \sim \mathcal N(0, 1),

    with ``m = width`` random features, so that ``E[y*^2] ~= 1`` per output. Training targets
    are ``y*(x) + noise * eps`` with ``eps ~ N(0, 1)``; test targets are noise-free, so the test
    error measures the distance to the teacher itself.

    Parameters
    ----------
    n_train, n_test : int
        Number of training (``>= 1``) and test (``>= 0``) points.
    d : int
        Input dimension.
    noise : float, default 0.0
        Standard deviation of the label noise on the training targets.
    seed : int, default 0
        Seed of the teacher and the data.
    width : int, default 256
        Number of random features ``m`` of the teacher.
    n_outputs : int, default 1
        Number of target columns ``O``.
    dtype : torch.dtype, default torch.float32
        Floating dtype of inputs and targets.

    Returns
    -------
    Dataset
        ``x_*``: ``[N, d]``, ``y_*``: ``[N, n_outputs]``, ``n_classes=None``; ``meta`` holds the
        teacher (``"W"`` ``[width, d]`` and ``"A"`` ``[width, n_outputs]``, float64 tensors).
    """
    n_train = _int("n_train", n_train, 1)
    n_test = _int("n_test", n_test, 0)
    d = _int("d", d, 1)
    width = _int("width", width, 1)
    n_outputs = _int("n_outputs", n_outputs, 1)
    seed = _int("seed", seed, 0)
    if not float(noise) >= 0.0 or not np.isfinite(noise):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")

    teacher = _rng(seed, _TEACHER)
    w = teacher.standard_normal((width, d))
    a = teacher.standard_normal((width, n_outputs))

    def target(x: np.ndarray) -> np.ndarray:
        return np.sqrt(2.0 / width) * np.maximum(x @ w.T / np.sqrt(d), 0.0) @ a

    x_test = _rng(seed, _TEST).standard_normal((n_test, d))
    x_train = _rng(seed, _TRAIN).standard_normal((n_train, d))
    y_train = target(x_train) + float(noise) * _rng(seed, _NOISE).standard_normal(
        (n_train, n_outputs)
    )
    y_test = target(x_test)

    def tensor(v: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(v)).to(dtype)

    return Dataset(
        x_train=tensor(x_train),
        y_train=tensor(y_train),
        x_test=tensor(x_test),
        y_test=tensor(y_test),
        n_classes=None,
        name=f"teacher(d={d},m={width},noise={noise:g})",
        meta={"seed": seed, "noise": float(noise), "width": width,
              "W": torch.from_numpy(w), "A": torch.from_numpy(a)},
    )


def random_tokens(n: int, seq_len: int, vocab: int, *, seed: int = 0) -> Tensor:
    """Uniformly random integer tokens: an ``int64`` tensor ``[n, seq_len]`` in ``[0, vocab)``.

    Meant as input batches for sequence models in tests and benchmarks. Deterministic given
    ``seed`` (independent of global random state).

    Parameters
    ----------
    n : int
        Number of sequences (``>= 1``).
    seq_len : int
        Tokens per sequence (``>= 1``).
    vocab : int
        Vocabulary size (``>= 1``).
    seed : int, default 0
        Seed of the generator.
    """
    n = _int("n", n, 1)
    seq_len = _int("seq_len", seq_len, 1)
    vocab = _int("vocab", vocab, 1)
    seed = _int("seed", seed, 0)
    tokens = np.random.default_rng(seed).integers(0, vocab, size=(n, seq_len), dtype=np.int64)
    return torch.from_numpy(tokens)
