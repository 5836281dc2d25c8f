"""The kernel of one pair of example blocks from their factors (:func:`_block_kernel_fn`): per
layer the cheaper of two contractions (:func:`_accumulate` weighs them),

- *token Gram* (:func:`_token_gram`): ``sum_{s,s'} k(s, s') <d_s, d'_s'>`` -- cost
  ``(B S)^2 (in + m out)``;
- *per-example gradients* (:func:`_contract_grads`): ``G = sum_s d_s a_s^T`` then ``<G, G'>``
  -- cost ``B^2 m out in``,

added into the trace, diagonal or full kernel; :func:`gram` multiplies only the upper block
triangle of a symmetric Gram.
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
        for f1, f2 in zip(fa, fb, strict=True):
            _accumulate(acc, f1, f2, output, same)
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


def _contract_grads(acc: Tensor, g1: Tensor, g2: Tensor, output: str, same: bool) -> None:
    """Add the kernel of per-example gradients ``g [B, O, P]`` to ``acc``."""
    b1, o = g1.shape[:2]
    b2 = g2.shape[0]
    if output == "trace":
        acc += gram(g1.reshape(b1, -1), None if same else g2.reshape(b2, -1))
    elif output == "full":
        acc += gram(g1.reshape(b1 * o, -1), None if same else g2.reshape(b2 * o, -1)).view(
            acc.shape)
    else:
        acc += torch.bmm(g1.transpose(0, 1), g2.permute(1, 2, 0)).permute(1, 2, 0)


def _accumulate(acc: Tensor, f1, f2, output: str, same: bool) -> None:
    if isinstance(f1, GradFactor):
        _contract_grads(acc, f1.g, f2.g, output, same)
        return
    b1, s1, o, p = f1.d.shape
    b2, s2 = f2.d.shape[:2]
    q = f1.q
    m = o * o if output == "full" else o
    cost_gram = b1 * s1 * b2 * s2 * ((q if f1.a is not None else 1) + m * p)
    cost_grad = o * (b1 * s1 + b2 * s2) * p * q + b1 * b2 * m * p * q
    if cost_grad < cost_gram:
        g1 = f1.grads().reshape(b1, o, -1)
        g2 = g1 if same else f2.grads().reshape(b2, o, -1)
        _contract_grads(acc, g1, g2, output, same)
    else:
        _token_gram(acc, f1, f2, output, same)


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
