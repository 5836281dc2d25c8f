"""Structured (per-layer factorized) empirical NTK.

The NTK is a sum over parameters, so it splits into one kernel per layer. For a layer that maps
its input ``a`` to ``y = W a + b`` at every token ``s`` (a linear layer on ``[N, S, in]``, a
convolution on unfolded patches), the gradient of output ``o`` with respect to ``W`` is
``sum_s delta_{o,s} a_s^T`` where ``delta_{o,s} = d f_o / d y_s``. Hence

    Theta_W(x, x')[o, o'] = sum_{s, s'} <a_s, a'_{s'}> <delta_{o,s}, delta'_{o',s'}>

and the bias adds the same sum with ``<a_s, a'_s'>`` replaced by 1 (we append a constant 1 to
``a``). An embedding is a linear layer on one-hot inputs, so ``<a_s, a'_s'>`` becomes the
indicator ``[idx_s == idx'_{s'}]``. LayerNorm's affine parameters give per-example gradients
``sum_s delta_s * xhat_s`` and ``sum_s delta_s`` directly.

Activations ``a`` are captured with forward hooks and all ``delta`` come from one batched
reverse-mode pass per output (``vmap`` over the output basis of a single ``vjp``): a zero tensor is
added to each layer's output and differentiated. Per block of examples and per layer the code picks
the cheaper of two contractions:

- *token Gram*: ``sum_{s,s'} <a_s, a'_s'> <delta_s, delta'_s'>`` -- cost ``(B S)^2 (in + m out)``;
- *per-example gradients*: ``G = sum_s delta_s a_s^T`` then ``<G, G'>`` -- cost ``B^2 m out in``,

with ``m = O`` (trace, diagonal) or ``O^2`` (full). Tokens whose ``delta`` is identically zero (for
instance every token but the last after the last block of a last-token readout) are dropped first.

Modules without a rule (and parameters shared between modules) fall back to per-example Jacobians
of their own parameters only. Before use every rule is checked once against autograd on two
examples with a random cotangent; a rule whose reconstruction of the gradient disagrees (weights
used outside their module's ``forward``, e.g. tied embeddings) is replaced by the fallback, with a
warning, so the kernel is never silently wrong.

This module is the ``method="structured"`` path of :func:`telescope.ntk` (:func:`structured_ntk`:
output chunks and example blocks for the memory budget, then the blocked kernel) and
:func:`ntk_to_subset`. The pieces: the plan, the factors of a block and the autograd check in
``_engine.py``; the plans' cache, the fallback warnings and :func:`explain` in ``_plans.py``; the
contractions in ``_contractions.py``; the rules in :mod:`telescope.kernels.rules`.

Reference: Novak, Sohl-Dickstein & Schoenholz (2022), "Fast Finite Width Neural Tangent Kernel"
(structured derivatives).
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch
from torch import Tensor, nn

from telescope.kernels._blocks import (
    GOOD_BLOCK_PAIRS,
    SLOW_BLOCK_PAIRS,
    KernelFile,
    block_pairs,
    blocked_kernel,
    warn_small_blocks,
)
from telescope.kernels._contractions import _accumulate, _block_kernel_fn, gram
from telescope.kernels._engine import _Engine
from telescope.kernels._functional import (
    ad_safe_backends,
    at_least_two,
    batched_fn,
    check_batch_independence,
    check_model,
    frozen_state,
    parse_memory,
    trainable_params,
)
from telescope.kernels._plans import FALLBACK_WARN_SHARE, _plan, explain

__all__ = ["structured_ntk", "ntk_to_subset", "explain", "gram", "FALLBACK_WARN_SHARE"]


def _sizes(engine: _Engine) -> tuple[int, int, int]:
    """Per-example element counts: deltas per output, inputs, and the largest per-example
    gradient of one layer per output (rough upper bounds, for choosing blocks). A layer whose
    every call has one token (an output shape of one axis) never forms per-example gradients:
    its Gram contraction is always the cheaper one (``_contractions._accumulate``)."""
    per_output, inputs, widest = 0, 0, 1
    for mname, module in engine.modules:
        shapes = engine.call_shapes(mname)
        for shp in shapes:
            numel = int(torch.Size(shp).numel())
            per_output += numel
            inputs += 2 * numel
        if all(not isinstance(shp, list) and len(shp) == 1 for shp in shapes):
            continue  # (a composite rule's call is a list of shapes)
        for name in engine.covers(mname, module):
            weight = engine.params[name]
            if weight.ndim >= 2:
                widest = max(widest, weight[:weight.shape[1]].numel() + weight.shape[0])
    fallback = sum(engine.params[k].numel() for k in engine.fallback)
    return per_output + fallback, inputs, max(widest, fallback)


def _choose_blocks(engine: _Engine, n1: int, n2: int, n_out: int, output: str, budget: int,
                   itemsize: int, whole_outputs: bool = False) -> tuple[int, int, bool]:
    """Output chunk, example block and whether every block's factors can be kept.

    Trace and diagonal kernels are sums/stacks over outputs, so they are computed for chunks of
    outputs: each chunk's factors for *all* examples are computed once and kept, which avoids
    recomputing them for every block pair. Half the budget holds factors, half the contraction.
    """
    per_output, inputs, widest = _sizes(engine)
    n = n1 + n2

    def factor_bytes(c: int, examples: int) -> int:
        return examples * (c * per_output + inputs) * itemsize

    chunk = n_out
    if output != "full" and not whole_outputs:
        while chunk > 1 and factor_bytes(chunk, n) > budget // 2:
            chunk = (chunk + 1) // 2
    keep_all = factor_bytes(chunk, n) <= budget // 2
    m = chunk * chunk if output == "full" else chunk
    block = max(n1, n2)

    def contraction_bytes(b: int) -> int:
        # two per-example-gradient blocks of the widest layer, or a token Gram, plus the result
        return (2 * b * chunk * widest + 2 * b * b * m) * itemsize

    limit = budget // 2 if keep_all else budget // 4
    while block > 1 and (contraction_bytes(block) > limit or
                         (not keep_all and 2 * factor_bytes(chunk, block) > budget // 4)):
        block = (block + 1) // 2
    return chunk, block, keep_all


def _slowness(n1: int, n2: int, n_out: int, chunk: int, block: int, keep_all: bool) -> int:
    """Block pairs, weighted by how often each block's factors are recomputed."""
    nb, symmetric = max(n1, n2), n2 == 0
    pairs = block_pairs(n1, n2 or n1, block, symmetric, -(-n_out // chunk))
    # without kept factors every block pair recomputes the factors of its second block
    return pairs * (1 if keep_all else max(1, -(-nb // block)))


def _check_block_pairs(engine: _Engine, n1: int, n2: int, n_out: int, output: str, budget: int,
                       itemsize: int, chunk: int, block: int, keep_all: bool) -> None:
    """Warn (with a budget that would do) when the memory budget forces tiny blocks."""
    work = _slowness(n1, n2, n_out, chunk, block, keep_all)
    if work <= SLOW_BLOCK_PAIRS:
        return
    needed, suggestion = budget, None
    for _ in range(40):  # doubling: at most 2^40 times the budget
        needed *= 2
        c, b, k = _choose_blocks(engine, n1, n2, n_out, output, needed, itemsize)
        if _slowness(n1, n2, n_out, c, b, k) <= GOOD_BLOCK_PAIRS or b >= max(n1, n2):
            suggestion = (needed, b)
            break
    warn_small_blocks(block, n1, n2 or n1, budget, work, suggestion)


@overload
def structured_ntk(model: nn.Module, x1: Tensor, x2: Tensor | None, *, output: str,
                   block_size: int | None, budget: int, progress: bool,
                   sink: None = None) -> Tensor: ...
@overload
def structured_ntk(model: nn.Module, x1: Tensor, x2: Tensor | None, *, output: str,
                   block_size: int | None, budget: int, progress: bool,
                   sink: KernelFile) -> np.ndarray: ...
def structured_ntk(model: nn.Module, x1: Tensor, x2: Tensor | None, *, output: str,
                   block_size: int | None, budget: int, progress: bool,
                   sink: KernelFile | None = None) -> Tensor | np.ndarray:
    """The ``method="structured"`` path of :func:`telescope.ntk` (inputs already validated);
    with ``sink`` the blocks go to disk, each with all its outputs at once."""
    engine, n_out = _plan(model, at_least_two(x1[:2] if x1.shape[0] > 1 or x2 is None
                                                 else torch.cat([x1, x2[:1]])))
    itemsize = torch.finfo(engine.dtype).bits // 8
    n1, n2 = x1.shape[0], 0 if x2 is None else x2.shape[0]
    chunk, block, keep_all = _choose_blocks(engine, n1, n2, n_out, output, budget, itemsize,
                                            whole_outputs=sink is not None)
    if sink is not None:
        if block_size is not None:
            block = block_size
        kernel = _block_kernel_fn(engine, n_out, output, None, {} if keep_all else None)
        return blocked_kernel(kernel, x1, x2, block, output, n_out, engine.dtype, progress,
                              sink)
    if block_size is not None:
        block = block_size
    else:
        _check_block_pairs(engine, n1, n2, n_out, output, budget, itemsize, chunk, block,
                           keep_all)
    if chunk >= n_out:
        kernel = _block_kernel_fn(engine, n_out, output, None, {} if keep_all else None)
        return blocked_kernel(kernel, x1, x2, block, output, n_out, engine.dtype, progress)
    total: Tensor | None = None  # trace: the chunks' sum; else their concatenation
    parts: list[Tensor] = []
    for start in range(0, n_out, chunk):
        outputs = torch.arange(start, min(start + chunk, n_out), device=x1.device)
        kernel = _block_kernel_fn(engine, n_out, output, outputs, {} if keep_all else None)
        part = blocked_kernel(kernel, x1, x2, block, output, len(outputs), engine.dtype,
                              progress)
        if output == "trace":
            total = part if total is None else total.add_(part)
        else:
            parts.append(part)
    if output == "trace":
        assert total is not None  # chunk < n_out: at least two chunks
        return total
    return torch.cat(parts, dim=2)


def ntk_to_subset(model: nn.Module, x: Tensor, idx: Tensor, *, output: str = "full",
                  max_memory_gb: float | None = None,
                  tangent: dict[str, Tensor] | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``ntk(model, x, x[idx])``, reusing the factors of ``x`` for the rows ``idx``.

    The kernel between every tracked point and a training batch drawn from them is what the
    :class:`telescope.Smoother` needs at every step; computing the batch's factors by slicing
    saves a forward and backward pass over the batch. Falls back to :func:`telescope.ntk` when
    the factors of all of ``x`` do not fit in the memory budget.

    With ``tangent`` (parameter-shaped tensors by name) also returns the directional derivative
    ``J(x) tangent`` ``[N, O]``, read off the same factors (no extra forward-mode pass).
    """
    check_model(model)
    with ad_safe_backends(model):
        check_batch_independence(model, x)
    engine, n_out = _plan(model, at_least_two(x[:2]))
    per_output, inputs, _ = _sizes(engine)
    itemsize = torch.finfo(engine.dtype).bits // 8
    budget = parse_memory(max_memory_gb)
    if x.shape[0] * (n_out * per_output + inputs) * itemsize > budget // 2:
        with ad_safe_backends(model):
            k = structured_ntk(model, x, x[idx], output=output, block_size=None, budget=budget,
                               progress=False)
        return k if tangent is None else (k, _jvp(model, x, tangent))
    with ad_safe_backends(model):
        factors = engine.factors(x, n_out)
    b1, b2 = x.shape[0], idx.numel()
    shape = {"trace": (b1, b2), "diagonal": (b1, b2, n_out),
             "full": (b1, n_out, b2, n_out)}[output]
    acc = torch.zeros(shape, dtype=engine.dtype, device=x.device)
    for f in factors:
        _accumulate(acc, f, f.select(idx), output, same=False)
    k = acc.permute(0, 2, 1, 3) if output == "full" else acc
    if tangent is None:
        return k
    return k, sum(f.dot(tangent) for f in factors)


def _jvp(model: nn.Module, x: Tensor, tangent: dict[str, Tensor]) -> Tensor:
    from torch.func import jvp

    params, frozen = trainable_params(model), frozen_state(model)
    f = batched_fn(model, frozen)
    return jvp(lambda p: f(p, x), (params,), ({n: tangent[n] for n in params},))[1]
