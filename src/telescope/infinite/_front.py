"""The front doors every infinite-width layer shares: ``kernel`` (blocked over example pairs)
and ``module`` (the finite network), with the input checks and the layout inference."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from telescope.errors import UsageError
from telescope.infinite._state import LAYOUTS, Covariances, Geometry

__all__ = ["kernel", "module", "input_covariances", "resolve_layout"]

# float64 entries alive per pair entry while a block runs (nngp, ntk and temporaries)
_TENSORS_PER_ENTRY = 6
# covariance entries per pair of blocks that keep a block's tensors in a CPU's cache
_CACHE_ENTRIES = 2**19


def resolve_layout(arch: Any, ndim: int, layout: str | None, what: str) -> str:
    """The layout of an input with ``ndim`` per-example axes: given, fixed by the first
    layout-bound layer of ``arch``, or flat for one axis."""
    if layout is not None:
        if layout not in LAYOUTS:
            raise UsageError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if (layout == "flat") != (ndim == 1):
            raise UsageError(
                f"layout={layout!r} does not fit {what} with {ndim} axes per example: 'flat' is "
                "[N, F]; 'channels_first' [N, C, *spatial]; 'channels_last' [N, *tokens, D]")
        return layout
    if ndim == 1:
        return "flat"
    found = arch.first_layout()
    if found is None:
        raise UsageError(
            f"cannot tell which axis of {what} holds the channels: no layer of the architecture "
            "fixes it (Conv takes [N, C, *spatial]; Dense, LayerNorm and SelfAttention act on "
            "the last axis); pass layout='channels_first' or layout='channels_last'")
    return found


def _input_geometry(shape: tuple[int, ...], layout: str, finite: bool) -> Geometry:
    if layout == "flat":
        return Geometry("flat", (), shape[0] if finite else None)
    if layout == "channels_first":
        return Geometry(layout, tuple(shape[1:]), shape[0] if finite else None)
    return Geometry(layout, tuple(shape[:-1]), shape[-1] if finite else None)


def _check_batch(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise UsageError(f"{name} must be a torch.Tensor [N, ...], got {type(x).__name__}")
    if x.dim() < 2:
        raise UsageError(
            f"{name} must have shape [N, ...] with at least one feature axis, got shape "
            f"{tuple(x.shape)} (for N scalar inputs use x.reshape(-1, 1))")
    if x.is_complex() or x.dtype == torch.bool:
        raise UsageError(f"{name} must be real numbers, got dtype {x.dtype}")
    if x.shape[0] == 0 or any(s == 0 for s in x.shape[1:]):
        raise UsageError(f"{name} is empty (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise UsageError(f"{name} contains NaN or infinite values")
    return x


def _channels_to_rows(x: Tensor, layout: str) -> Tensor:
    """``[n, C, P]`` (channels, flattened positions) from a batch in ``layout``."""
    if layout == "flat":
        return x.reshape(x.shape[0], x.shape[1], 1)
    if layout == "channels_first":
        return x.reshape(x.shape[0], x.shape[1], -1)
    return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)


def _interleave(t: Tensor, batch_ndim: int, spatial: tuple[int, ...]) -> Tensor:
    """``[*batch, P, Q]`` -> ``[*batch, s1, s1', s2, s2', ...]``."""
    k = len(spatial)
    t = t.reshape(*t.shape[:batch_ndim], *spatial, *spatial)
    order = list(range(batch_ndim))
    for d in range(k):
        order += [batch_ndim + d, batch_ndim + k + d]
    return t.permute(order).contiguous()


def input_covariances(x1: Tensor, x2: Tensor | None, layout: str,
                      dtype: torch.dtype) -> Covariances:
    """The covariances of the inputs themselves: ``<x[:, s], x'[:, s']> / C`` over channels."""
    spatial = _input_geometry(tuple(x1.shape[1:]), layout, False).spatial
    a = _channels_to_rows(x1.to(dtype), layout)
    channels = a.shape[1]
    var1 = _interleave(torch.einsum("icp,icq->ipq", a, a) / channels, 1, spatial)
    if x2 is None:
        nngp = _interleave(torch.einsum("icp,jcq->ijpq", a, a) / channels, 2, spatial)
        var2 = var1
    else:
        b = _channels_to_rows(x2.to(dtype), layout)
        nngp = _interleave(torch.einsum("icp,jcq->ijpq", a, b) / channels, 2, spatial)
        var2 = _interleave(torch.einsum("icp,icq->ipq", b, b) / channels, 1, spatial)
    if layout == "flat":
        nngp, var1 = nngp.reshape(nngp.shape[:2]), var1.reshape(var1.shape[:1])
        var2 = var1 if x2 is None else var2.reshape(var2.shape[:1])
    return Covariances(nngp=nngp, ntk=torch.zeros_like(nngp), var1=var1, var2=var2,
                       geometry=Geometry(layout, spatial), symmetric=x2 is None,
                       gaussian=True, fresh=False)


def _block_size(block_size: int | None, max_memory_gb: float, pair_entries: int,
                n: int) -> int:
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) \
                or block_size < 1:
            raise UsageError(f"block_size must be a positive int, got {block_size!r}")
        return min(int(block_size), n)
    if isinstance(max_memory_gb, bool) or not isinstance(max_memory_gb, numbers.Real) \
            or not max_memory_gb > 0:
        raise UsageError(f"max_memory_gb must be a positive number, got {max_memory_gb!r}")
    budget = float(max_memory_gb) * 2**30 / (8 * _TENSORS_PER_ENTRY * pair_entries)
    # the layers are elementwise and memory-bound: blocks whose covariances stay in cache run
    # up to 4x faster per pair than large ones (measured: a CNN's 8x8 spatial pairs, 0.16 ms
    # per pair in blocks of 8 examples, 0.65 ms in blocks of 48)
    cached = math.isqrt(_CACHE_ENTRIES // pair_entries)
    return max(1, min(n, int(math.isqrt(int(budget))), cached))


def kernel(arch: Any, x1: Tensor, x2: Tensor | None = None, *, layout: str | None = None,
           block_size: int | None = None, max_memory_gb: float = 1.0,
           dtype: torch.dtype = torch.float64, progress: bool = False) -> dict[str, Tensor]:
    """See :meth:`telescope.infinite.Layer.kernel` (the docstring of the public method)."""
    x1 = _check_batch(x1, "x1")
    if x2 is x1:
        x2 = None
    if x2 is not None:
        x2 = _check_batch(x2, "x2")
        if x2.shape[1:] != x1.shape[1:]:
            raise UsageError(
                f"x1 and x2 must have the same shape per example: x1 is {tuple(x1.shape)}, x2 is "
                f"{tuple(x2.shape)}")
        if x2.device != x1.device:
            raise UsageError(f"x1 is on {x1.device} but x2 is on {x2.device}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UsageError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    layout = resolve_layout(arch, x1.dim() - 1, layout, "x1")
    shape = _input_geometry(tuple(x1.shape[1:]), layout, False)
    out_shape = arch.geometry(shape)
    if isinstance(out_shape, tuple):
        raise UsageError(
            f"the architecture ends with {len(out_shape)} branches; merge them with FanInSum()")
    pair_entries = arch.max_pair_entries(shape)
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    b = _block_size(block_size, max_memory_gb, pair_entries, max(n1, n2))
    if x2 is None and block_size is None and n1 >= 8 and n1 * n1 * pair_entries > 2**20:
        # the symmetric kernel computes only the blocks on and above the diagonal: with k row
        # blocks that is (k + 1) / (2k) of the pairs, so a large single block is split in four
        # (not a small one, where the per-block overhead would dominate)
        b = min(b, -(-n1 // 4))
    out_pairs = tuple(s for size in out_shape.spatial for s in (size, size))
    nngp = torch.empty(n1, n2, *out_pairs, dtype=dtype, device=x1.device)
    ntk = torch.empty_like(nngp)
    blocks = [(i, j) for i in range(0, n1, b) for j in range(0, n2, b)
              if x2 is not None or j >= i]
    bar = _progress_bar(len(blocks), progress)
    for i, j in blocks:
        rows = x1[i:i + b]
        if x2 is None and i == j:
            cov = input_covariances(rows, None, layout, dtype)
        else:
            cols = (x1 if x2 is None else x2)[j:j + b]
            cov = input_covariances(rows, cols, layout, dtype)
        out = arch.apply(cov)
        if isinstance(out, tuple):  # pragma: no cover - geometry() refuses this first
            raise UsageError("the architecture ends with several branches; merge them")
        if x2 is None and i == j:  # exactly symmetric, whatever order the sums ran in
            out = out.replace(nngp=0.5 * (out.nngp + _swap(out.nngp)),
                              ntk=0.5 * (out.ntk + _swap(out.ntk)))
        nngp[i:i + b, j:j + b] = out.nngp
        ntk[i:i + b, j:j + b] = out.ntk
        if x2 is None and j != i:
            nngp[j:j + b, i:i + b] = _swap(out.nngp)
            ntk[j:j + b, i:i + b] = _swap(out.ntk)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"nngp": nngp, "ntk": ntk}


def _swap(t: Tensor) -> Tensor:
    """The block of the swapped pair: exchange the batch axes and each pair's two axes."""
    order = [1, 0]
    for a in range(2, t.dim(), 2):
        order += [a + 1, a]
    return t.permute(order)


def _progress_bar(total: int, progress: bool) -> Any:
    if not progress or total <= 1:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc="infinite-width kernel", unit="block")


def module(arch: Any, in_shape: object, *, layout: str | None = None) -> nn.Module:
    """See :meth:`telescope.infinite.Layer.module`."""
    if isinstance(in_shape, numbers.Integral) and not isinstance(in_shape, bool):
        in_shape = (int(in_shape),)
    if not isinstance(in_shape, (tuple, list, torch.Size)) or not in_shape or any(
            isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1
            for s in in_shape):
        raise UsageError(
            "in_shape must be the shape of one example (positive ints, no batch axis), e.g. "
            f"(784,), (3, 32, 32) or (16, 64); got {in_shape!r}")
    shape = tuple(int(s) for s in in_shape)
    layout = resolve_layout(arch, len(shape), layout, "in_shape")
    geometry = _input_geometry(shape, layout, True)
    arch.geometry(geometry)  # checks the description fits this input
    return arch.build(geometry)
