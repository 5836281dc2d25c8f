"""The covariance of a convolution's outputs in the infinite-channel limit.

A convolution ``y_o = W_std / sqrt(C K) sum_c sum_delta W[c, delta] x_c[o s + delta] + b_std b``
with i.i.d. standard normal weights (``K = prod(kernel_size)`` offsets ``delta``, stride ``s``,
``x`` padded first) has, for inputs of per-channel covariance
``Sigma[s, s'] = (1/C) sum_c x_c[s] x'_c[s']``,

    ``E[y_o y'_{o'}] = W_std^2 * (1/K) sum_delta Sigma_pad[o s + delta, o' s + delta] + b_std^2``

(the weights of different offsets and channels are independent, so only equal offsets pair up;
Novak et al. 2019, "Bayesian deep convolutional networks with many channels are Gaussian
processes", eq. 7; Arora et al. 2019, "On exact computation with an infinitely wide neural
net", the CNTK). The same map takes the NTK to the NTK of the pre-bias output (plus the new
NNGP). :func:`conv_covariance` is that map without ``W_std``/``b_std``: the average over filter
offsets. It factors over spatial dimensions, so it is applied one dimension at a time, to the
pair of axes ``(s_d, s_d')`` of that dimension (the layout of
:mod:`telescope.infinite._state`), as neural-tangents' ``_conv_kernel_full_spatial_shared``
does (with a diagonal filter). Here a dimension is ``k_d`` strided slice-adds, with no
convolution and no padded copy: an offset whose shifted window leaves the input (zero pads)
only adds to the outputs that stay inside, and a circular index that wraps splits into a few
runs. The first dimension writes a new tensor (and applies ``1/prod(k)``), as does every
dimension that changes the size; on large blocks the stride-1 ``"same"``/``"circular"``
dimensions are then averaged in place on it, row by row with a ring of saved rows, so a
size-preserving convolution peaks at the input plus the output.

``padding``: ``"valid"`` (none), ``"same"`` (XLA's low/high zeros, asymmetric for even
kernels) and ``"circular"`` (wrap-around on both axes of the pair, the ``"same"`` output size).
The arithmetic is :mod:`telescope.models.ntk_conv`'s, shared with the finite
:class:`~telescope.models.NTKConv`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from telescope.errors import UsageError
from telescope.models.ntk_conv import check_conv_geometry, conv_output_size, same_padding

__all__ = ["conv_covariance", "conv_output_size", "same_padding"]

_IN_PLACE_NUMEL = 1 << 18
"""Tensors of at least this many entries (2 MiB in float64) are averaged in place after the
first dimension (smaller ones: a new tensor per dimension, fewer and larger operations)."""


def conv_covariance(cov: Tensor, batch_ndim: int, kernel_size: Sequence[int],
                    stride: Sequence[int] | int = 1, padding: str = "valid") -> Tensor:
    """The covariance of a convolution's outputs, averaged over filter offsets.

    ``cov`` is ``[n1, n2, s1, s1', s2, s2', ...]`` (``batch_ndim=2``) or ``[n, s1, s1', ...]``
    (``batch_ndim=1``), one pair of axes per entry of ``kernel_size``. For every spatial
    dimension ``d`` (kernel ``k_d``, stride ``s_d``) the result is

        ``out[o, o'] = (1/k_d) sum_{delta=0}^{k_d-1} cov_pad[o s_d + delta, o' s_d + delta]``

    on that dimension's pair of axes, ``cov_pad`` the covariance padded on both axes (zeros
    with XLA's ``"same"`` low/high pads, wrap-around for ``"circular"``, none for
    ``"valid"``), so the whole map divides by ``prod(kernel_size)``. ``W_std``/``b_std`` are
    not applied: a Conv layer's NNGP is ``W_std^2 * conv_covariance(nngp) + b_std^2`` (see the
    module docstring; Novak et al. 2019, Arora et al. 2019).

    ``cov`` is never modified; when every ``kernel_size`` and ``stride`` is 1 (the identity) it
    is returned itself. Differentiable (in place only where no gradient is recorded).
    """
    kernel, strides, pad = check_conv_geometry(kernel_size, stride, padding)
    if batch_ndim not in (1, 2):
        raise UsageError(f"batch_ndim must be 1 ([n, ...]) or 2 ([n1, n2, ...]), got "
                         f"{batch_ndim!r}")
    if cov.ndim != batch_ndim + 2 * len(kernel):
        raise UsageError(f"a covariance for a {len(kernel)}-D convolution with batch_ndim="
                         f"{batch_ndim} has {batch_ndim + 2 * len(kernel)} axes (a pair per "
                         f"spatial dimension), got shape {tuple(cov.shape)}")
    for i in range(len(kernel)):
        axis = batch_ndim + 2 * i
        if cov.shape[axis] != cov.shape[axis + 1]:
            raise UsageError(f"the pair axes {axis} and {axis + 1} of the covariance differ in "
                             f"size: {tuple(cov.shape)}")
    # Dimensions that change the size (stride, "valid") write a new tensor, the first of them
    # scaled by 1/prod(k) for all dimensions at once; on a large tensor, stride-1
    # "same"/"circular" dimensions after it work in place (no further full-size allocation,
    # whose first touch costs more than the averaging itself on a CPU). If no dimension
    # changes the size, the innermost one writes the new tensor: in place is slowest on the
    # innermost (contiguous) pair, whose rows are short.
    in_place_ok = cov.numel() >= _IN_PLACE_NUMEL and not (
        cov.requires_grad and torch.is_grad_enabled())
    todo = [(batch_ndim + 2 * i, k, s) for i, (k, s) in enumerate(zip(kernel, strides,
                                                                      strict=True))
            if (k, s) != (1, 1)]  # (1, 1) is the identity
    in_place = [d for d in todo if in_place_ok and d[2] == 1 and pad != "valid"
                and d[1] <= cov.shape[d[0]]]
    new = [d for d in todo if d not in in_place]
    if not new and in_place:
        new.append(in_place.pop())
    for j, (axis, k, s) in enumerate(new):
        cov = _average(cov, axis, k, s, pad, 1.0 / math.prod(kernel) if j == 0 else 1.0)
    for axis, k, _ in in_place:
        _average_in_place(cov, axis, k, pad == "circular")
    return cov


def _segments(n: int, n_out: int, s: int, c: int, wrap: bool) -> list[tuple[int, int, int]]:
    """The outputs ``o`` whose source index ``o s + c`` lies in ``[0, n)`` (``wrap``: taken
    mod ``n``), as runs ``(first, last, source of first)`` along which the source steps by
    ``s``."""
    if not wrap:
        first, last = max(0, -(c // s)), min(n_out, (n - 1 - c) // s + 1)  # -(c//s) = ceil(-c/s)
        return [(first, last, first * s + c)] if first < last else []
    runs, o = [], 0
    while o < n_out:
        q = (o * s + c) // n  # how often the index has wrapped
        last = min(n_out, -((c - (q + 1) * n) // s))  # ceil(((q + 1) n - c) / s)
        runs.append((o, last, o * s + c - q * n))
        o = last
    return runs


def _average(cov: Tensor, axis: int, k: int, s: int, padding: str, scale: float) -> Tensor:
    """``scale * sum_delta cov_pad[o s + delta, o' s + delta]`` on the pair ``(axis, axis + 1)``
    as a new tensor: ``k`` strided slice-adds (a few more where the circular index wraps), the
    padding never materialized."""
    n = cov.shape[axis]
    n_out = conv_output_size(n, k, s, padding)
    low = same_padding(n, k, s)[0] if padding != "valid" else 0
    wrap = padding == "circular"
    lead = (slice(None),) * axis

    def src(start: int, length: int) -> slice:
        return slice(start, start + (length - 1) * s + 1, s)

    # delta = low reads index o * s, inside the input for every output (valid, same, circular)
    whole = src(0, n_out)
    base = cov[lead + (whole, whole)]
    out = torch.mul(base, scale) if scale != 1.0 else base.clone(
        memory_format=torch.contiguous_format)
    for delta in range(k):
        if delta == low:
            continue
        runs = _segments(n, n_out, s, delta - low, wrap)
        for r0, r1, rs in runs:
            for c0, c1, cs in runs:
                out[lead + (slice(r0, r1), slice(c0, c1))].add_(
                    cov[lead + (src(rs, r1 - r0), src(cs, c1 - c0))], alpha=scale)
    return out


def _average_in_place(cov: Tensor, axis: int, k: int, wrap: bool) -> None:
    """``cov[o, o'] <- sum_delta cov_pad[o + delta - low, o' + delta - low]`` on the pair
    ``(axis, axis + 1)``, stride 1, ``"same"`` (zeros) or circular (``wrap``), in place.

    Row ``o`` (of axis ``axis``) is rewritten after the rows it reads below it have been saved
    in a ring of ``low + 1`` rows (and, circularly, the first ``high`` rows, which the last rows
    read); rows above it are still unchanged. Needs ``k <= n`` (so ``low, high < n``)."""
    n = cov.shape[axis]
    low, high = same_padding(n, k, 1)
    ring = cov.new_empty((low + 1, *cov.select(axis, 0).shape)) if low else None
    head = cov.narrow(axis, 0, high).clone() if wrap and high else None
    for o in range(n):
        row = cov.select(axis, o)
        if ring is not None:
            ring[o % (low + 1)].copy_(row)
        for c in range(-low, high + 1):
            r = o + c
            if c == 0 or (not wrap and not 0 <= r < n):
                continue
            if 0 <= r < o:
                source = ring[r % (low + 1)]  # type: ignore[index]
            elif r >= n:
                source = head.select(axis, r - n)  # type: ignore[union-attr]
            else:
                source = cov.select(axis, r % n)  # rows above o (r < 0 wraps to n + r > o)
            _add_shifted(row, source, axis, c, n, wrap)


def _add_shifted(row: Tensor, source: Tensor, axis: int, c: int, n: int, wrap: bool) -> None:
    """``row[j] += source[j + c]`` along ``axis`` (zero outside ``[0, n)``, or mod ``n``)."""
    if wrap:
        m = c % n
        row.narrow(axis, 0, n - m).add_(source.narrow(axis, m, n - m))
        row.narrow(axis, n - m, m).add_(source.narrow(axis, 0, m))
    elif c > 0:
        row.narrow(axis, 0, n - c).add_(source.narrow(axis, c, n - c))
    else:
        row.narrow(axis, -c, n + c).add_(source.narrow(axis, 0, n + c))
