"""Infinite-width kernels (NNGP and NTK) of fully-connected networks in NTK parametrization.

The network with ``depth`` hidden layers of width ``n`` is

.. math::

    h^1 = \\frac{\\sigma_w}{\\sqrt{d}} W^1 x + \\sigma_b b^1, \\qquad
    h^{l+1} = \\frac{\\sigma_w}{\\sqrt{n}} W^{l+1} \\phi(h^l) + \\sigma_b b^{l+1},
    \\qquad f(x) = h^{L+1}(x) \\in \\mathbb{R},

with every entry of every ``W`` and ``b`` drawn i.i.d. from :math:`\\mathcal N(0, 1)` (the "NTK
parametrization"). As ``n -> infinity`` the output is a Gaussian process with covariance ``K``
(the NNGP kernel) and gradient descent on the parameters follows the fixed kernel ``Theta`` (the
neural tangent kernel) [Jacot et al. 2018; Lee et al. 2019]. Both are computed by the recursion

.. math::

    K^1(x, x') &= \\sigma_w^2 \\langle x, x' \\rangle / d + \\sigma_b^2, \\qquad
    \\Theta^1 = K^1, \\\\
    K^{l+1}(x, x') &= \\sigma_w^2\\, \\mathbb E[\\phi(u)\\phi(v)] + \\sigma_b^2, \\\\
    \\Theta^{l+1}(x, x') &= K^{l+1}(x, x')
        + \\sigma_w^2\\, \\mathbb E[\\phi'(u)\\phi'(v)]\\, \\Theta^l(x, x'),

with :math:`(u, v) \\sim \\mathcal N\\big(0, \\begin{psmallmatrix} K^l(x,x) & K^l(x,x') \\\\
K^l(x,x') & K^l(x',x') \\end{psmallmatrix}\\big)`, applied once per hidden layer; the last
application is the linear readout, so ``nngp = K^{L+1}`` and ``ntk = Theta^{L+1}``.

The Gaussian expectations have closed forms:

* ReLU (arc-cosine kernels of degree 1 and 0, Cho & Saul 2009), with
  :math:`\\theta = \\arccos\\big(k_{xy} / \\sqrt{k_{xx} k_{yy}}\\big)`:
  :math:`\\mathbb E[\\mathrm{relu}(u)\\mathrm{relu}(v)] = \\frac{\\sqrt{k_{xx}k_{yy}}}{2\\pi}
  (\\sin\\theta + (\\pi - \\theta)\\cos\\theta)` and
  :math:`\\mathbb E[\\mathrm{step}(u)\\mathrm{step}(v)] = \\frac{\\pi - \\theta}{2\\pi}`.
* erf (Williams 1997):
  :math:`\\mathbb E[\\mathrm{erf}(u)\\mathrm{erf}(v)] = \\frac{2}{\\pi}
  \\arcsin\\frac{2k_{xy}}{\\sqrt{(1+2k_{xx})(1+2k_{yy})}}` and
  :math:`\\mathbb E[\\mathrm{erf}'(u)\\mathrm{erf}'(v)] = \\frac{4}{\\pi}
  \\big((1+2k_{xx})(1+2k_{yy}) - 4k_{xy}^2\\big)^{-1/2}`.

These are the numbers returned by neural-tangents' ``kernel_fn`` for
``stax.serial(*([Dense(w, W_std, b_std), Relu()] * depth), Dense(1, W_std, b_std))`` (``Erf()``
in place of ``Relu()`` for ``activation="erf"``), whose ``Dense`` layers default to the NTK
parametrization and whose input kernel is ``<x, x'> / d``.

References
----------
* A. Jacot, F. Gabriel, C. Hongler. Neural Tangent Kernel: Convergence and Generalization in
  Neural Networks. NeurIPS 2018.
* J. Lee, L. Xiao, S. Schoenholz, Y. Bahri, R. Novak, J. Sohl-Dickstein, J. Pennington. Wide
  Neural Networks of Any Depth Evolve as Linear Models Under Gradient Descent. NeurIPS 2019.
* Y. Cho, L. Saul. Kernel Methods for Deep Learning. NeurIPS 2009.
* C. Williams. Computing with Infinite Networks. NeurIPS 1997.
* R. Novak et al. Neural Tangents: Fast and Easy Infinite Neural Networks in Python. ICLR 2020.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from telescope.errors import UsageError

__all__ = ["infinite_ntk"]

_ACTIVATIONS = ("relu", "erf")


def _as_batch(x: object, name: str) -> Tensor:
    """Validate one input batch ``[N, ...]`` and flatten it to ``[N, d]`` in float64."""
    if not isinstance(x, Tensor):
        raise UsageError(f"{name} must be a torch.Tensor of shape [N, ...], got {type(x).__name__}")
    if x.dim() < 2:
        raise UsageError(
            f"{name} must have shape [N, ...] with at least one feature dimension, got shape "
            f"{tuple(x.shape)} (for N scalar inputs use x.reshape(-1, 1))"
        )
    if x.is_complex():
        raise UsageError(f"{name} must be real, got dtype {x.dtype}")
    flat = x.detach().flatten(1).to(torch.float64)
    if flat.shape[1] == 0:
        raise UsageError(f"{name} has no features (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(flat).all()):
        raise UsageError(f"{name} contains NaN or infinite values")
    return flat


def _check_std(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{name} must be finite and >= 0, got {value}")
    return value


def _relu_expectations(
    kxy: Tensor, kxx: Tensor, kyy: Tensor, diagonal: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Arc-cosine kernels: (E[relu relu], E[step step]) off-diagonal and their diagonal values.

    ``kxx`` is ``[N1, 1]`` and ``kyy`` is ``[1, N2]``; returns the pair of ``[N1, N2]`` matrices
    and the updated diagonals ``E[relu(u)^2] = k/2`` for both sides (``E[step(u)^2] = 1/2``).
    """
    norm = torch.sqrt(kxx * kyy)
    positive = norm > 0
    cos = torch.where(positive, kxy / torch.where(positive, norm, torch.ones_like(norm)), 0.0)
    cos = cos.clamp(-1.0, 1.0)
    if diagonal:
        cos.diagonal().fill_(1.0)
    theta = torch.arccos(cos)
    e_phi = norm / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * cos)
    e_dphi = (math.pi - theta) / (2 * math.pi)
    return e_phi, e_dphi, kxx / 2, kyy / 2


def _erf_expectations(
    kxy: Tensor, kxx: Tensor, kyy: Tensor, diagonal: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Williams' erf kernels: (E[erf erf], E[erf' erf']) and the updated diagonals."""
    a = 1 + 2 * kxx
    c = 1 + 2 * kyy
    ratio = (2 * kxy / torch.sqrt(a * c)).clamp(-1.0, 1.0)
    if diagonal:
        ratio.diagonal().copy_((2 * kxx / a).reshape(-1))
    e_phi = (2 / math.pi) * torch.arcsin(ratio)
    # (1 + 2 kxx)(1 + 2 kyy) - 4 kxy^2 >= 1 + 2 kxx + 2 kyy >= 1 for a PSD kernel.
    det = (a * c - 4 * kxy**2).clamp_min(1.0)
    e_dphi = (4 / math.pi) / torch.sqrt(det)
    new_kxx = (2 / math.pi) * torch.arcsin(2 * kxx / a)
    new_kyy = (2 / math.pi) * torch.arcsin(2 * kyy / c)
    return e_phi, e_dphi, new_kxx, new_kyy


def infinite_ntk(
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    depth: int,
    activation: str = "relu",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
) -> dict[str, Tensor]:
    """Infinite-width NNGP and NTK kernels of a fully-connected network (NTK parametrization).

    The network has ``depth`` hidden layers ``h -> (weight_std / sqrt(n_in)) W phi(h) +
    bias_std b`` (``W, b ~ N(0, 1)``) and a scalar linear readout of the same form. With
    ``K^1 = weight_std^2 <x, x'> / d + bias_std^2`` and ``Theta^1 = K^1``, every hidden layer
    applies

    ``K^{l+1} = weight_std^2 E[phi(u) phi(v)] + bias_std^2``,
    ``Theta^{l+1} = K^{l+1} + weight_std^2 E[phi'(u) phi'(v)] Theta^l``,

    where ``(u, v) ~ N(0, [[K^l(x,x), K^l(x,x')], [K^l(x,x'), K^l(x',x')]])``. The expectations
    use the arc-cosine closed forms of Cho & Saul (2009) for ReLU and Williams' (1997) closed
    forms for erf. ``depth=0`` is the linear model ``f(x) = weight_std <w, x>/sqrt(d) +
    bias_std b``, whose NNGP and NTK are both ``K^1``. The numbers equal neural-tangents'
    ``stax.serial(*([Dense(w, W_std, b_std), Relu()] * depth), Dense(1, W_std, b_std))``
    ``kernel_fn`` (Novak et al. 2020), i.e. the kernels of Jacot et al. (2018) and Lee et al.
    (2019) for a scalar output.

    Parameters
    ----------
    x1 : Tensor
        Inputs ``[N1, ...]``; every example is flattened to ``d`` features.
    x2 : Tensor, optional
        Inputs ``[N2, ...]`` with the same number of features; ``None`` means ``x1`` (the result
        is then exactly symmetric).
    depth : int
        Number of hidden layers (``>= 0``).
    activation : {"relu", "erf"}
        Nonlinearity ``phi`` of the hidden layers.
    weight_std, bias_std : float
        ``W_std`` and ``b_std`` of every layer (``>= 0``).

    Returns
    -------
    dict
        ``{"nngp": K, "ntk": Theta}``, each ``[N1, N2]``, in the inputs' floating dtype (the
        default dtype for integer inputs) and on their device; computed in float64.

    Raises
    ------
    ValueError
        For a negative ``depth`` or std, an unknown activation, inputs without a batch and a
        feature dimension, mismatched feature counts, or non-finite inputs.
    TypeError
        For arguments of the wrong type.
    """
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
        raise UsageError(f"depth must be an int, got {type(depth).__name__}")
    depth = int(depth)
    if depth < 0:
        raise UsageError(f"depth must be >= 0 (the number of hidden layers), got {depth}")
    if not isinstance(activation, str) or activation.lower() not in _ACTIVATIONS:
        raise UsageError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    activation = activation.lower()
    w_var = _check_std(weight_std, "weight_std") ** 2
    b_var = _check_std(bias_std, "bias_std") ** 2

    a = _as_batch(x1, "x1")
    symmetric = x2 is None
    if symmetric:
        b = a
        dtypes = (x1.dtype,)
    else:
        b = _as_batch(x2, "x2")
        if b.shape[1] != a.shape[1]:
            raise UsageError(
                f"x1 and x2 must have the same number of features per example: x1 has "
                f"{a.shape[1]} (shape {tuple(x1.shape)}), x2 has {b.shape[1]} "
                f"(shape {tuple(x2.shape)})"
            )
        if x2.device != x1.device:
            raise UsageError(f"x1 is on {x1.device} but x2 is on {x2.device}")
        dtypes = (x1.dtype, x2.dtype)
    floating = [d for d in dtypes if d.is_floating_point]
    out_dtype = torch.promote_types(*floating) if len(floating) == 2 else (
        floating[0] if floating else torch.get_default_dtype()
    )

    d = a.shape[1]
    # First Dense layer on the input kernel <x, x'> / d.
    kxy = w_var * (a @ b.T) / d + b_var
    kxx = (w_var * (a * a).sum(1) / d + b_var).unsqueeze(1)
    kyy = kxx.T if symmetric else (w_var * (b * b).sum(1) / d + b_var).unsqueeze(0)
    if symmetric:
        kxy = 0.5 * (kxy + kxy.T)
        kxy.diagonal().copy_(kxx.reshape(-1))
    theta = kxy.clone()

    expectations = _relu_expectations if activation == "relu" else _erf_expectations
    for _ in range(depth):
        e_phi, e_dphi, e_xx, e_yy = expectations(kxy, kxx, kyy, symmetric)
        kxy = w_var * e_phi + b_var
        theta = kxy + w_var * e_dphi * theta
        kxx = w_var * e_xx + b_var
        kyy = kxx.T if symmetric else w_var * e_yy + b_var

    if symmetric:
        kxy = 0.5 * (kxy + kxy.T)
        theta = 0.5 * (theta + theta.T)
    return {"nngp": kxy.to(out_dtype), "ntk": theta.to(out_dtype)}
