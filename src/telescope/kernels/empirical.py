"""The empirical neural tangent kernel of any ``torch.nn.Module``.

For a network ``f(x; theta)`` with outputs ``f_o`` the empirical NTK (Jacot, Gabriel & Hongler,
2018) between inputs ``x`` and ``x'`` is the ``O x O`` matrix

    Theta(x, x')[o, o'] = < d f_o(x) / d theta ,  d f_o'(x') / d theta >

summed over every trainable parameter. Three methods compute it (all agree to round-off):

- ``"jacobian"``: per-example Jacobians ``J(x) = d f(x)/d theta`` (``[O, P]``) by ``vmap(jacrev)``,
  contracted block by block (Novak et al., 2022, "Jacobian contraction").
- ``"vector"``: NTK-vector products. One VJP per ``x1`` point and output gives the weight-space
  vector ``v = J(x1_i)^T e_o``; one batched forward-mode JVP over the whole ``x2`` block with
  tangent ``v`` gives ``J(x2) v = Theta(x2, x1_i)[:, :, o]``. No pair ever gets its own
  weight-space tangent.
- ``"structured"``: per-layer factorized kernels (:mod:`telescope.kernels.structured`), e.g. for a
  linear layer ``<a(x), a(x')> <delta(x), delta(x')>`` summed over tokens, far cheaper than
  materializing Jacobians. Modules without a rule fall back to the Jacobian method for their own
  parameters only.
"""

from __future__ import annotations

import hashlib
import os
from typing import overload

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jvp

from telescope.errors import UsageError
from telescope.kernels._blocks import (
    SLOW_BLOCK_PAIRS,
    KernelFile,
    block_for_pairs,
    block_pairs,
    blocked_kernel,
    contract,
    per_example_jacobian,
    reduce_full,
    warn_small_blocks,
)
from telescope.kernels._functional import (
    ParamSpec,
    ad_safe_backends,
    batched_fn,
    checked_call,
    frozen_state,
    map_or_loop,
    model_dtype_device,
    num_outputs,
    only_params,
    parse_memory,
    select_params,
    single_fn,
    trainable_params,
)
from telescope.kernels.distributed import RAY_BLOCK_SIZE, ray_blocked_kernel
from telescope.kernels.structured import structured_ntk

METHODS = ("auto", "jacobian", "vector", "structured")
OUTPUTS = ("trace", "full", "diagonal")


@overload
def ntk(model: nn.Module, x1: Tensor, x2: Tensor | None = None, *, method: str = "auto",
        output: str = "trace", block_size: int | None = None,
        max_memory_gb: float | None = None, progress: bool = False, params: ParamSpec = None,
        out: None = None, executor: str | None = None, address: str | None = None) -> Tensor: ...
@overload
def ntk(model: nn.Module, x1: Tensor, x2: Tensor | None = None, *, method: str = "auto",
        output: str = "trace", block_size: int | None = None,
        max_memory_gb: float | None = None, progress: bool = False, params: ParamSpec = None,
        out: str | os.PathLike, executor: str | None = None,
        address: str | None = None) -> np.ndarray: ...
def ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    method: str = "auto",
    output: str = "trace",
    block_size: int | None = None,
    max_memory_gb: float | None = None,
    progress: bool = False,
    params: ParamSpec = None,
    out: str | os.PathLike | None = None,
    executor: str | None = None,
    address: str | None = None,
) -> Tensor | np.ndarray:
    """Empirical neural tangent kernel of ``model`` between ``x1`` and ``x2``.

    Parameters
    ----------
    model:
        Any module mapping a batch ``[N, ...]`` to ``[N]`` or ``[N, O]`` (trailing output dims
        are flattened into ``O``). It is evaluated at its current parameters and train/eval mode
        and is left exactly as it was (parameters, ``.grad``, mode). Only parameters with
        ``requires_grad=True`` count. Models whose output for one example depends on the other
        examples of the batch (BatchNorm in train mode, ``h - h.mean(0)``: checked once per
        model by comparing a batched and a per-example forward), random models (dropout in
        train mode), and parameters on the meta device or holding NaN/inf raise an error that
        explains the fix.
    x1, x2:
        Inputs ``[N1, ...]`` and ``[N2, ...]`` of any dtype the model takes (integer tokens
        included). ``x2=None`` means ``x2 = x1`` and uses the symmetry of the kernel (so does
        an ``x2`` that is, or equals, ``x1``).
    method:
        ``"jacobian"``, ``"vector"``, ``"structured"`` or ``"auto"`` (structured, the fastest).
    output:
        ``"trace"``: ``[N1, N2]``, ``K[i, j] = sum_o <df_o(x1_i)/dtheta, df_o(x2_j)/dtheta>``;
        ``"full"``: ``[N1, N2, O, O]``; ``"diagonal"``: ``[N1, N2, O]`` (``o = o'``).
    block_size:
        Examples per block; chosen from ``max_memory_gb`` when ``None``.
    max_memory_gb:
        Memory budget for the blocked computation (default 2 GiB).
    progress:
        Show a progress bar over blocks.
    params:
        The kernel of a subset of the parameters: names, glob patterns (``"*.bias"``,
        ``"transformer.h.3.*"``), a list of them, or a predicate ``(name, param) -> bool``
        (head-only, bias-only or LoRA-only kernels; Malladi et al. 2023, "A Kernel-Based View
        of Language Model Fine-Tuning"). ``None``: every trainable parameter.
    out:
        A path: the kernel is written block by block into this ``.npy`` file (memory-mapped,
        RAM bounded by the blocks, for kernels larger than memory) and returned as a read-only
        ``numpy.memmap``; finished blocks are recorded in ``out + ".progress.json"``, so the
        same call after a kill resumes where it stopped. A file holding another kernel (other
        parameters, inputs or options) is refused. ``np.load(out, mmap_mode="r")`` or
        ``torch.from_numpy`` open it later.
    executor, address:
        ``None``/``"local"``: this process. ``"ray"`` (with ``out``; ``pip install
        'telescope[ray]'``): every block is a Ray task on a local instance, or on the cluster at
        ``address``, computed by the same code in the worker and written into ``out`` by this
        process as it arrives (resumable the same way; ``block_size`` defaults to 512
        examples). Same numbers as the local path to round-off.

    Returns
    -------
    Tensor in the model's dtype and device (a ``numpy.memmap`` with ``out``).

    References
    ----------
    Jacot, Gabriel & Hongler (2018), "Neural Tangent Kernel". Novak, Sohl-Dickstein & Schoenholz
    (2022), "Fast Finite Width Neural Tangent Kernel".
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if executor not in (None, "local", "ray"):
        raise UsageError(f"executor must be None, 'local' or 'ray', got {executor!r}")
    if executor == "ray" and out is None:
        raise UsageError("executor='ray' writes the kernel block by block into a file: give "
                         "out=PATH (a .npy the driver fills as the tasks finish)")
    if address is not None and executor != "ray":
        raise UsageError("address= is the Ray cluster's address: use it with executor='ray'")
    with only_params(model, select_params(model, params)):
        return _ntk(model, x1, x2, method=method, output=output, block_size=block_size,
                    max_memory_gb=max_memory_gb, progress=progress, out=out,
                    ray=executor == "ray", address=address)


def _ntk(model: nn.Module, x1: Tensor, x2: Tensor | None, *, method: str, output: str,
         block_size: int | None, max_memory_gb: float | None, progress: bool,
         out: str | os.PathLike | None = None, ray: bool = False,
         address: str | None = None) -> Tensor | np.ndarray:
    if method not in METHODS:
        raise UsageError(f"method must be one of {METHODS}, got {method!r}")
    if output not in OUTPUTS:
        raise UsageError(f"output must be one of {OUTPUTS}, got {output!r}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise UsageError(f"block_size must be a positive int or None, got {block_size!r}")
    budget = parse_memory(max_memory_gb)
    with ad_safe_backends(model):
        x1, x2 = checked_call(model, x1, x2)
    if x2 is not None and (x2 is x1 or (x2.shape == x1.shape and torch.equal(x2, x1))):
        x2 = None  # the same points: the symmetric path (each off-diagonal block once)
    dtype, _ = model_dtype_device(model)
    if method == "auto":
        method = "structured"
    n_out = num_outputs(model, x1) if method != "structured" or out is not None else None
    sink = None
    if out is not None:
        assert n_out is not None  # computed when out is given
        n1, n2 = x1.shape[0], x1.shape[0] if x2 is None else x2.shape[0]
        shape = {"trace": (n1, n2), "full": (n1, n2, n_out, n_out),
                 "diagonal": (n1, n2, n_out)}[output]
        ray_block = block_size or RAY_BLOCK_SIZE
        sink = KernelFile(out, shape, dtype, _fingerprint(model, x1, x2, method, output,
                                                           ray_block if ray else block_size,
                                                           budget, ray))
        if ray:
            return ray_blocked_kernel(ntk, model, x1, x2, method=method, output=output,
                                      block_size=ray_block, max_memory_gb=max_memory_gb,
                                      sink=sink, progress=progress, address=address)
    with ad_safe_backends(model):
        if method == "structured":
            return structured_ntk(model, x1, x2, output=output, block_size=block_size,
                                  budget=budget, progress=progress, sink=sink)
        assert n_out is not None  # computed for every method but structured
        params = trainable_params(model)
        n_params = sum(p.numel() for p in params.values())
        itemsize = torch.finfo(dtype).bits // 8
        if block_size is None:
            # a block's Jacobians [B, O, P], the other block's, and jacrev's output buffer
            per_example = 3 * n_out * n_params * itemsize
            block_size = max(1, budget // per_example)
            n1, n2 = x1.shape[0], x1.shape[0] if x2 is None else x2.shape[0]
            work = block_pairs(n1, n2, block_size, x2 is None)
            if work > SLOW_BLOCK_PAIRS:
                good = block_for_pairs(n1, n2, x2 is None)
                warn_small_blocks(block_size, n1, n2, budget, work,
                                  (good * per_example, good))
        frozen = frozen_state(model)
        if method == "jacobian":
            n_all = x1.shape[0] + (0 if x2 is None else x2.shape[0])
            # every block's Jacobians kept (each computed once) when they fit in 3/4 of the
            # budget, the rest being one block's computation
            keep = n_all * n_out * n_params * itemsize <= 3 * budget // 4
            block_kernel = _jacobian_block_fn(model, frozen, params, output, keep)
        else:
            block_kernel = _vector_block_fn(model, frozen, params, output, n_out, budget)
        return blocked_kernel(block_kernel, x1, x2, block_size, output, n_out, dtype, progress,
                              sink)


def _fingerprint(model: nn.Module, x1: Tensor, x2: Tensor | None, method: str, output: str,
                 block_size: int | None, budget: int, ray: bool = False) -> str:
    """SHA-1 of what a kernel file holds: the trainable parameters' names and values, the
    buffers, the inputs, the method, output kind and the blocking (so a resumed computation
    is the same computation)."""
    h = hashlib.sha1()
    h.update(repr((method, output, block_size, budget, torch.__version__)
                  + (("ray",) if ray else ())).encode())
    tensors: list[tuple[str, Tensor]] = [
        (f"param:{n}", p) for n, p in model.named_parameters() if p.requires_grad]
    tensors += [(f"buffer:{n}", b) for n, b in model.named_buffers()]
    tensors += [("x1", x1)] + ([] if x2 is None else [("x2", x2)])
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _jacobian_block_fn(model, frozen, params, output, keep: bool):
    """Blocks from per-example Jacobians; with ``keep`` every block's Jacobians are computed
    once and kept (they fit in 3/4 of the budget), else the second block's are recomputed per
    block pair (the first block's are reused along its row)."""
    f_single = single_fn(model, frozen)
    kept: dict[tuple[int, int], Tensor] = {}

    def jacobians(x: Tensor) -> Tensor:
        key = (x.data_ptr(), x.shape[0])
        if key in kept:
            return kept[key]
        j = per_example_jacobian(f_single, params, x, owner=model)
        if keep:
            kept[key] = j
        return j

    def block_kernel(xa, xb, cache_a, cache_b):
        ja = cache_a if cache_a is not None else jacobians(xa)
        if xb is None:
            return contract(ja, ja, output), ja, ja
        jb = cache_b if cache_b is not None else jacobians(xb)
        return contract(ja, jb, output), ja, jb

    return block_kernel


def _vector_block_fn(model, frozen, params, output, n_out, budget):
    f_single = single_fn(model, frozen)
    f_batch = batched_fn(model, frozen)
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    itemsize = next(iter(params.values())).element_size()

    def unflatten(v: Tensor) -> dict[str, Tensor]:
        return {n: c.view(s) for n, c, s in zip(names, v.split(sizes), shapes, strict=True)}

    def jvp_rows(xb: Tensor, v: Tensor) -> Tensor:
        # J(xb) v for one weight-space tangent v (flattened): one forward-mode pass over xb
        return jvp(lambda p: f_batch(p, xb), (params,), (unflatten(v),))[1]

    def block_kernel(xa, xb, cache_a, cache_b):
        # one VJP per x1 point and output: the rows v = J(x1_i)^T e_o, [Ba, O, P]
        va = cache_a if cache_a is not None else per_example_jacobian(f_single, params, xa,
                                                                           owner=model)
        xb = xa if xb is None else xb
        rows = va.reshape(-1, va.shape[2])
        # batched JVPs over the whole xb block: one per row, chunked by activation memory
        act_bytes = 8 * xb.shape[0] * max(sum(sizes) // 64, n_out) * itemsize
        chunk = max(1, min(rows.shape[0], budget // max(act_bytes, 1)))
        prods = torch.cat([map_or_loop(jvp_rows, (None, 0), xb, rows[c:c + chunk],
                                       owner=model, what="the NTK-vector product")
                           for c in range(0, rows.shape[0], chunk)])
        # prods[(i, o), j, o'] = <df_o(xa_i), df_o'(xb_j)>
        full = prods.view(xa.shape[0], n_out, xb.shape[0], n_out).permute(0, 2, 1, 3)
        return reduce_full(full, output), va, None

    return block_kernel


