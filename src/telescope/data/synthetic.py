"""Synthetic data: teachers, the grokking tasks, a family of regression tasks, and sequence tasks
for transformers.

- :func:`teacher_regression` -- Gaussian inputs, targets from a random-features ReLU teacher.
- :func:`random_tokens` -- uniformly random token batches.
- :func:`polynomial_task` (with :func:`polynomial_activation`) -- the polynomial regression task of
  Kumar et al. (2024) used in the paper's grokking experiment.
- :func:`sinusoid_tasks` -- a family of sinusoid regression tasks (Finn et al. 2017), each input
  carrying its task's embedding, for hypernetworks.
- :func:`modular_arithmetic` -- ``a op b mod p`` on all pairs (Power et al. 2022; Nanda et al.
  2023), split into training and test pairs.
- :func:`mnist1d_patches` / :func:`sequence_task` -- sequence classification for transformer
  double-descent sweeps.

All generators are seeded NumPy ``Generator`` streams, one per component (teacher, test inputs,
training inputs, noise), drawn in float64 and cast at the end. So results depend only on the
seed (not on global random state or the requested dtype), the test set does not change when
``n_train`` does, and the training sets of one seed are nested: the first ``n`` points of a
larger training set are the training set of size ``n``. That is what sample-wise
double-descent sweeps need. :func:`sinusoid_tasks` is the exception: it draws everything from
one seeded torch generator (tasks, then training points, then test points), so its sets are
not nested and its test points change with ``n_train``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from telescope.data import Dataset
from telescope.data._util import check_dtype as _dtype
from telescope.data._util import check_int as _int
from telescope.data._util import check_nonnegative as _nonnegative
from telescope.data._util import rng as _rng
from telescope.data._util import tensor as _tensor
from telescope.errors import UsageError

__all__ = [
    "teacher_regression",
    "random_tokens",
    "polynomial_task",
    "polynomial_activation",
    "sinusoid_tasks",
    "modular_arithmetic",
    "mnist1d_patches",
    "sequence_task",
    "SEQUENCE_TASKS",
]

_TEACHER, _TEST, _TRAIN, _NOISE = range(4)


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
    _nonnegative("noise", noise)
    _dtype(dtype)

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
    return Dataset(
        x_train=_tensor(x_train, dtype),
        y_train=_tensor(y_train, dtype),
        x_test=_tensor(x_test, dtype),
        y_test=_tensor(y_test, dtype),
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


def polynomial_activation(h: Tensor, epsilon: float, degree: int = 2) -> Tensor:
    r"""The activation of Kumar et al.'s two-layer network, ``h + epsilon * h**degree / degree!``.

    For ``degree = 2`` this is :math:`\phi(h) = h + \tfrac{\epsilon}{2} h^2`. See
    :func:`polynomial_task` for the role of ``epsilon``.
    """
    return h + float(epsilon) * h.pow(degree) / math.factorial(degree)


def polynomial_task(
    n_train: int = 550,
    n_test: int = 1000,
    d: int = 100,
    *,
    degree: int = 2,
    epsilon: float = 0.02,
    n_directions: int = 1,
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    r"""The polynomial regression task of Kumar et al. (2024), "Grokking as the transition from
    lazy to rich training dynamics", used in the telescoping paper's grokking experiment (Fig. 4).

    Our reading of the task. Inputs are Gaussian, :math:`x \sim \mathcal N(0, I_d / d)`; a
    teacher direction :math:`\beta \sim \mathcal N(0, I_d)` (so :math:`\beta \cdot x` is about
    standard normal) defines the target

    .. math::  y(x) = \frac{(\beta \cdot x)^k}{k!}, \qquad k = \text{degree} = 2:\;
               y = \tfrac12 (\beta \cdot x)^2,

    which depends on ``x`` through one direction out of ``d`` (with ``n_directions = r > 1``:
    :math:`y = r^{-1/2} \sum_{j<r} (\beta_j \cdot x)^k / k!`, still a low-dimensional subspace).
    The defaults ``d = 100``, 550 training and 1000 test points are the paper's. The network
    trained on it is :math:`f(x) = \alpha \frac1N \sum_i \phi(w_i \cdot x)` with
    :math:`\phi(h) = h + \frac{\epsilon}{2} h^2` (:func:`polynomial_activation`). So ``epsilon``
    is a property of the model, not of the data: it sets how much of the initial tangent
    kernel's spectrum lies on quadratic features, i.e. the alignment of the initial NTK with the
    target. Small ``epsilon``: the target sits in the kernel's weak directions, a lazy network
    (large ``alpha``) first fits the training set with its nearly linear initial features and
    only later learns :math:`\beta` (grokking); larger ``epsilon`` aligns the kernel and shrinks
    the delay. The data therefore do not depend on ``epsilon``; it is recorded in
    ``meta["epsilon"]`` (with ``meta["activation"]``) for the model to use, so one call
    describes one experiment.

    Parameters
    ----------
    n_train, n_test : int
        Number of training (``>= 1``) and test (``>= 0``) points.
    d : int
        Input dimension.
    degree : int, default 2
        Degree ``k`` of the target polynomial.
    epsilon : float, default 0.02
        Alignment parameter of the model's activation (stored in ``meta``); 0.02 is the value of
        the first experiment in the authors' released notebook.
    n_directions : int, default 1
        Number ``r`` of teacher directions.
    noise : float, default 0.0
        Standard deviation of Gaussian noise on the training targets.
    seed : int, default 0
        Seed of the teacher and the inputs (the streams of :func:`teacher_regression`: the test
        set does not depend on ``n_train`` and training sets of one seed are nested).
    dtype : torch.dtype, default torch.float32
        Floating dtype of inputs and targets.

    Returns
    -------
    Dataset
        ``x_*``: ``[N, d]``; ``y_*``: ``[N, 1]``; ``n_classes=None``; ``meta["beta"]``
        ``[r, d]`` (float64), ``meta["epsilon"]``, ``meta["degree"]``.
    """
    n_train = _int("n_train", n_train, 1)
    n_test = _int("n_test", n_test, 0)
    d = _int("d", d, 1)
    degree = _int("degree", degree, 1)
    r = _int("n_directions", n_directions, 1)
    seed = _int("seed", seed, 0)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not np.isfinite(
        epsilon
    ):
        raise UsageError(f"epsilon must be a finite number, got {epsilon!r}")
    _nonnegative("noise", noise)
    _dtype(dtype)

    beta = _rng(seed, _TEACHER).standard_normal((r, d))

    def target(x: np.ndarray) -> np.ndarray:
        z = x @ beta.T
        return (z**degree).sum(axis=1, keepdims=True) / math.factorial(degree) / math.sqrt(r)

    x_test = _rng(seed, _TEST).standard_normal((n_test, d)) / math.sqrt(d)
    x_train = _rng(seed, _TRAIN).standard_normal((n_train, d)) / math.sqrt(d)
    y_train = target(x_train) + float(noise) * _rng(seed, _NOISE).standard_normal((n_train, 1))
    return Dataset(
        x_train=_tensor(x_train, dtype), y_train=_tensor(y_train, dtype),
        x_test=_tensor(x_test, dtype), y_test=_tensor(target(x_test), dtype),
        n_classes=None,
        name=f"polynomial(d={d},k={degree},eps={epsilon:g})",
        meta={"seed": seed, "beta": torch.from_numpy(beta), "epsilon": float(epsilon),
              "degree": degree, "noise": float(noise),
              "activation": f"phi(h) = h + epsilon * h**{degree} / {degree}!"},
    )


def sinusoid_tasks(
    n_tasks: int,
    n_train: int,
    n_test: int,
    *,
    seed: int = 0,
    amplitude: tuple[float, float] = (0.5, 2.0),
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """``n_tasks`` sinusoid regression tasks ``y = A sin(x + phi)`` (the meta-learning benchmark
    of Finn et al. 2017, with the phase in ``[0, pi]``), ``n_train`` and ``n_test`` points each,
    every input carrying the embedding of its task: the data of a hypernetwork ``h(x, z)``.

    ``A ~ U(amplitude)``, ``phi ~ U[0, pi]``, ``x ~ U[-pi, pi]`` fed to the network standardized
    (``x / (pi / sqrt(3))``, unit variance); the task embedding is ``z = sqrt(3) v / |v|`` with
    ``v = (cos phi, sin phi, a)``, ``a = (2 A - lo - hi) / (hi - lo)`` in ``[-1, 1]`` (one point
    of the sphere of radius ``sqrt(3)`` per task, so that a bias-free ReLU meta-network gives
    every task primary weights of the same variance). Training and test points are different
    ``x`` of the same tasks. Everything is drawn from one torch generator seeded with ``seed``:
    the tasks, then the training points, then the test points (unlike the other generators of
    this module, the test points depend on ``n_train``).

    Parameters
    ----------
    n_tasks : int
        Number of tasks (``>= 1``).
    n_train, n_test : int
        Training (``>= 1``) and test (``>= 0``) points per task.
    seed : int, default 0
        Seed of the tasks and the points.
    amplitude : (float, float), default (0.5, 2.0)
        The range ``(lo, hi)``, ``0 <= lo < hi``, of the amplitudes ``A``.
    dtype : torch.dtype, default torch.float32
        Floating dtype of inputs and targets.

    Returns
    -------
    Dataset
        ``x_*``: ``u = [x / (pi / sqrt(3)), z]`` ``[n_tasks * n, 1 + 3]``, task-major (the points
        of task 0, then of task 1, ...); ``y_*``: ``[n_tasks * n, 1]``; ``n_classes=None``;
        ``x_mean`` / ``x_std`` ``(0, 0, 0, 0)`` / ``(pi / sqrt(3), 1, 1, 1)``; ``meta["z"]``
        ``[n_tasks, 3]``, ``meta["amplitude"]`` and ``meta["phase"]`` ``[n_tasks]`` (float64
        tensors), ``meta["amplitude_range"]``.
    """
    n_tasks = _int("n_tasks", n_tasks, 1)
    n_train = _int("n_train", n_train, 1)
    n_test = _int("n_test", n_test, 0)
    seed = _int("seed", seed, 0)
    _dtype(dtype)
    bad_amplitude = f"amplitude must be (lo, hi) with 0 <= lo < hi, got {amplitude!r}"
    try:
        lo, hi = (float(a) for a in amplitude)
    except (TypeError, ValueError) as err:
        raise UsageError(bad_amplitude) from err
    if not (math.isfinite(hi) and 0 <= lo < hi):
        raise UsageError(bad_amplitude)
    g = torch.Generator().manual_seed(seed)
    amp = lo + (hi - lo) * torch.rand(n_tasks, generator=g, dtype=torch.float64)
    phase = math.pi * torch.rand(n_tasks, generator=g, dtype=torch.float64)
    v = torch.stack([torch.cos(phase), torch.sin(phase), (2 * amp - lo - hi) / (hi - lo)], 1)
    z = math.sqrt(3) * v / v.norm(dim=1, keepdim=True)
    x_scale = math.pi / math.sqrt(3)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = (2 * torch.rand(n_tasks, n, generator=g, dtype=torch.float64) - 1) * math.pi
        y = amp[:, None] * torch.sin(x + phase[:, None])
        u = torch.cat([(x / x_scale).reshape(-1, 1), z.repeat_interleave(n, 0)], 1)
        return u.to(dtype), y.reshape(-1, 1).to(dtype)

    u_train, y_train = draw(n_train)
    u_test, y_test = draw(n_test)
    return Dataset(
        x_train=u_train, y_train=y_train, x_test=u_test, y_test=y_test, n_classes=None,
        name=f"sinusoids(tasks={n_tasks},A=[{lo:g},{hi:g}])",
        x_mean=torch.zeros(4, dtype=dtype),
        x_std=torch.tensor([x_scale, 1.0, 1.0, 1.0], dtype=torch.float64).to(dtype),
        meta={"seed": seed, "n_tasks": n_tasks, "z": z, "amplitude": amp, "phase": phase,
              "amplitude_range": (lo, hi)},
    )


_OPS = {
    "add": lambda a, b, p: (a + b) % p,
    "sub": lambda a, b, p: (a - b) % p,
    "mul": lambda a, b, p: (a * b) % p,
    "div": lambda a, b, p: (a * _pow_mod(b, p - 2, p)) % p,
}


def _pow_mod(b: np.ndarray, e: int, p: int) -> np.ndarray:
    """Elementwise ``b**e mod p`` by repeated squaring (int64; exact for ``p < 2**31``)."""
    out = np.ones_like(b)
    base = b % p
    while e:
        if e & 1:
            out = (out * base) % p
        base = (base * base) % p
        e >>= 1
    return out


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % q for q in range(2, math.isqrt(p) + 1))


def modular_arithmetic(
    p: int = 59,
    *,
    op: str = "add",
    train_fraction: float = 0.3,
    seed: int = 0,
    equals: bool = False,
    encoding: str = "tokens",
) -> Dataset:
    """Modular arithmetic on all pairs, ``c = a op b (mod p)``, split into train and test pairs.

    The examples are all pairs ``(a, b)`` with ``a, b`` in ``0..p-1`` (for ``op="div"``,
    ``b != 0``), in row-major order ``a * p + b`` before the split; the label is ``c``.
    A seeded random ``round(train_fraction * N)`` of them (at least 1) are the training pairs and
    the rest the test pairs, as in Power et al. (2022) and Nanda et al. (2023).

    Parameters
    ----------
    p : int, default 59
        The modulus (``op="div"`` needs a prime).
    op : {"add", "sub", "mul", "div"}, default "add"
        ``a + b``, ``a - b``, ``a * b`` or ``a * b^(p-2)`` (division by ``b`` for prime ``p``).
    train_fraction : float, default 0.3
        Fraction of the pairs used for training, in ``(0, 1]``.
    seed : int, default 0
        Seed of the split.
    equals : bool, default False
        With ``encoding="tokens"``: append an ``"="`` token, whose id is ``p``, giving sequences
        ``[a, b, =]`` of length 3 and a vocabulary of ``p + 1`` tokens (Nanda et al.'s format; a
        transformer reads the answer off the last position). Without it: ``[a, b]``, vocabulary
        ``p``.
    encoding : {"tokens", "onehot"}, default "tokens"
        ``"tokens"``: ``int64`` inputs ``[N, 2]`` (or ``[N, 3]``). ``"onehot"``: float inputs
        ``[N, 2p]``, the one-hot codes of ``a`` and ``b`` side by side, for MLPs.

    Returns
    -------
    Dataset
        ``y_*``: ``int64`` labels in ``0..p-1``, ``n_classes = p``; ``meta`` has ``p``, ``op``,
        ``vocab_size``, ``equals_token`` (``p`` or ``None``) and ``train_pairs`` /
        ``test_pairs`` (row-major pair indices).
    """
    p = _int("p", p, 2)
    seed = _int("seed", seed, 0)
    if op not in _OPS:
        raise UsageError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if op == "div" and not _is_prime(p):
        raise UsageError(f"op='div' needs a prime modulus, got p={p}")
    if p >= 2**31:
        raise UsageError(f"p must be below 2**31, got {p}")
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) or not (
        0.0 < train_fraction <= 1.0
    ):
        raise UsageError(f"train_fraction must be a number in (0, 1], got {train_fraction!r}")
    if encoding not in ("tokens", "onehot"):
        raise UsageError(f"encoding must be 'tokens' or 'onehot', got {encoding!r}")
    if equals and encoding != "tokens":
        raise UsageError("equals=True adds an '=' token; it needs encoding='tokens'")

    a, b = (g.ravel() for g in np.meshgrid(np.arange(p), np.arange(p), indexing="ij"))
    pair = a * p + b
    if op == "div":
        keep = b != 0
        a, b, pair = a[keep], b[keep], pair[keep]
    c = _OPS[op](a, b, p).astype(np.int64)
    n = a.size
    n_train = min(n, max(1, int(math.floor(train_fraction * n + 0.5))))
    perm = np.random.default_rng([seed, 7]).permutation(n)
    tr, te = perm[:n_train], perm[n_train:]
    if encoding == "tokens":
        cols = [a, b] + ([np.full(n, p)] if equals else [])
        x = torch.from_numpy(np.stack(cols, axis=1).astype(np.int64))
    else:
        eye = np.eye(p, dtype=np.float32)
        x = torch.from_numpy(np.concatenate([eye[a], eye[b]], axis=1))
    y = torch.from_numpy(c)
    tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
    return Dataset(
        x_train=x[tr_t], y_train=y[tr_t], x_test=x[te_t], y_test=y[te_t], n_classes=p,
        name=f"modular({op},p={p})",
        meta={"p": p, "op": op, "seed": seed, "train_fraction": float(train_fraction),
              "vocab_size": p + 1 if equals else p, "equals_token": p if equals else None,
              "encoding": encoding, "train_pairs": torch.from_numpy(pair[tr]),
              "test_pairs": torch.from_numpy(pair[te])},
    )


def mnist1d_patches(
    n_train: int | None = 4000,
    n_test: int | None = 1000,
    *,
    patch: int = 4,
    seed: int = 0,
    classes: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """MNIST-1D read as a sequence of patches: inputs ``[N, 40 / patch, patch]``.

    Each standardized 40-sample MNIST-1D signal (:func:`~telescope.data.load_mnist1d`, same
    arguments) is cut into ``40 / patch`` consecutive, non-overlapping patches of ``patch``
    samples: token ``t`` holds samples ``t*patch .. (t+1)*patch - 1``. A transformer embeds each
    patch linearly, as a ViT embeds image patches.

    Why this task for transformer double descent: MNIST-1D is the data set on which the paper's
    MLP double descent is measured, so the transformer and MLP rows of a study see the same
    examples; it is generated offline and small enough that widths can be swept and empirical
    NTKs computed on a CPU; the classes are fixed templates that are randomly padded, translated,
    sheared and scaled, so a class is a shape that can sit anywhere in the sequence -- a model
    must relate positions to each other, which is what attention (with learned positions) is
    for, rather than read a fixed set of pixels; and label noise
    (:func:`~telescope.data.add_label_noise`) makes the interpolation peak pronounced, as for the
    MLP. ``patch`` must divide 40 (1, 2, 4, 5, 8, 10, 20, 40); 4 gives sequences of 10 tokens.

    Returns
    -------
    Dataset
        ``x_*``: ``[N, 40 / patch, patch]``; ``y_*``: ``int64`` labels; ``x_mean`` / ``x_std``
        reshaped likewise; ``meta["patch"]``, ``meta["seq_len"]``.
    """
    from telescope.data.mnist1d import load_mnist1d

    patch = _int("patch", patch, 1)
    if 40 % patch:
        raise UsageError(f"patch must divide the MNIST-1D length 40 (1, 2, 4, 5, 8, 10, 20, 40), "
                         f"got {patch}")
    ds = load_mnist1d(n_train, n_test, seed=seed, classes=classes, dtype=dtype,
                      cache_dir=cache_dir)
    seq = 40 // patch

    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.reshape(*t.shape[:-1], seq, patch)

    meta = dict(ds.meta)
    meta.update(patch=patch, seq_len=seq)
    return Dataset(
        x_train=cut(ds.x_train), y_train=ds.y_train, x_test=cut(ds.x_test), y_test=ds.y_test,
        n_classes=ds.n_classes, name=f"{ds.name}-patches{patch}", x_mean=cut(ds.x_mean),
        x_std=cut(ds.x_std), meta=meta,
    )


def _digits_rows(n_train: int | None = None, n_test: int | None = None, *, seed: int = 0,
                 **kwargs) -> Dataset:
    from telescope.data.digits import load_digits

    ds = load_digits(n_train, n_test, seed=seed, **kwargs)

    def rows(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.reshape(*t.shape[:-1], 8, 8)

    meta = dict(ds.meta)
    meta.update(patch=8, seq_len=8)
    return Dataset(
        x_train=rows(ds.x_train), y_train=ds.y_train, x_test=rows(ds.x_test), y_test=ds.y_test,
        n_classes=ds.n_classes, name=f"{ds.name}-rows", x_mean=rows(ds.x_mean),
        x_std=rows(ds.x_std), meta=meta,
    )


SEQUENCE_TASKS = ("mnist1d-patches", "digits-rows")


def sequence_task(kind: str = "mnist1d-patches", *args, **kwargs) -> Dataset:
    """A sequence classification task for transformers, inputs ``[N, seq_len, features]``.

    ``kind``:

    - ``"mnist1d-patches"`` -- :func:`mnist1d_patches` (10 tokens of 4 samples by default); the
      default for transformer double descent (see its docstring for why).
    - ``"digits-rows"`` -- the bundled 8x8 digits (:func:`~telescope.data.load_digits`, same
      arguments) read row by row: 8 tokens of 8 pixels.

    Further arguments go to the chosen loader.
    """
    if kind == "mnist1d-patches":
        return mnist1d_patches(*args, **kwargs)
    if kind == "digits-rows":
        return _digits_rows(*args, **kwargs)
    raise UsageError(f"unknown sequence task {kind!r}; choose one of {SEQUENCE_TASKS}")
