"""Kernel metrics: (centered) alignment, kernel distance, kernel-target alignment, spectrum,
effective rank, and the normalized variance of a kernel over random draws.

All functions take ``[N, N]`` kernel matrices (trace kernels, e.g. ``telescope.ntk(...,
output="trace")``), compute in float64 and return Python floats, except :func:`spectrum`, which
returns a float64 tensor, and :func:`normalized_variance`, which takes several draws of a kernel
and also returns their mean. With the centering matrix ``H = I - 1 1^T / N`` the centered kernel is
``K_c = H K H``, and ``<A, B>_F = sum_ij A_ij B_ij``.

References
----------
* N. Cristianini, J. Shawe-Taylor, A. Elisseeff, J. Kandola. On Kernel-Target Alignment.
  NeurIPS 2002.
* C. Cortes, M. Mohri, A. Rostamizadeh. Algorithms for Learning Kernels Based on Centered
  Alignment. JMLR 13, 2012.
* S. Fort, G. K. Dziugaite, M. Paul, S. Kharaghani, D. M. Roy, S. Ganguli. Deep learning versus
  kernel learning: an empirical study of loss landscape geometry and the time evolution of the
  Neural Tangent Kernel. NeurIPS 2020.
* O. Roy, M. Vetterli. The effective rank: a measure of effective dimensionality. EUSIPCO 2007.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from telescope.errors import UsageError

__all__ = ["alignment", "kernel_distance", "kernel_target_alignment", "spectrum", "effective_rank",
           "normalized_variance"]


def _as_kernel(k: object, name: str) -> Tensor:
    """Validate a square real finite matrix and return it detached in float64."""
    if not isinstance(k, Tensor):
        raise UsageError(f"{name} must be a torch.Tensor of shape [N, N], got {type(k).__name__}")
    if k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise UsageError(f"{name} must be a square [N, N] kernel matrix, got shape "
                         f"{tuple(k.shape)}")
    if k.shape[0] == 0:
        raise UsageError(f"{name} is empty")
    if k.is_complex():
        raise UsageError(f"{name} must be real, got dtype {k.dtype}")
    k = k.detach().to(torch.float64)
    if not bool(torch.isfinite(k).all()):
        raise UsageError(f"{name} contains NaN or infinite values")
    return k


def _center(k: Tensor) -> Tensor:
    """``H K H`` with ``H = I - 1 1^T / N``: subtract row and column means, add back the mean."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def _cosine(a: Tensor, b: Tensor) -> float:
    """``<A, B>_F / (||A||_F ||B||_F)``; NaN when either matrix is zero."""
    na = torch.linalg.matrix_norm(a)
    nb = torch.linalg.matrix_norm(b)
    if float(na) == 0.0 or float(nb) == 0.0:
        return math.nan
    # Normalize first so the inner product cannot overflow.
    return float(((a / na) * (b / nb)).sum())


def alignment(k1: Tensor, k2: Tensor, centered: bool = True) -> float:
    """Kernel alignment ``<K1c, K2c>_F / (||K1c||_F ||K2c||_F)``.

    With ``centered=True`` (default) ``Kc = H K H``, ``H = I - 1 1^T / N``: the centered kernel
    alignment of Cortes, Mohri & Rostamizadeh (2012). With ``centered=False`` the kernels are
    used as they are: the alignment of Cristianini et al. (2002). For PSD kernels the value lies
    in ``[0, 1]``; it is invariant to rescaling either kernel by a positive constant.

    Parameters
    ----------
    k1, k2 : Tensor
        Kernel matrices ``[N, N]`` on the same points.
    centered : bool
        Center both kernels first.

    Returns
    -------
    float
        The alignment; ``nan`` if either (centered) kernel is identically zero.
    """
    a = _as_kernel(k1, "k1")
    b = _as_kernel(k2, "k2")
    if a.shape != b.shape:
        raise UsageError(f"k1 and k2 must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if centered:
        a, b = _center(a), _center(b)
    return _cosine(a, b)


def kernel_distance(k1: Tensor, k2: Tensor, centered: bool = False) -> float:
    """Kernel distance ``1 - <K1, K2>_F / (||K1||_F ||K2||_F)`` of Fort et al. (2020).

    By default (``centered=False``) this is exactly the distance Fort et al. use to compare the
    empirical NTKs of two checkpoints: one minus the *uncentered* alignment. ``centered=True``
    gives ``1 - alignment(k1, k2)`` with the centered alignment of Cortes et al. (2012) instead.
    It is 0 for kernels equal up to a positive scale and at most 1 for PSD kernels.

    Parameters
    ----------
    k1, k2 : Tensor
        Kernel matrices ``[N, N]`` on the same points.
    centered : bool
        Use the centered alignment (default ``False``, unlike :func:`alignment`).

    Returns
    -------
    float
        The distance; ``nan`` if either kernel is identically zero.
    """
    return 1.0 - alignment(k1, k2, centered=centered)


def kernel_target_alignment(k: Tensor, y: Tensor, centered: bool = True) -> float:
    """Alignment of a kernel with the target kernel ``Y Y^T``.

    ``A(K, Y Y^T) = <Kc, (Y Y^T)c>_F / (||Kc||_F ||(Y Y^T)c||_F)`` (Cristianini et al. 2002;
    centered as in Cortes et al. 2012 when ``centered=True``, the default). Since
    ``<K, Y Y^T>_F = tr(Y^T K Y)`` this measures how much of the kernel's energy lies along the
    targets. Targets are used as numbers: one-hot encode class labels first.

    Parameters
    ----------
    k : Tensor
        Kernel matrix ``[N, N]``.
    y : Tensor
        Targets ``[N]`` or ``[N, O]``.
    centered : bool
        Center the kernel and the target kernel.

    Returns
    -------
    float
        The alignment; ``nan`` if either (centered) kernel is identically zero (e.g. constant
        targets with ``centered=True``).
    """
    kk = _as_kernel(k, "k")
    if not isinstance(y, Tensor):
        raise UsageError(f"y must be a torch.Tensor of shape [N] or [N, O], got "
                        f"{type(y).__name__}")
    if y.dim() not in (1, 2) or y.shape[0] != kk.shape[0]:
        raise UsageError(f"y must have shape [N] or [N, O] with N = {kk.shape[0]} (the size of "
                         f"k), got shape {tuple(y.shape)}")
    yy = (y if y.dim() == 2 else y.unsqueeze(1)).detach()
    yy = yy.to(device=kk.device, dtype=torch.float64)
    if not bool(torch.isfinite(yy).all()):
        raise UsageError("y contains NaN or infinite values")
    target = yy @ yy.T
    if centered:
        kk, target = _center(kk), _center(target)
    return _cosine(kk, target)


def spectrum(k: Tensor) -> Tensor:
    """Eigenvalues of the symmetrized kernel ``(K + K^T)/2`` in descending order, float64 ``[N]``.

    Parameters
    ----------
    k : Tensor
        Kernel matrix ``[N, N]``.

    Returns
    -------
    Tensor
        Eigenvalues, largest first, float64, on ``k``'s device.
    """
    kk = _as_kernel(k, "k")
    return torch.linalg.eigvalsh(0.5 * (kk + kk.T)).flip(0)


def effective_rank(k: Tensor, method: str = "entropy") -> float:
    """Effective rank of a kernel from its eigenvalue magnitudes ``s_i = |lambda_i|``.

    * ``method="entropy"`` (default): ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` and
      ``H(p) = -sum_i p_i log p_i`` (Roy & Vetterli 2007; ``0 log 0 = 0``).
    * ``method="participation"``: the participation ratio ``(sum_i s_i)^2 / sum_i s_i^2``.

    For a symmetric matrix the ``s_i`` are its singular values, as in Roy & Vetterli. Both equal
    ``r`` for a rank-``r`` orthogonal projector and lie in ``[1, N]`` for a non-zero kernel.

    Parameters
    ----------
    k : Tensor
        Kernel matrix ``[N, N]`` (symmetrized first).
    method : {"entropy", "participation"}
        Which effective rank.

    Returns
    -------
    float
        The effective rank; ``0.0`` for the zero matrix.
    """
    if method not in ("entropy", "participation"):
        raise UsageError(f"method must be 'entropy' or 'participation', got {method!r}")
    s = spectrum(k).abs()
    total = s.sum()
    if float(total) == 0.0:
        return 0.0
    p = s / total
    if method == "participation":
        return float(1.0 / (p * p).sum())
    positive = p[p > 0]
    return float(torch.exp(-(positive * positive.log()).sum()))


def normalized_variance(kernels: Sequence[Tensor] | Tensor) -> tuple[float, Tensor]:
    """The normalized variance ``E ||K - E K||_F^2 / ||E K||_F^2`` of a random kernel, estimated
    from ``D >= 2`` independent draws ``K_1..K_D`` (e.g. the empirical NTKs of ``D``
    initializations on the same points), and the draws' mean ``Kbar``.

    ``S = sum_j ||K_j - Kbar||_F^2 / (D - 1)`` estimates the numerator without bias; the
    denominator is ``||Kbar||_F^2 - S / D``, since ``E ||Kbar||_F^2 = ||E K||_F^2 + S / D``.
    Without that correction a heavy-tailed kernel (a narrow network's, whose variance is of the
    order of ``||E K||^2``) would be underestimated by a factor ``1 + V / D``. The value is
    invariant to rescaling all draws by one constant and 0 for identical non-zero draws.

    Parameters
    ----------
    kernels : sequence of Tensor, or Tensor
        The draws: ``D`` kernel matrices ``[N, N]`` on the same points, or a ``[D, N, N]``
        tensor.

    Returns
    -------
    (float, Tensor)
        The estimate, ``nan`` if the corrected denominator is not positive (fewer draws than the
        noise allows), and the mean kernel ``Kbar`` ``[N, N]`` (float64).
    """
    if isinstance(kernels, Tensor):
        if kernels.dim() != 3:
            raise UsageError(f"kernels as one tensor must be [D, N, N], got shape "
                             f"{tuple(kernels.shape)}")
        draws = list(kernels.unbind(0))
    elif isinstance(kernels, Sequence) and not isinstance(kernels, str):
        draws = list(kernels)
    else:
        raise UsageError(f"kernels must be a sequence of [N, N] tensors or a [D, N, N] tensor, "
                         f"got {type(kernels).__name__}")
    if len(draws) < 2:
        raise UsageError(f"kernels must hold at least 2 draws to estimate a variance, got "
                         f"{len(draws)}")
    checked = [_as_kernel(kj, f"kernels[{j}]") for j, kj in enumerate(draws)]
    for j, kj in enumerate(checked[1:], 1):
        if kj.shape != checked[0].shape:
            raise UsageError(f"every draw must have the same shape: kernels[0] is "
                             f"{tuple(checked[0].shape)}, kernels[{j}] is {tuple(kj.shape)}")
    k = torch.stack(checked)
    d = len(checked)
    mean = k.mean(0)
    spread = float(((k - mean) ** 2).sum()) / (d - 1)
    signal = float((mean ** 2).sum()) - spread / d
    return (spread / signal if signal > 0 else math.nan), mean
