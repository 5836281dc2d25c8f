"""The kernel of one pair of example blocks from their factors (:func:`_block_kernel_fn`): per
layer the cheaper of two contractions (:func:`_accumulate` weighs them),

- *token Gram* (:func:`_token_gram`): ``sum_{s,s'} k(s, s') <d_s, d'_s'>`` -- cost
  ``(B S)^2 (in + m out)``;
- *per-example gradients* (:func:`_contract_grads`): ``G = sum_s d_s a_s^T`` then ``<G, G'>``
  -- cost ``B^2 m out in``, plus the memory-bound writing of ``G`` (:data:`WRITE_COST`),

added into the trace, diagonal or full kernel. A symmetric block (``xb is None``) is
accumulated over every layer on its upper triangle of example chunks only (:func:`_chunks`), and
mirrored once at the end (:func:`_mirror`): about half the multiplications and none of the
per-layer transposed copies. :func:`gram` multiplies only the upper block triangle of a
symmetric Gram (the token contractions use it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from telescope.kernels._engine import _Engine
from telescope.kernels._rule_protocol import GradFactor, TokenFactor


def _block_kernel_fn(engine: _Engine, n_out: int, output: str, outputs: Tensor | None,
                     cache: dict | None):
    """Kernel of one block pair for the given outputs; ``cache`` keeps every block's factors."""
    n_sel = n_out if outputs is None else len(outputs)

    def get(x: Tensor, known):
        if known is not None:
            return known
        key = (x.data_ptr(), x.shape[0])
        if cache is not None and key in cache:
            return cache[key]
        f = engine.factors(x, n_out, outputs)
        if cache is not None:
            cache[key] = f
        return f

    def kernel(xa, xb, cache_a, cache_b):
        fa = get(xa, cache_a)
        same = xb is None
        if same:
            xb, fb = xa, fa
        else:
            fb = get(xb, cache_b)
        b1, b2 = xa.shape[0], xb.shape[0]
        # full kernels accumulate as [B1, O, B2, O] (the natural layout of the Gram matmuls)
        shape = {"trace": (b1, b2), "diagonal": (b1, b2, n_sel),
                 "full": (b1, n_sel, b2, n_sel)}[output]
        acc = torch.zeros(shape, dtype=engine.dtype, device=xa.device)
        chunks = _chunks(b1) if same else None
        for f1, f2 in zip(fa, fb, strict=True):
            _accumulate(acc, f1, f2, output, same, chunks)
        if chunks is not None:
            _mirror(acc, chunks, output)
        return (acc.permute(0, 2, 1, 3) if output == "full" else acc), fa, fb

    return kernel


def gram(x: Tensor, y: Tensor | None = None) -> Tensor:
    """``x @ y.T``; for ``y=None`` only the upper block triangle of ``x @ x.T`` is multiplied."""
    if y is not None:
        return x @ y.T
    n = x.shape[0]
    chunk = max(256, -(-n // 8))
    if n <= chunk:
        return x @ x.T
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    starts = range(0, n, chunk)
    for i in starts:
        xi = x[i:i + chunk]
        out[i:i + chunk, i:] = xi @ x[i:].T
        out[i + chunk:, i:i + chunk] = out[i:i + chunk, i + chunk:].T
    return out


WRITE_COST = 64
"""Multiply-adds that writing one element of the per-example gradients costs, in the cost model
of :func:`_accumulate`: forming ``G = sum_s d_s a_s^T`` contracts only the ``s`` tokens per
output element, so it runs at the memory's pace, not the matmul rate (measured on a 2-core AVX2
machine: 13 % of the matmul rate at 16 tokens, 35 % at 64, 64 % at 256; at 16 tokens 1.2 ns per
element written, the time of about 64 multiply-adds on one thread and 124 on two). Without it,
the 2-layer transformer of ``bench/bench_ntk.py`` (16 tokens) took the gradient route for most
layers and its trace kernel took 51 s instead of 25 s."""

Chunks = list[tuple[int, int]]
"""Example chunks ``(start, stop)`` of a symmetric block: only rows ``start:stop`` times columns
``start:`` are accumulated."""

SYMMETRIC_CHUNKS = 8
MIN_CHUNK = 32


def _chunks(b: int) -> Chunks:
    """At most :data:`SYMMETRIC_CHUNKS` chunks of at least :data:`MIN_CHUNK` examples: the upper
    triangle costs ``(k + 1) / 2k`` of the square for ``k`` chunks, while chunks of a few dozen
    rows still multiply at the full matmul rate."""
    size = max(MIN_CHUNK, -(-b // SYMMETRIC_CHUNKS))
    return [(i, min(i + size, b)) for i in range(0, b, size)]


def _mirror(acc: Tensor, chunks: Chunks, output: str) -> None:
    """Fill the lower chunk triangle of a symmetric block from the upper one, and the lower
    triangle of each diagonal chunk from its upper triangle (a matmul's ``(i, j)`` and ``(j, i)``
    entries may round differently), so that the block is exactly symmetric."""
    b = acc.shape[0]
    o = acc.shape[1] if output == "full" else 1
    square = acc.view(b * o, b * o) if output == "full" else acc  # [B O, B O] / [B, B(, O)]
    for start, stop in chunks:
        if stop < b:
            if output == "full":   # [B, O, B, O]
                acc[stop:, :, start:stop] = acc[start:stop, :, stop:].permute(2, 3, 0, 1)
            else:                  # [B, B] or [B, B, O]
                acc[stop:, start:stop] = acc[start:stop, stop:].transpose(0, 1)
        rows, cols = torch.tril_indices((stop - start) * o, (stop - start) * o, -1,
                                        device=acc.device)
        block = square[start * o:stop * o, start * o:stop * o]
        block[rows, cols] = block[cols, rows]


def _upper_gram(acc2d: Tensor, x: Tensor, chunks: Chunks, rows: int = 1) -> None:
    """``acc2d += x @ x.T`` on the upper chunk triangle; chunk bounds are in examples, ``rows``
    rows of ``x`` (and of ``acc2d``) per example."""
    for start, stop in chunks:
        acc2d[start * rows:stop * rows, start * rows:] += (x[start * rows:stop * rows]
                                                           @ x[start * rows:].T)


def _contract_grads(acc: Tensor, g1: Tensor, g2: Tensor, output: str, same: bool,
                    chunks: Chunks | None = None) -> None:
    """Add the kernel of per-example gradients ``g [B, O, P]`` to ``acc`` (only its upper
    chunk triangle with ``chunks``)."""
    b1, o = g1.shape[:2]
    b2 = g2.shape[0]
    if chunks is not None and output == "trace":
        _upper_gram(acc, g1.reshape(b1, -1), chunks)
    elif chunks is not None and output == "full":
        _upper_gram(acc.view(b1 * o, b1 * o), g1.reshape(b1 * o, -1), chunks, rows=o)
    elif output == "trace":
        acc += gram(g1.reshape(b1, -1), None if same else g2.reshape(b2, -1))
    elif output == "full":
        acc += gram(g1.reshape(b1 * o, -1), None if same else g2.reshape(b2 * o, -1)).view(
            acc.shape)
    else:
        acc += torch.bmm(g1.transpose(0, 1), g2.permute(1, 2, 0)).permute(1, 2, 0)


def _accumulate(acc: Tensor, f1, f2, output: str, same: bool,
                chunks: Chunks | None = None) -> None:
    """Add one layer's kernel to ``acc``; with ``chunks`` (a symmetric block) the upper chunk
    triangle is exact and the rest is left for :func:`_mirror`."""
    if isinstance(f1, GradFactor):
        _contract_grads(acc, f1.g, f2.g, output, same, chunks)
        return
    b1, s1, o, p = f1.d.shape
    b2, s2 = f2.d.shape[:2]
    q = f1.q
    m = o * o if output == "full" else o
    cost_gram = b1 * s1 * b2 * s2 * ((q if f1.a is not None else 1) + m * p)
    cost_grad = (o * (b1 * s1 + b2 * s2) * p * q + b1 * b2 * m * p * q
                 + WRITE_COST * o * (b1 + b2) * p * q)
    if cost_grad < cost_gram:
        g1 = f1.grads().reshape(b1, o, -1)
        g2 = g1 if same else f2.grads().reshape(b2, o, -1)
        _contract_grads(acc, g1, g2, output, same, chunks)
    elif chunks is not None and s1 == s2 == 1 and f1.a is not None and output != "diagonal":
        _dense_upper(acc, f1, output, chunks)
    else:
        _token_gram(acc, f1, f2, output, same)


def _dense_upper(acc: Tensor, f: TokenFactor, output: str, chunks: Chunks) -> None:
    """``<a, a'> <d, d'>`` of a one-token dense layer on the upper chunk triangle of ``acc``."""
    assert f.a is not None  # a dense factor
    b, _, o, p = f.d.shape
    a = f.a.reshape(b, -1)
    for start, stop in chunks:
        ga = a[start:stop] @ a[start:].T
        if output == "trace":
            gd = f.d[start:stop].reshape(stop - start, o * p) @ f.d[start:].reshape(-1, o * p).T
            acc[start:stop, start:].addcmul_(ga, gd)
        else:
            d = f.d.reshape(b * o, p)
            gd = (d[start * o:stop * o] @ d[start * o:].T).view(stop - start, o, b - start, o)
            acc[start:stop, :, start:].addcmul_(ga.view(stop - start, 1, b - start, 1), gd)


def _token_gram(acc: Tensor, f1: TokenFactor, f2: TokenFactor, output: str, same: bool) -> None:
    """Add ``sum_{s,s'} k(s,s') <d_s, d'_s'>`` to ``acc`` without per-example gradients."""
    b1, s1, o, p = f1.d.shape
    b2, s2 = f2.d.shape[:2]
    if f1.a is not None:
        assert f2.a is not None  # the two factors are of one (dense) layer
        ga = gram(f1.a.reshape(b1 * s1, -1), None if same else f2.a.reshape(b2 * s2, -1))
    else:
        assert f1.idx is not None and f2.idx is not None  # a factor holds a or idx
        i1, i2 = f1.idx.reshape(-1, 1), f2.idx.reshape(1, -1)
        ga = ((i1 == i2) & (i1 >= 0)).to(f1.d.dtype)
    ga = ga.view(b1, s1, b2, s2)
    tokens = s1 > 1 or s2 > 1
    if output == "trace":
        gd = gram(f1.d.view(b1 * s1, o * p), None if same else f2.d.view(b2 * s2, o * p))
        gd = gd.view(b1, s1, b2, s2)
        if tokens:
            acc += (ga * gd).sum(dim=(1, 3))
        else:
            acc.addcmul_(ga.view(b1, b2), gd.view(b1, b2))
    elif output == "diagonal":
        d1 = f1.d.permute(2, 0, 1, 3).reshape(o, b1 * s1, p)
        d2 = d1 if same else f2.d.permute(2, 0, 1, 3).reshape(o, b2 * s2, p)
        gd = torch.bmm(d1, d2.transpose(1, 2))
        if tokens:
            acc += torch.einsum("isjt,oisjt->ijo", ga, gd.view(o, b1, s1, b2, s2))
        else:
            acc.addcmul_(ga.view(b1, b2, 1), gd.view(o, b1, b2).permute(1, 2, 0))
    else:
        gd = gram(f1.d.view(b1 * s1 * o, p), None if same else f2.d.view(b2 * s2 * o, p))
        if tokens:
            acc += torch.einsum("isjt,isojtq->iojq", ga, gd.view(b1, s1, o, b2, s2, o))
        else:
            acc.addcmul_(ga.view(b1, 1, b2, 1), gd.view(b1, o, b2, o))
