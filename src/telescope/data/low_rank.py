"""Synthetic data of known rank with a chosen singular-value profile (the "spectral prior").

The data of the autoencoder-rank experiments (Sun, Thilak, Littwin, Saremi & Susskind, 2021,
"Implicit greedy rank learning in autoencoders via overparameterized linear networks", ICML 2021
workshop on overparameterization, arXiv:2107.01301): points on an ``r``-dimensional subspace of
``R^d`` whose spread along its ``r`` directions follows a prescribed profile,

.. math::

    x = V \\operatorname{diag}(s)\\, z + \\epsilon, \\qquad
    V \\in \\mathbb R^{d \\times r},\\ V^T V = I_r, \\qquad z \\in \\mathbb R^r,
    \\qquad \\epsilon \\sim \\mathcal N(0, \\text{noise}^2 I_d).

The training latents are *exactly* white: ``Z = sqrt(n) U`` with ``U`` an ``n x r`` matrix of
orthonormal columns orthogonal to the all-ones vector, so that without noise

.. math::

    X_{train} = \\sqrt n\\, U \\operatorname{diag}(s) V^T, \\qquad
    \\frac{1}{n} X_{train}^T X_{train} = V \\operatorname{diag}(s^2) V^T,

i.e. the training matrix is centered, has rank ``r`` and its singular values divided by
``sqrt(n)`` are exactly ``s``; its top-``k`` principal subspace is spanned by the first ``k``
columns of ``V``. Test latents are i.i.d. ``N(0, I_r)`` draws of the same distribution.

:func:`singular_value_profile` builds ``s``: ``s_1 = 1`` and, for the decaying profiles,
``s_1 / s_r = condition``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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

__all__ = ["PROFILES", "singular_value_profile", "low_rank_data"]

#: The named singular-value profiles of :func:`singular_value_profile`.
PROFILES = ("geometric", "linear", "power", "flat")

_BASIS, _TRAIN, _TEST, _NOISE = 11, 12, 13, 14


def singular_value_profile(rank: int, profile: str = "geometric", *,
                           condition: float = 8.0) -> Tensor:
    """The ``rank`` singular values ``s_1 >= ... >= s_r`` of a named profile, ``s_1 = 1``.

    With ``kappa = condition`` (``s_1 / s_r``) and ``k = 1..r``:

    - ``"geometric"``: ``s_k = kappa^(-(k-1)/(r-1))`` (a constant ratio between neighbours);
    - ``"linear"``: ``s_k = 1 - (1 - 1/kappa) (k-1)/(r-1)`` (evenly spaced);
    - ``"power"``: ``s_k = k^(-alpha)`` with ``alpha = log(kappa) / log(r)``;
    - ``"flat"``: ``s_k = 1`` (``condition`` is ignored).

    ``rank = 1`` gives ``[1]`` for every profile.

    Returns
    -------
    Tensor
        float64, shape ``[rank]``, non-increasing.
    """
    r = _int("rank", rank, 1)
    if profile not in PROFILES:
        raise UsageError(f"profile must be one of {PROFILES}, got {profile!r}")
    if not (isinstance(condition, (int, float)) and math.isfinite(condition)
            and condition >= 1.0):
        raise UsageError(f"condition (s_1 / s_r) must be a finite number >= 1, got "
                         f"{condition!r}")
    k = torch.arange(r, dtype=torch.float64)
    if r == 1 or profile == "flat":
        return torch.ones(r, dtype=torch.float64)
    kappa = float(condition)
    if profile == "geometric":
        return kappa ** (-k / (r - 1))
    if profile == "linear":
        return 1.0 - (1.0 - 1.0 / kappa) * k / (r - 1)
    return (k + 1.0) ** (-math.log(kappa) / math.log(r))


def _singular_values(rank: int | None, profile: str, condition: float,
                     singular_values: Sequence[float] | Tensor | None) -> Tensor:
    if singular_values is None:
        if rank is None:
            raise UsageError("give rank (with profile and condition) or singular_values")
        return singular_value_profile(rank, profile, condition=condition)
    s = torch.as_tensor(singular_values, dtype=torch.float64).flatten()
    if s.numel() == 0 or not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise UsageError(f"singular_values must be a non-empty list of finite numbers > 0, got "
                         f"{singular_values!r:.80}")
    if rank is not None and rank != s.numel():
        raise UsageError(f"rank={rank} disagrees with the {s.numel()} singular_values given; "
                         f"give one of them")
    return s


def _centered_orthonormal(n: int, r: int, gen: np.random.Generator) -> np.ndarray:
    """``n x r`` with orthonormal columns orthogonal to the all-ones vector (needs ``n > r``)."""
    a = gen.standard_normal((n, r))
    a -= a.mean(axis=0, keepdims=True)
    q, rr = np.linalg.qr(a)
    return q * np.sign(np.diag(rr))   # columns stay in the centered span; sign fixed


def low_rank_data(
    n_train: int,
    n_test: int,
    d: int,
    rank: int | None = 4,
    *,
    profile: str = "geometric",
    condition: float = 8.0,
    singular_values: Sequence[float] | Tensor | None = None,
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Points on a random ``r``-dimensional subspace with singular values ``s`` (see the
    module docstring): an autoencoding task (targets = inputs).

    Parameters
    ----------
    n_train, n_test : int
        Training points (``> r``, so that ``n`` centered orthonormal latent columns exist) and
        test points (``>= 0``).
    d : int
        Ambient dimension (``>= r``).
    rank, profile, condition
        ``s = singular_value_profile(rank, profile, condition=condition)``.
    singular_values
        An explicit ``s`` instead (positive; ``rank`` may be ``None`` or must match its length).
        Sorted in decreasing order.
    noise : float, default 0.0
        Standard deviation of isotropic Gaussian noise added to every coordinate of the inputs
        (train and test; the targets carry the same noise: they are the inputs). With noise the
        training singular values are no longer exactly ``s``.
    seed : int, default 0
        Seed of the subspace, the latents and the noise (independent NumPy streams).
    dtype : torch.dtype, default torch.float32
        Floating dtype of the tensors.

    Returns
    -------
    Dataset
        ``x_train == y_train`` ``[n_train, d]``, ``x_test == y_test`` ``[n_test, d]``,
        ``n_classes=None``. ``meta``: ``"singular_values"`` (``s``, float64 ``[r]``),
        ``"components"`` (``V``, float64 ``[d, r]``), ``"latents_train"`` (``Z``, float64
        ``[n_train, r]``, ``Z^T Z / n = I``), ``"rank"``, ``"profile"``, ``"condition"``,
        ``"noise"``, ``"seed"``.
    """
    n_train = _int("n_train", n_train, 1)
    n_test = _int("n_test", n_test, 0)
    d = _int("d", d, 1)
    seed = _int("seed", seed, 0)
    _nonnegative("noise", noise)
    _dtype(dtype)
    if rank is not None:
        rank = _int("rank", rank, 1)
    s = _singular_values(rank, profile, condition, singular_values)
    s = torch.sort(s, descending=True).values
    r = int(s.numel())
    if d < r:
        raise UsageError(f"d={d} must be >= the rank {r} (the data lie on an r-dimensional "
                         f"subspace of R^d)")
    if n_train <= r:
        raise UsageError(f"n_train={n_train} must be > the rank {r} (the training latents are "
                         f"r centered orthonormal columns of length n_train)")

    basis = _rng(seed, _BASIS).standard_normal((d, r))
    q, rr = np.linalg.qr(basis)
    v = q * np.sign(np.diag(rr))
    z_train = math.sqrt(n_train) * _centered_orthonormal(n_train, r, _rng(seed, _TRAIN))
    z_test = _rng(seed, _TEST).standard_normal((n_test, r))
    sv = s.numpy()
    x_train = (z_train * sv) @ v.T
    x_test = (z_test * sv) @ v.T
    if noise > 0:
        gen = _rng(seed, _NOISE)
        x_train = x_train + float(noise) * gen.standard_normal(x_train.shape)
        x_test = x_test + float(noise) * gen.standard_normal(x_test.shape)
    name = (f"low_rank(d={d},r={r},{profile if singular_values is None else 'custom'}"
            f"{'' if singular_values is not None or profile == 'flat' else f',k={condition:g}'}"
            f"{f',noise={noise:g}' if noise else ''})")
    xt, xs = _tensor(x_train, dtype), _tensor(x_test, dtype)
    return Dataset(
        x_train=xt, y_train=xt.clone(), x_test=xs, y_test=xs.clone(), n_classes=None,
        name=name,
        meta={"singular_values": s.clone(), "components": torch.from_numpy(v),
              "latents_train": torch.from_numpy(z_train), "rank": r,
              "profile": "custom" if singular_values is not None else profile,
              "condition": float(condition), "noise": float(noise), "seed": seed},
    )
