"""Blocked kernels: assembling a kernel from blocks of examples (using the symmetry), the cost
accounting that warns when a memory budget forces tiny blocks, per-example Jacobians and their
contraction. Shared by every method of :func:`telescope.ntk`."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, overload

import numpy as np
import torch
from torch import Tensor
from torch.func import jacrev

from telescope.errors import UsageError, warn
from telescope.kernels._functional import map_or_loop

SLOW_BLOCK_PAIRS = 20_000
"""More block pairs than this (each with its own Python and kernel-launch overhead, and
recomputed per-block work) makes a kernel far slower than it needs to be: warn."""
GOOD_BLOCK_PAIRS = 2_000
"""The block-pair count a suggested memory budget aims for."""


def block_pairs(n1: int, n2: int, block: int, symmetric: bool, chunks: int = 1) -> int:
    """Number of block pairs ``blocked_kernel`` evaluates (times the output chunks)."""
    a, b = -(-n1 // block), -(-n2 // block)
    return chunks * (a * (a + 1) // 2 if symmetric else a * b)


def block_for_pairs(n1: int, n2: int, symmetric: bool) -> int:
    """The smallest block size with at most ``GOOD_BLOCK_PAIRS`` block pairs."""
    block = 1
    while block_pairs(n1, n2, block, symmetric) > GOOD_BLOCK_PAIRS:
        block *= 2
    return block


def warn_small_blocks(block: int, n1: int, n2: int, budget: int, work: int,
                      suggestion: tuple[int, int] | None) -> None:
    """Warn that ``max_memory_gb`` forces blocks so small that the time explodes (``work``
    block computations), and which budget would avoid it (``suggestion = (bytes, block)``;
    ``None`` when no budget helps)."""
    hint = ("" if suggestion is None else
            f"; max_memory_gb={_round_up_gb(suggestion[0]):g} allows blocks of "
            f"{suggestion[1]}")
    warn(
        f"ntk: max_memory_gb={budget / 2**30:.3g} allows blocks of only {block} example(s) "
        f"({work:,} block computations for {n1} x {n2} examples, each with its own "
        f"overhead): this will take many times longer than it needs to{hint} (or pass "
        "block_size= to choose the blocks yourself)", RuntimeWarning)


def _round_up_gb(nbytes: int) -> float:
    """Bytes as GiB, rounded up to two significant digits."""
    gb = nbytes / 2**30
    scale = 10 ** (math.floor(math.log10(gb)) - 1)
    return math.ceil(gb / scale) * scale


BlockKernel = Callable[[Tensor, Tensor | None, object, object], tuple[Tensor, object, object]]
"""``block_kernel(xa, xb, cache_a, cache_b) -> (block, cache_a, cache_b)``, as
:func:`blocked_kernel` calls it."""


@overload
def blocked_kernel(block_kernel: BlockKernel, x1: Tensor, x2: Tensor | None, block_size: int,
                   output: str, n_out: int, dtype: torch.dtype, progress: bool,
                   sink: None = None) -> Tensor: ...
@overload
def blocked_kernel(block_kernel: BlockKernel, x1: Tensor, x2: Tensor | None, block_size: int,
                   output: str, n_out: int, dtype: torch.dtype, progress: bool,
                   sink: KernelFile) -> np.ndarray: ...
def blocked_kernel(
    block_kernel: BlockKernel,
    x1: Tensor,
    x2: Tensor | None,
    block_size: int,
    output: str,
    n_out: int,
    dtype: torch.dtype,
    progress: bool,
    sink: KernelFile | None = None,
) -> Tensor | np.ndarray:
    """Assemble a kernel from blocks, using the symmetry when ``x2`` is ``None``.

    ``block_kernel(xa, xb, cache_a, cache_b)`` returns the kernel block for ``(xa, xb)`` and the
    per-block caches (e.g. Jacobians), so a block's expensive part is computed once per outer
    row; ``xb=None`` means the diagonal block ``(xa, xa)``. With ``sink`` (a
    :class:`KernelFile`) every block goes to disk as it is done, blocks the file already holds
    are skipped (a resumed computation), and the file's memory-mapped array is returned.
    """
    symmetric = x2 is None
    xb_all = x1 if x2 is None else x2
    n1, n2 = x1.shape[0], xb_all.shape[0]
    if sink is None and n1 <= block_size and n2 <= block_size:  # one block: no assembly copy
        return block_kernel(x1, None if symmetric else x2, None, None)[0]
    shape = {"trace": (n1, n2), "full": (n1, n2, n_out, n_out), "diagonal": (n1, n2, n_out)}
    out = None if sink is not None else torch.empty(shape[output], dtype=dtype,
                                                     device=x1.device)
    starts1 = range(0, n1, block_size)
    starts2 = list(range(0, n2, block_size))
    pairs = [(a, b) for a in starts1 for b in starts2 if not symmetric or b >= a]
    todo = [pair for pair in pairs if sink is None or not sink.done(*pair)]
    bar = _progress(len(todo), progress)
    row, cache_a = None, None
    for a, b in todo:
        if a != row:
            row, cache_a = a, None
        xa, xb = x1[a:a + block_size], xb_all[b:b + block_size]
        diagonal = symmetric and a == b
        block, cache_a, _ = block_kernel(xa, None if diagonal else xb, cache_a, None)
        mirror = _transpose_block(block, output) if symmetric and b > a else None
        if sink is not None:
            sink.write(a, b, block, mirror)
        else:
            assert out is not None  # no sink: assembled in memory
            out[a:a + xa.shape[0], b:b + xb.shape[0]] = block
            if mirror is not None:
                out[b:b + xb.shape[0], a:a + xa.shape[0]] = mirror
        bar.update()
    bar.close()
    if sink is not None:
        return sink.result()
    assert out is not None  # no sink: assembled in memory
    return out


class KernelFile:
    """A kernel written block by block into ``path`` (a ``.npy`` file that numpy and torch open
    lazily), with the finished blocks recorded in ``path + ".progress.json"`` (written atomically
    after each block), so that a killed computation resumes where it stopped. ``fingerprint``
    names what the kernel is of (model parameters, inputs, method, output, blocks); a file
    holding another kernel is refused, never overwritten.

    Blocks go to disk with plain positioned writes (one per block row) and ``fsync`` before they
    are recorded, not through a memory map: a written map's pages stay
    in the writer's resident set, which would grow with the kernel (1.6 GB for a float32 trace
    kernel of N = 20,000), while this keeps the writer's memory at one block."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: torch.dtype,
                 fingerprint: str) -> None:
        self.path = Path(path)
        self.progress_path = self.path.with_name(self.path.name + ".progress.json")
        np_dtype = {torch.float64: np.float64, torch.float32: np.float32,
                    torch.float16: np.float16}.get(dtype)
        if np_dtype is None:
            raise UsageError(f"out=: a {dtype} kernel cannot be stored as .npy; use a float16, "
                             f"float32 or float64 model")
        self.fingerprint = fingerprint
        self.shape = tuple(shape)
        self.dtype = np.dtype(np_dtype)
        self.blocks: set[tuple[int, int]] = set()
        if self.path.exists():
            saved = self._read_progress()
            if saved is None or saved.get("fingerprint") != fingerprint:
                raise UsageError(
                    f"out={self.path} already holds another kernel (other model parameters, "
                    f"inputs or options, or no {self.progress_path.name}); delete it or choose "
                    f"another out")
            self.blocks = {tuple(b) for b in saved.get("blocks", [])}
            found = np.load(self.path, mmap_mode="r")
            if found.shape != self.shape or found.dtype != self.dtype:
                raise UsageError(f"out={self.path} has shape {found.shape}, expected "
                                 f"{self.shape}; delete it or choose another out")
            self.offset = found.offset
            del found
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = np.lib.format.open_memmap(self.path, mode="w+", dtype=np_dtype,
                                                shape=self.shape)
            self.offset = created.offset
            del created  # a sparse file of the right size; blocks are written below
            self._write_progress()

    def _read_progress(self) -> dict | None:
        try:
            return json.loads(self.progress_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _write_progress(self) -> None:
        text = json.dumps({"fingerprint": self.fingerprint, "shape": list(self.shape),
                           "blocks": sorted(self.blocks)})
        tmp = self.progress_path.with_name(self.progress_path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.progress_path)

    def done(self, a: int, b: int) -> bool:
        """Whether the block starting at rows ``a``, columns ``b`` is on disk."""
        return (a, b) in self.blocks

    def _put(self, f: BinaryIO, a: int, b: int, block: Tensor) -> None:
        """Rows ``a..`` and columns ``b..`` of the C-ordered array: one contiguous run per row."""
        data = np.ascontiguousarray(block.detach().cpu().numpy(), dtype=self.dtype)
        inner = int(np.prod(self.shape[2:], dtype=np.int64))  # output axes of a full kernel
        row_bytes = self.shape[1] * inner * self.dtype.itemsize
        start = self.offset + b * inner * self.dtype.itemsize
        for i in range(data.shape[0]):
            f.seek(start + (a + i) * row_bytes)
            f.write(memoryview(data[i]).cast("B"))

    def write(self, a: int, b: int, block: Tensor, mirror: Tensor | None) -> None:
        """The block at ``(a, b)`` (and its transpose at ``(b, a)``), on disk, then recorded."""
        with open(self.path, "r+b") as f:
            self._put(f, a, b, block)
            if mirror is not None:
                self._put(f, b, a, mirror)
            f.flush()
            os.fsync(f.fileno())
        self.blocks.add((a, b))
        self._write_progress()

    def result(self) -> np.ndarray:
        """The finished kernel, memory-mapped read-only."""
        return np.load(self.path, mmap_mode="r")


def _transpose_block(block: Tensor, output: str) -> Tensor:
    """K(x2, x1) from K(x1, x2): swap the example axes (and the output axes of a full kernel)."""
    if output == "full":
        return block.permute(1, 0, 3, 2)
    return block.transpose(0, 1)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled or total <= 1:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="ntk blocks", leave=False)


CONTRACT_CHUNK = 2**20
"""Parameters per chunk of a low-precision Jacobian contraction (each chunk is multiplied in
float64)."""


def contract(j1: Tensor, j2: Tensor, output: str) -> Tensor:
    """Kernel block from per-example gradients ``j1 [B1, O, P]`` and ``j2 [B2, O, P]``.

    In float64 one matmul. In lower precision the parameter axis is contracted in chunks of
    :data:`CONTRACT_CHUNK`, each converted to float64 and accumulated there, then the result
    is cast back: a single float32 matmul over millions of parameters loses about
    ``P * eps`` of relative accuracy (7.8e-3 on a 5.8M-parameter MLP's trace kernel; 5e-13
    chunked), more than the Jacobians themselves carry.
    """
    if j1.dtype == torch.float64:
        return _contract(j1, j2, output)
    p = j1.shape[2]
    acc = None
    for start in range(0, p, CONTRACT_CHUNK):
        c1 = j1[:, :, start:start + CONTRACT_CHUNK].double()
        c2 = c1 if j2 is j1 else j2[:, :, start:start + CONTRACT_CHUNK].double()
        part = _contract(c1, c2, output)
        acc = part if acc is None else acc.add_(part)
    assert acc is not None  # p >= 1 parameter: at least one chunk
    return acc.to(j1.dtype)


def _contract(j1: Tensor, j2: Tensor, output: str) -> Tensor:
    b1, o, _ = j1.shape
    b2 = j2.shape[0]
    if output == "trace":
        return j1.reshape(b1, -1) @ j2.reshape(b2, -1).T
    if output == "full":
        return (j1.reshape(b1 * o, -1) @ j2.reshape(b2 * o, -1).T).view(b1, o, b2, o).permute(
            0, 2, 1, 3)
    return torch.bmm(j1.transpose(0, 1), j2.permute(1, 2, 0)).permute(1, 2, 0)


def per_example_jacobian(f_single: Callable, params: dict[str, Tensor], x: Tensor, *,
                         owner: object = None) -> Tensor:
    """``J [B, O, P]``: per-example Jacobians of ``f_single(params, x_i) -> [O]`` (flattened),
    by ``vmap(jacrev)``, or one example at a time where the model cannot run under ``vmap``
    (:func:`~telescope.kernels._functional.map_or_loop`; ``owner`` remembers that)."""
    jac = map_or_loop(jacrev(f_single), (None, 0), params, x, owner=owner,
                      what="the per-example Jacobian")
    b = x.shape[0]
    return torch.cat([j.reshape(b, j.shape[1], -1) for j in jac.values()], dim=2)


def reduce_full(full: Tensor, output: str) -> Tensor:
    """``[B1, B2, O, O]`` -> the requested output kind."""
    if output == "full":
        return full
    diag = full.diagonal(dim1=2, dim2=3)
    return diag.sum(-1) if output == "trace" else diag
