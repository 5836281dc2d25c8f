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

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vmap

from telescope.errors import UsageError
from telescope.kernels._functional import (
    batched_fn,
    checked_call,
    frozen_state,
    model_dtype_device,
    num_outputs,
    parse_memory,
    single_fn,
    trainable_params,
)

METHODS = ("auto", "jacobian", "vector", "structured")
OUTPUTS = ("trace", "full", "diagonal")


@contextlib.contextmanager
def ad_safe_attention() -> Iterator[None]:
    """Select the math backend of ``F.scaled_dot_product_attention``.

    The fused CPU kernels have no forward-mode derivative; the math backend supports every
    autodiff transform and gives the same numbers.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


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
) -> Tensor:
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
        included). ``x2=None`` means ``x2 = x1`` and uses the symmetry of the kernel.
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

    Returns
    -------
    Tensor in the model's dtype and device.

    References
    ----------
    Jacot, Gabriel & Hongler (2018), "Neural Tangent Kernel". Novak, Sohl-Dickstein & Schoenholz
    (2022), "Fast Finite Width Neural Tangent Kernel".
    """
    if method not in METHODS:
        raise UsageError(f"method must be one of {METHODS}, got {method!r}")
    if output not in OUTPUTS:
        raise UsageError(f"output must be one of {OUTPUTS}, got {output!r}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise UsageError(f"block_size must be a positive int or None, got {block_size!r}")
    budget = parse_memory(max_memory_gb)
    with ad_safe_attention():
        x1, x2 = checked_call(model, x1, x2)
    dtype, _ = model_dtype_device(model)
    if method == "auto":
        method = "structured"
    with ad_safe_attention():
        if method == "structured":
            from telescope.kernels.structured import structured_ntk

            return structured_ntk(model, x1, x2, output=output, block_size=block_size,
                                  budget=budget, progress=progress)
        params = trainable_params(model)
        n_params = sum(p.numel() for p in params.values())
        n_out = num_outputs(model, x1)
        itemsize = torch.finfo(dtype).bits // 8
        if block_size is None:
            # two blocks of Jacobians [B, O, P] plus vmap/jacrev intermediates
            per_example = 6 * n_out * n_params * itemsize
            block_size = max(1, budget // per_example)
            n1, n2 = x1.shape[0], x1.shape[0] if x2 is None else x2.shape[0]
            work = block_pairs(n1, n2, block_size, x2 is None)
            if work > SLOW_BLOCK_PAIRS:
                good = _block_for_pairs(n1, n2, x2 is None)
                warn_small_blocks(block_size, n1, n2, budget, work,
                                  (good * per_example, good))
        frozen = frozen_state(model)
        if method == "jacobian":
            block_kernel = _jacobian_block_fn(model, frozen, params, output)
        else:
            block_kernel = _vector_block_fn(model, frozen, params, output, n_out, budget)
        return blocked_kernel(block_kernel, x1, x2, block_size, output, n_out, dtype, progress)


SLOW_BLOCK_PAIRS = 20_000
"""More block pairs than this (each with its own Python and kernel-launch overhead, and
recomputed per-block work) makes a kernel far slower than it needs to be: warn."""
GOOD_BLOCK_PAIRS = 2_000
"""The block-pair count a suggested memory budget aims for."""


def block_pairs(n1: int, n2: int, block: int, symmetric: bool, chunks: int = 1) -> int:
    """Number of block pairs ``blocked_kernel`` evaluates (times the output chunks)."""
    a, b = -(-n1 // block), -(-n2 // block)
    return chunks * (a * (a + 1) // 2 if symmetric else a * b)


def _block_for_pairs(n1: int, n2: int, symmetric: bool) -> int:
    """The smallest block size with at most ``GOOD_BLOCK_PAIRS`` block pairs."""
    block = 1
    while block_pairs(n1, n2, block, symmetric) > GOOD_BLOCK_PAIRS:
        block *= 2
    return block


def warn_small_blocks(block: int, n1: int, n2: int, budget: int, work: int,
                      suggestion: tuple[int, int] | None, stacklevel: int = 3) -> None:
    """Warn that ``max_memory_gb`` forces blocks so small that the time explodes (``work``
    block computations), and which budget would avoid it (``suggestion = (bytes, block)``;
    ``None`` when no budget helps)."""
    hint = ("" if suggestion is None else
            f"; max_memory_gb={_round_up_gb(suggestion[0]):g} allows blocks of "
            f"{suggestion[1]}")
    warnings.warn(
        f"ntk: max_memory_gb={budget / 2**30:.3g} allows blocks of only {block} example(s) "
        f"({work:,} block computations for {n1} x {n2} examples, each with its own "
        f"overhead): this will take many times longer than it needs to{hint} (or pass "
        "block_size= to choose the blocks yourself)", RuntimeWarning, stacklevel=stacklevel)


def _round_up_gb(nbytes: int) -> float:
    """Bytes as GiB, rounded up to two significant digits."""
    gb = nbytes / 2**30
    scale = 10 ** (math.floor(math.log10(gb)) - 1)
    return math.ceil(gb / scale) * scale


def blocked_kernel(
    block_kernel: Callable[[Tensor, Tensor | None, object, object], tuple[Tensor, object, object]],
    x1: Tensor,
    x2: Tensor | None,
    block_size: int,
    output: str,
    n_out: int,
    dtype: torch.dtype,
    progress: bool,
) -> Tensor:
    """Assemble a kernel from blocks, using the symmetry when ``x2`` is ``None``.

    ``block_kernel(xa, xb, cache_a, cache_b)`` returns the kernel block for ``(xa, xb)`` and the
    per-block caches (e.g. Jacobians), so a block's expensive part is computed once per outer
    row; ``xb=None`` means the diagonal block ``(xa, xa)``.
    """
    symmetric = x2 is None
    xb_all = x1 if symmetric else x2
    n1, n2 = x1.shape[0], xb_all.shape[0]
    if n1 <= block_size and n2 <= block_size:  # a single block: no assembly copy
        return block_kernel(x1, None if symmetric else x2, None, None)[0]
    shape = {"trace": (n1, n2), "full": (n1, n2, n_out, n_out), "diagonal": (n1, n2, n_out)}
    out = torch.empty(shape[output], dtype=dtype, device=x1.device)
    starts1 = range(0, n1, block_size)
    starts2 = list(range(0, n2, block_size))
    total = sum(1 for a in starts1 for b in starts2 if not symmetric or b >= a)
    bar = _progress(total, progress)
    for a in starts1:
        xa = x1[a:a + block_size]
        cache_a = None
        for b in starts2:
            if symmetric and b < a:
                continue
            xb = xb_all[b:b + block_size]
            diagonal = symmetric and a == b
            block, cache_a, _ = block_kernel(xa, None if diagonal else xb, cache_a, None)
            out[a:a + xa.shape[0], b:b + xb.shape[0]] = block
            if symmetric and b > a:
                out[b:b + xb.shape[0], a:a + xa.shape[0]] = _transpose_block(block, output)
            bar.update()
    bar.close()
    return out


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


def contract(j1: Tensor, j2: Tensor, output: str) -> Tensor:
    """Kernel block from per-example gradients ``j1 [B1, O, P]`` and ``j2 [B2, O, P]``."""
    b1, o, _ = j1.shape
    b2 = j2.shape[0]
    if output == "trace":
        return j1.reshape(b1, -1) @ j2.reshape(b2, -1).T
    if output == "full":
        return (j1.reshape(b1 * o, -1) @ j2.reshape(b2 * o, -1).T).view(b1, o, b2, o).permute(
            0, 2, 1, 3)
    return torch.bmm(j1.transpose(0, 1), j2.permute(1, 2, 0)).permute(1, 2, 0)


def per_example_jacobian(f_single: Callable, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """``J [B, O, P]``: per-example Jacobians of ``f_single(params, x_i) -> [O]`` (flattened)."""
    jac = vmap(jacrev(f_single), in_dims=(None, 0))(params, x)
    b = x.shape[0]
    return torch.cat([j.reshape(b, j.shape[1], -1) for j in jac.values()], dim=2)


def _jacobian_block_fn(model, frozen, params, output):
    f_single = single_fn(model, frozen)

    def block_kernel(xa, xb, cache_a, cache_b):
        ja = cache_a if cache_a is not None else per_example_jacobian(f_single, params, xa)
        if xb is None:
            return contract(ja, ja, output), ja, ja
        jb = cache_b if cache_b is not None else per_example_jacobian(f_single, params, xb)
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
        va = cache_a if cache_a is not None else per_example_jacobian(f_single, params, xa)
        xb = xa if xb is None else xb
        rows = va.reshape(-1, va.shape[2])
        # batched JVPs over the whole xb block: one per row, chunked by activation memory
        act_bytes = 8 * xb.shape[0] * max(sum(sizes) // 64, n_out) * itemsize
        chunk = max(1, min(rows.shape[0], budget // max(act_bytes, 1)))
        prods = torch.cat([vmap(jvp_rows, in_dims=(None, 0))(xb, rows[c:c + chunk])
                           for c in range(0, rows.shape[0], chunk)])
        # prods[(i, o), j, o'] = <df_o(xa_i), df_o'(xb_j)>
        full = prods.view(xa.shape[0], n_out, xb.shape[0], n_out).permute(0, 2, 1, 3)
        return reduce_full(full, output), va, None

    return block_kernel


def reduce_full(full: Tensor, output: str) -> Tensor:
    """``[B1, B2, O, O]`` -> the requested output kind."""
    if output == "full":
        return full
    diag = full.diagonal(dim1=2, dim2=3)
    return diag.sum(-1) if output == "trace" else diag

