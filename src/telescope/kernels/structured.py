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

Reference: Novak, Sohl-Dickstein & Schoenholz (2022), "Fast Finite Width Neural Tangent Kernel"
(structured derivatives).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from telescope.kernels._functional import (
    batched_fn,
    check_batch_independence,
    flatten_output,
    frozen_state,
    model_dtype_device,
    model_signature,
    single_fn,
    trainable_params,
)
from telescope.kernels.empirical import (
    GOOD_BLOCK_PAIRS,
    SLOW_BLOCK_PAIRS,
    block_pairs,
    blocked_kernel,
    per_example_jacobian,
    warn_small_blocks,
)

# --------------------------------------------------------------------------------------------
# Factors: what a rule extracts from one block of examples
# --------------------------------------------------------------------------------------------


@dataclass
class TokenFactor:
    """``Theta[o,o'] = sum_{s,s'} k(s, s') <d[:,s,o], d'[:,s',o']>`` for a linear-like layer.

    ``a [B, S, q]`` gives ``k = <a_s, a'_s'>`` (dense); ``idx [B, S]`` gives
    ``k = [idx_s == idx'_s']`` (gather, ``q`` = vocabulary size, ``idx < 0`` = no gradient).
    ``d`` is ``[B, S, O, p]`` (contiguous; the layout every contraction below reads).
    ``to_params`` maps per-example gradients ``G [B, O, p, q]`` to the layer's parameters
    (each ``[B, O, *shape]``); ``from_params`` maps parameter-shaped tensors (a dict by name)
    to the layer's ``[p, q]`` matrix (dense) or ``[q, p]`` table (gather).
    """

    d: Tensor
    a: Tensor | None
    idx: Tensor | None
    q: int
    to_params: Callable[[Tensor], dict[str, Tensor]]
    from_params: Callable[[dict[str, Tensor]], Tensor]

    @classmethod
    def create(cls, d: Tensor, a: Tensor | None, idx: Tensor | None, q: int,
               to_params: Callable, from_params: Callable) -> TokenFactor:
        """From ``d [O, B, S, p]`` (as the backward pass gives it), dropping the tokens whose
        delta is zero for every output, example and unit (e.g. all but the last token above
        the last attention layer of a last-token readout)."""
        if d.shape[2] > 1:
            keep = d.any(dim=3).any(dim=1).any(dim=0)
            if not bool(keep.all()):
                keep[0] = keep[0] | ~keep.any()
                d = d[:, :, keep]
                a = None if a is None else a[:, keep]
                idx = None if idx is None else idx[:, keep]
        return cls(d.permute(1, 2, 0, 3).contiguous(), a, idx, q, to_params, from_params)

    def select(self, rows: slice) -> TokenFactor:
        return TokenFactor(self.d[rows], None if self.a is None else self.a[rows],
                           None if self.idx is None else self.idx[rows], self.q, self.to_params,
                           self.from_params)

    def dot(self, theta: dict[str, Tensor]) -> Tensor:
        """``<d f_o(x_b) / d theta_layer, theta>`` for every example and output: ``[B, O]``."""
        m = self.from_params(theta)
        if self.a is not None:
            y = self.a @ m.T  # [B, S, p]
        else:
            y = m[self.idx.clamp(min=0)] * (self.idx >= 0).unsqueeze(-1)
        return torch.einsum("bsop,bsp->bo", self.d, y)

    def grads(self) -> Tensor:
        """Per-example gradients ``G [B, O, p, q]`` (``sum_s d_s a_s^T``)."""
        if self.a is not None:
            return torch.einsum("bsop,bsq->bopq", self.d, self.a)
        b, s, o, p = self.d.shape
        g = self.d.new_zeros(b, o, p, self.q)
        index = self.idx.clamp(min=0).view(b, 1, 1, s).expand(b, o, p, s)
        valid = (self.idx >= 0).view(b, s, 1, 1)
        g.scatter_add_(3, index, (self.d * valid).permute(0, 2, 3, 1))
        return g


@dataclass
class GradFactor:
    """Per-example gradients ``g [B, O, P]`` of some parameters (LayerNorm affine, fallback)."""

    g: Tensor
    to_params: Callable[[Tensor], dict[str, Tensor]]
    names: list[str]

    def select(self, rows: slice) -> GradFactor:
        return GradFactor(self.g[rows], self.to_params, self.names)

    def dot(self, theta: dict[str, Tensor]) -> Tensor:
        return self.g @ torch.cat([theta[n].reshape(-1) for n in self.names])


# --------------------------------------------------------------------------------------------
# Rules: module -> factor, from the captured inputs and output deltas of every call
# --------------------------------------------------------------------------------------------


def _dense_factor(prefix: str, a: Tensor, d: Tensor, weight: Tensor, bias: Tensor | None,
                  weight_scale: float = 1.0, bias_scale: float = 1.0) -> TokenFactor:
    """Factor of ``y_s = weight_scale * W a_s + bias_scale * b`` with ``W`` viewed as ``[p, q]``.

    ``a`` is ``[B, S, q]`` and ``d`` is ``[O, B, S, p]``; a constant column ``bias_scale`` is
    appended to ``a`` for the bias, so the bias gradient is the last column of ``sum_s d_s a_s^T``.
    """
    has_w = weight.requires_grad
    has_b = bias is not None and bias.requires_grad
    n_in = a.shape[-1]
    cols = [a * weight_scale] if has_w else []
    if has_b:
        cols.append(torch.full_like(a[..., :1], bias_scale))
    a_aug = torch.cat(cols, dim=-1)
    w_shape = tuple(weight.shape)

    def to_params(g: Tensor) -> dict[str, Tensor]:
        o, b = g.shape[:2]
        out = {}
        if has_w:
            out[f"{prefix}weight"] = g[..., :n_in].reshape(o, b, *w_shape)
        if has_b:
            out[f"{prefix}bias"] = g[..., -1]
        return out

    def from_params(theta: dict[str, Tensor]) -> Tensor:
        cols = [theta[f"{prefix}weight"].reshape(weight.shape[0], -1)] if has_w else []
        if has_b:
            cols.append(theta[f"{prefix}bias"].reshape(-1, 1))
        return torch.cat(cols, dim=1)

    return TokenFactor.create(d, a_aug, None, a_aug.shape[-1], to_params, from_params)


def _tokens(ts: list[Tensor], width: int, lead: int = 1) -> Tensor:
    """Concatenate the calls' tensors as ``[..., tokens, width]`` (``lead`` leading dims kept)."""
    parts = [t.reshape(*t.shape[:lead], -1, width) for t in ts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=lead)


def _linear_rule(module: nn.Module, prefix: str, inputs: list[Tensor],
                 deltas: list[Tensor]) -> list:
    w = module.weight
    a, d = _tokens(inputs, w.shape[1]), _tokens(deltas, w.shape[0], lead=2)
    if isinstance(module, nn.Linear):
        return [_dense_factor(prefix, a, d, w, module.bias)]
    # NTKLinear: y = (weight_std / sqrt(n_in)) W a + bias_std b
    return [_dense_factor(prefix, a, d, w, module.bias, module.weight_scale, module.bias_std)]


def _embedding_rule(module: nn.Embedding, prefix: str, inputs, deltas) -> list:
    idx = torch.cat([x.reshape(x.shape[0], -1) for x in inputs], dim=1).long()
    if module.padding_idx is not None:  # the padding row receives no gradient
        idx = idx.masked_fill(idx == module.padding_idx, -1)
    d = _tokens(deltas, module.embedding_dim, lead=2)
    name = f"{prefix}weight"
    return [TokenFactor.create(d, None, idx, module.num_embeddings,
                               lambda g: {name: g.transpose(2, 3)}, lambda t: t[name])]


def _conv_rule(module: nn.Module, prefix: str, inputs, deltas) -> list:
    """A convolution is a linear layer on its input patches (tokens = output positions)."""
    two_d = isinstance(module, nn.Conv2d)
    pads = module._reversed_padding_repeated_twice
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    patches = []
    for x in inputs:
        x = F.pad(x, pads, mode=mode) if any(pads) else x
        if two_d:
            ks, dil, st = module.kernel_size, module.dilation, module.stride
        else:
            x = x.unsqueeze(2)
            ks, dil, st = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
        patches.append(F.unfold(x, ks, dilation=dil, stride=st).transpose(1, 2))  # [B, L, C*k]
    c_out = module.out_channels
    d = torch.cat([dl.reshape(*dl.shape[:2], c_out, -1).transpose(2, 3) for dl in deltas], dim=2)
    return [_dense_factor(prefix, torch.cat(patches, dim=1), d, module.weight, module.bias)]


def _norm_rule(module: nn.Module, prefix: str, inputs, deltas) -> list:
    shape = tuple(module.normalized_shape)
    if isinstance(module, nn.LayerNorm):
        xhat = [F.layer_norm(x, shape, None, None, module.eps) for x in inputs]
    else:
        xhat = [F.rms_norm(x, shape, None, module.eps) for x in inputs]
    grads, names = [], []
    w, b = module.weight, getattr(module, "bias", None)
    # sum over every leading (token) dimension: [O, B, *shape]
    def tok_sum(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1, *shape).sum(2)

    if w is not None and w.requires_grad:
        gw = sum(tok_sum(dl * xh.unsqueeze(0)) for dl, xh in zip(deltas, xhat, strict=True))
        grads.append(gw.flatten(2))
        names.append(f"{prefix}weight")
    if b is not None and b.requires_grad:
        grads.append(sum(tok_sum(dl) for dl in deltas).flatten(2))
        names.append(f"{prefix}bias")
    g = torch.cat(grads, dim=2).transpose(0, 1)  # [B, O, P]
    numel = [int(torch.Size(shape).numel())] * len(names)

    def to_params(gr: Tensor) -> dict[str, Tensor]:
        return {n: c.reshape(*c.shape[:2], *shape)
                for n, c in zip(names, gr.split(numel, dim=2), strict=True)}

    return [GradFactor(g, to_params, names)]


def _rules() -> dict[type, Callable]:
    from telescope.models.mlp import NTKLinear

    rules = {nn.Linear: _linear_rule, NTKLinear: _linear_rule, nn.Embedding: _embedding_rule,
             nn.Conv1d: _conv_rule, nn.Conv2d: _conv_rule, nn.LayerNorm: _norm_rule}
    if hasattr(nn, "RMSNorm"):
        rules[nn.RMSNorm] = _norm_rule
    return rules


def _has_rule(module: nn.Module, rules: dict) -> bool:
    rule_type = type(module)
    if rule_type not in rules:
        return False
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups != 1:
        return False
    # parametrized modules (torch.nn.utils.parametrize) compute their weight on the fly
    return not hasattr(module, "parametrizations")


# --------------------------------------------------------------------------------------------
# The structured engine
# --------------------------------------------------------------------------------------------


class _Engine:
    def __init__(self, model: nn.Module, x_probe: Tensor, excluded: set[str] = frozenset()):
        self.model = model
        self.dtype, _ = model_dtype_device(model)
        self.rules = _rules()
        self.params = trainable_params(model)
        self.frozen = frozen_state(model)
        owners: dict[int, list[str]] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for pname, p in module._parameters.items():
                if p is not None:
                    owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
        shared = {i for i, names in owners.items() if len(names) > 1}
        self.modules: list[tuple[str, nn.Module]] = []
        covered: set[str] = set()
        for mname, module in model.named_modules():
            own = [(n, p) for n, p in module._parameters.items() if p is not None]
            if not own or mname in excluded or not _has_rule(module, self.rules):
                continue
            if any(id(p) in shared for _, p in own) or not any(p.requires_grad for _, p in own):
                continue
            prefix = f"{mname}." if mname else ""
            self.modules.append((mname, module))
            covered.update(prefix + n for n, p in own if p.requires_grad)
        self.fallback = [n for n in self.params if n not in covered]
        self._discover(x_probe)

    def _discover(self, x: Tensor) -> None:
        """One forward pass to find each rule module's call count and output shapes."""
        shapes: dict[str, list[torch.Size]] = {m: [] for m, _ in self.modules}
        bad: set[str] = set()
        handles = []
        for mname, module in self.modules:
            def hook(mod, args, out, mname=mname):
                if not args or not isinstance(out, Tensor) or out.shape[:1] != x.shape[:1]:
                    bad.add(mname)
                else:
                    shapes[mname].append(out.shape[1:])
            handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                batched_fn(self.model, self.frozen)(self.params, x)
        finally:
            for h in handles:
                h.remove()
        # no batch dimension, keyword-only call, or never called: use the fallback instead
        drop = bad | {m for m, s in shapes.items() if not s}
        for mname, module in self.modules:
            if mname in drop:
                prefix = f"{mname}." if mname else ""
                self.fallback += [prefix + n for n, p in module._parameters.items()
                                  if p is not None and p.requires_grad]
        self.modules = [(m, mod) for m, mod in self.modules if m not in drop]
        self.shapes = {m: shapes[m] for m, _ in self.modules}

    # ---- factors for one block ---------------------------------------------------------------

    def factors(self, x: Tensor, n_out: int, outputs: Tensor | None = None) -> list:
        """Factors of every rule module (and the fallback) on ``x`` for the given outputs."""
        b = x.shape[0]
        zs = {m: [torch.zeros(b, *s, dtype=self.dtype, device=x.device) for s in shp]
              for m, shp in self.shapes.items()}
        modules = dict(self.modules)
        params, frozen, model = self.params, self.frozen, self.model

        def f(zs):
            captured: dict[str, list[Tensor]] = {m: [] for m in zs}
            handles = []
            for mname, z_list in zs.items():
                def hook(mod, args, out, mname=mname, z_list=z_list):
                    k = len(captured[mname])
                    captured[mname].append(args[0])
                    return out + z_list[k]
                handles.append(modules[mname].register_forward_hook(hook))
            try:
                out = functional_call(model, {**frozen, **params}, (x,), strict=False)
            finally:
                for h in handles:
                    h.remove()
            return flatten_output(out, b), captured

        factors: list = []
        if self.modules:
            _, vjp_fn, captured = vjp(f, zs, has_aux=True)
            basis = torch.eye(n_out, dtype=self.dtype, device=x.device)
            if outputs is not None:
                basis = basis[outputs]
            basis = basis.unsqueeze(1).expand(basis.shape[0], b, n_out)
            (deltas,) = vmap(vjp_fn)(basis)
            for mname, module in self.modules:
                prefix = f"{mname}." if mname else ""
                rule = self.rules[type(module)]
                factors += rule(module, prefix, captured[mname], deltas[mname])
        if self.fallback:
            fb = {n: self.params[n] for n in self.fallback}
            rest = {n: p for n, p in self.params.items() if n not in fb}
            f_all = single_fn(self.model, {**self.frozen, **rest})
            f_single = f_all if outputs is None else (lambda p, xi: f_all(p, xi)[outputs])
            g = per_example_jacobian(f_single, fb, x)
            sizes = [fb[n].numel() for n in self.fallback]
            names, shapes = list(self.fallback), [fb[n].shape for n in self.fallback]

            def to_params(gr, names=names, shapes=shapes, sizes=sizes):
                return {n: c.reshape(*c.shape[:2], *s)
                        for n, c, s in zip(names, gr.split(sizes, dim=2), shapes, strict=True)}

            factors.append(GradFactor(g, to_params, names))
        return factors

    # ---- checking the rules against autograd -------------------------------------------------

    def verify(self, x: Tensor, n_out: int) -> set[str]:
        """Names of rule modules whose gradients disagree with autograd on ``x`` (2 examples)."""
        x = x[:2]
        gen = torch.Generator(device="cpu").manual_seed(0)
        c = torch.randn(x.shape[0], n_out, generator=gen, dtype=self.dtype).to(x.device)
        f = batched_fn(self.model, self.frozen)
        _, pull = vjp(lambda p: f(p, x), self.params)
        (true,) = pull(c)
        recon: dict[str, Tensor] = {}
        saved_fallback, self.fallback = self.fallback, []
        try:
            factors = self.factors(x, n_out)
        finally:
            self.fallback = saved_fallback
        for fac in factors:
            per = fac.to_params(fac.grads() if isinstance(fac, TokenFactor) else fac.g)
            for n, g in per.items():  # g: [B, O, *shape]
                recon[n] = torch.einsum("bo,bo...->...", c, g)
        tol = 1e-3 if self.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
        # compared per module (weight and bias together): a parameter whose exact gradient is 0
        # (e.g. an attention key bias) only carries round-off, judged against its module's scale
        total = sum(float(g.norm()) ** 2 for g in true.values()) ** 0.5
        bad: set[str] = set()
        for mname, module in self.modules:
            prefix = f"{mname}." if mname else ""
            names = [prefix + p for p, t in module._parameters.items()
                     if t is not None and prefix + p in recon]
            if not names:
                continue
            err = sum(float((recon[n] - true[n]).norm()) ** 2 for n in names) ** 0.5
            scale = sum(float(true[n].norm()) ** 2 for n in names) ** 0.5
            if err > tol * scale + tol * 1e-3 * total + 1e-30:
                bad.add(mname)
        return bad


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
        ga = gram(f1.a.reshape(b1 * s1, -1), None if same else f2.a.reshape(b2 * s2, -1))
    else:
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


def _sizes(engine: _Engine) -> tuple[int, int, int]:
    """Per-example element counts: deltas per output, inputs, and the largest per-example
    gradient of one layer per output (rough upper bounds, for choosing blocks)."""
    per_output, inputs, widest = 0, 0, 1
    for mname, module in engine.modules:
        weight = getattr(module, "weight", None)
        for shp in engine.shapes[mname]:
            numel = int(torch.Size(shp).numel())
            per_output += numel
            inputs += 2 * numel
        if weight is not None:
            widest = max(widest, weight.numel() + weight.shape[0])
    fallback = sum(engine.params[k].numel() for k in engine.fallback)
    return per_output + fallback, inputs, max(widest, fallback)


def _choose_blocks(engine: _Engine, n1: int, n2: int, n_out: int, output: str, budget: int,
                   itemsize: int) -> tuple[int, int, bool]:
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
    if output != "full":
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


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model: nn.Module, probe: Tensor) -> tuple[_Engine, int]:
    """The structured engine for ``model``, with every rule verified against autograd once."""
    key = model_signature(model, probe)
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == key:
        engine, n_out = cached[1], cached[2]
        engine.params, engine.frozen = trainable_params(model), frozen_state(model)
        return engine, n_out
    engine = _Engine(model, probe)
    with torch.no_grad():
        n_out = batched_fn(model, engine.frozen)(engine.params, probe).shape[1]
    bad = engine.verify(probe, n_out)
    if bad:
        warnings.warn(
            f"structured NTK: the per-layer rule for {sorted(bad)} does not reproduce autograd's "
            "gradient (its parameters are probably also used outside the module's forward, "
            "e.g. tied weights); these parameters use per-example Jacobians instead.",
            stacklevel=4,
        )
        engine = _Engine(model, probe, excluded=bad)
    _PLANS[model] = (key, engine, n_out)
    return engine, n_out


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
    warn_small_blocks(block, n1, n2 or n1, budget, work, suggestion, stacklevel=5)


def structured_ntk(model: nn.Module, x1: Tensor, x2: Tensor | None, *, output: str,
                   block_size: int | None, budget: int, progress: bool) -> Tensor:
    """The ``method="structured"`` path of :func:`telescope.ntk` (inputs already validated)."""
    engine, n_out = _plan(model, x1[:2])
    itemsize = torch.finfo(engine.dtype).bits // 8
    n1, n2 = x1.shape[0], 0 if x2 is None else x2.shape[0]
    chunk, block, keep_all = _choose_blocks(engine, n1, n2, n_out, output, budget, itemsize)
    if block_size is not None:
        block = block_size
    else:
        _check_block_pairs(engine, n1, n2, n_out, output, budget, itemsize, chunk, block,
                           keep_all)
    if chunk >= n_out:
        kernel = _block_kernel_fn(engine, n_out, output, None, {} if keep_all else None)
        return blocked_kernel(kernel, x1, x2, block, output, n_out, engine.dtype, progress)
    result = None
    for start in range(0, n_out, chunk):
        outputs = torch.arange(start, min(start + chunk, n_out), device=x1.device)
        kernel = _block_kernel_fn(engine, n_out, output, outputs, {} if keep_all else None)
        part = blocked_kernel(kernel, x1, x2, block, output, len(outputs), engine.dtype,
                              progress)
        if output == "trace":
            result = part if result is None else result.add_(part)
        else:
            result = [part] if result is None else [*result, part]
    return result if output == "trace" else torch.cat(result, dim=2)


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
    from telescope.kernels._functional import check_model, parse_memory
    from telescope.kernels.empirical import ad_safe_attention, ntk

    check_model(model)
    with ad_safe_attention():
        check_batch_independence(model, x)
    engine, n_out = _plan(model, x[:2])
    per_output, inputs, _ = _sizes(engine)
    itemsize = torch.finfo(engine.dtype).bits // 8
    budget = parse_memory(max_memory_gb)
    if x.shape[0] * (n_out * per_output + inputs) * itemsize > budget // 2:
        k = ntk(model, x, x[idx], output=output, max_memory_gb=max_memory_gb)
        return k if tangent is None else (k, _jvp(model, x, tangent))
    with ad_safe_attention():
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
