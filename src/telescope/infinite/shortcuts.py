"""``infinite_ntk``: the shortcut for the infinite-width kernels of fully-connected networks.

``infinite_ntk(x1, x2, depth=L, activation="relu", weight_std=w, bias_std=b)`` is
``serial(*[Dense(n, w, b), Relu()] * L, Dense(1, w, b)).kernel(x1, x2)`` for inputs flattened
to ``[N, d]``: the NNGP and NTK of Jacot et al. (2018) and Lee et al. (2019) for a scalar
output, the numbers of neural-tangents' ``kernel_fn`` for the same stax description (Novak et
al. 2020). The recursion and the closed forms of the Gaussian expectations live with the layers
(:mod:`telescope.infinite.layers`, :mod:`telescope.infinite.activations`).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from telescope.errors import UsageError, check_std
from telescope.infinite.activations import Erf, Gelu, Relu
from telescope.infinite.combinators import serial
from telescope.infinite.layers import Dense

__all__ = ["infinite_ntk"]

_ACTIVATIONS = ("relu", "erf", "gelu")


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

    ``depth`` hidden layers ``h -> (weight_std / sqrt(n_in)) W phi(h) + bias_std b`` (``W, b ~
    N(0, 1)``) and a scalar linear readout of the same form; ``depth=0`` is the linear model,
    whose NNGP and NTK are both ``weight_std^2 <x, x'> / d + bias_std^2``. Built on
    :mod:`telescope.infinite` (``serial(Dense, phi, ..., Dense(1))``), whose layers state the
    recursion (:class:`~telescope.infinite.Dense`) and the closed forms (Cho & Saul 2009 for
    ReLU, Williams 1997 for erf, Tsuchida et al. 2021 for GELU); the numbers equal
    neural-tangents' ``kernel_fn`` for ``stax.serial(*([Dense(w, W_std, b_std), Relu()] *
    depth), Dense(1, W_std, b_std))`` (Novak et al. 2020).

    Parameters
    ----------
    x1 : Tensor
        Inputs ``[N1, ...]``; every example is flattened to ``d`` features.
    x2 : Tensor, optional
        Inputs ``[N2, ...]`` with the same number of features; ``None`` means ``x1`` (the result
        is then exactly symmetric).
    depth : int
        Number of hidden layers (``>= 0``).
    activation : {"relu", "erf", "gelu"}
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
    w_std = check_std(weight_std, "weight_std")
    b_std = check_std(bias_std, "bias_std")

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

    hidden = Relu() if activation == "relu" else (Erf() if activation == "erf" else Gelu())
    arch = serial(*[layer for _ in range(depth) for layer in (Dense(1, w_std, b_std), hidden)],
                  Dense(1, w_std, b_std))
    out = arch.kernel(a, None if symmetric else b)
    return {"nngp": out["nngp"].to(out_dtype), "ntk": out["ntk"].to(out_dtype)}
