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

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import TypeGuard, overload

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call, vjp
from torch.utils._python_dispatch import TorchDispatchMode

from telescope.errors import UsageError, warn
from telescope.kernels._blocks import (
    GOOD_BLOCK_PAIRS,
    SLOW_BLOCK_PAIRS,
    KernelFile,
    block_pairs,
    blocked_kernel,
    per_example_jacobian,
    warn_small_blocks,
)
from telescope.kernels._functional import (
    ad_safe_backends,
    at_least_two,
    batched_fn,
    check_batch_independence,
    check_model,
    checked_call,
    flatten_output,
    frozen_state,
    map_or_loop,
    model_dtype_device,
    model_signature,
    parse_memory,
    single_fn,
    trainable_params,
)
from telescope.kernels.rules import (
    CompositeRule,
    GradFactor,
    Rule,
    RuleMismatch,
    TokenFactor,
    rule_for,
    rules_version,
)

# --------------------------------------------------------------------------------------------
# The structured engine
# --------------------------------------------------------------------------------------------


class _Engine:
    """The plan of a structured kernel: which modules use which rule, which parameters fall
    back to per-example Jacobians and why (``reasons``), and the output shapes of every call."""

    def __init__(self, model: nn.Module, x_probe: Tensor,
                 excluded: dict[str, str] | None = None):
        excluded = excluded or {}
        self.model = model
        self.dtype, _ = model_dtype_device(model)
        self.params = trainable_params(model)
        self.frozen = frozen_state(model)
        self.rules: dict[str, tuple[Rule, str]] = {}  # module name -> (rule, rule name)
        self.reasons: dict[str, str] = {}  # fallback parameter -> why it has no rule
        owners: dict[int, list[str]] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for pname, p in module._parameters.items():
                if p is not None:
                    owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
        self.modules: list[tuple[str, nn.Module]] = []
        claimed: list[str] = []  # composite-rule modules: their submodules are theirs
        for mname, module in model.named_modules():
            if any(mname.startswith(c + ".") for c in claimed):
                continue
            prefix = f"{mname}." if mname else ""
            rule, why = rule_for(module)
            if rule is not None and _composite(rule):
                named = dict(module.named_parameters())
                own = [(n, named[n]) for n in rule.parameters(module)]
            else:
                own = [(n, p) for n, p in module._parameters.items() if p is not None]
            trainable = [n for n, p in own if p.requires_grad]
            if not trainable:
                continue
            shared = [o for n, p in own for o in owners[id(p)] if o != prefix + n]
            if mname in excluded:
                why, rule = excluded[mname], None
            elif rule is not None and shared:
                why, rule = f"a parameter is shared with {', '.join(shared[:3])}", None
            if rule is None:
                self.reasons.update({prefix + n: why for n in trainable})
                continue
            self.modules.append((mname, module))
            self.rules[mname] = (rule, why)
            if _composite(rule):
                claimed.append(mname)
        covered = {n for m, mod in self.modules for n in self.covers(m, mod)}
        self.fallback = [n for n in self.params if n not in covered]
        for n in self.fallback:  # parameters not held by any module's _parameters
            self.reasons.setdefault(n, "no module holds it directly")
        self._discover(x_probe)

    def covers(self, mname: str, module: nn.Module) -> list[str]:
        """The full names of the trainable parameters the rule of ``mname`` covers."""
        prefix = f"{mname}." if mname else ""
        rule = self.rules.get(mname, (None,))[0]
        if rule is not None and _composite(rule):
            return [prefix + n for n in rule.parameters(module)]
        return [prefix + n for n, p in module._parameters.items()
                if p is not None and p.requires_grad]

    def call_shapes(self, mname: str) -> list[torch.Size]:
        """The per-example output shapes of every call (every point of a composite rule)."""
        return [shp for call in self.shapes[mname]
                for shp in (call if isinstance(call, list) else [call])]

    def _discover(self, x: Tensor) -> None:
        """Forward passes on ``x`` (two examples) and on three examples to find each rule
        module's calls: their output shapes and which axis is the batch (0, or e.g. 1 in a
        sequence-first ``[S, N, E]`` layout)."""
        calls: dict[str, list] = {m: [] for m, _ in self.modules}
        bad: dict[str, str] = {}
        composite = {m: mod for m, mod in self.modules if _composite(self.rules[m][0])}
        x3 = torch.cat([x, x[:1]])

        def recorder(mname: str, record: bool):
            def point(i, a, y):
                if not record:
                    return y
                if i == 0:
                    calls[mname].append([])
                if y.shape[:1] != x.shape[:1]:
                    bad[mname] = f"a projection has a batch of {y.shape[0]}, not {x.shape[0]}"
                calls[mname][-1].append(y.shape[1:])
                return y
            return point

        def run(xs: Tensor, record: bool) -> dict[str, list]:
            seen: dict[str, list] = {m: [] for m, _ in self.modules}
            handles = []
            for mname, module in self.modules:
                if mname in composite:
                    continue

                def hook(mod, args, out, mname=mname):
                    if not args or not isinstance(args[0], Tensor):
                        bad[mname] = "called without a positional tensor input"
                    elif not isinstance(out, Tensor):
                        bad[mname] = f"its output is a {type(out).__name__}, not a tensor"
                    else:
                        seen[mname].append((tuple(out.shape), tuple(args[0].shape)))
                handles.append(module.register_forward_hook(hook))
            try:
                with torch.no_grad(), _overridden(composite, self.rules,
                                                  lambda m: recorder(m, record)):
                    batched_fn(self.model, self.frozen)(self.params, xs)
            finally:
                for h in handles:
                    h.remove()
            return seen

        try:
            two = run(x, True)
            three = run(x3, False)
        except RuleMismatch as err:  # a composite rule that does not fit: without them
            self._drop({m: f"its {self.rules[m][1]} rule does not fit: {err}"
                        for m in composite})
            return self._discover(x)
        except Exception as err:  # noqa: BLE001 - the model cannot take a decomposed module
            if not composite:
                raise
            self._drop({m: f"its {self.rules[m][1]} rule failed ({type(err).__name__}: {err})"
                        for m in composite})
            return self._discover(x)
        axes: dict[str, list[int]] = {m: [0] * len(calls[m]) for m in composite}
        broadcast: dict[str, list[bool]] = {m: [False] * len(calls[m]) for m in composite}
        for mname, _ in self.modules:
            if mname in composite or mname in bad:
                continue
            if len(two[mname]) != len(three[mname]):
                bad[mname] = "called a different number of times for 2 and for 3 examples"
                continue
            axes[mname], broadcast[mname] = [], []
            for (out2, in2), (out3, in3) in zip(two[mname], three[mname], strict=True):
                axis = _batch_axis(out2, out3, in2, in3)
                if axis is None:
                    bad[mname] = (f"no axis of its output is the batch (shape {list(out2)} "
                                  f"for 2 examples, {list(out3)} for 3)")
                    break
                shared = axis == -1  # a batch-1 call (position ids [1, S]) broadcast to the
                axis = max(axis, 0)  # batch: each example gets its own delta, one input
                calls[mname].append(torch.Size(out2[:axis] + out2[axis + 1:]))
                axes[mname].append(axis)
                broadcast[mname].append(shared)
        bad.update({m: "never called in the forward pass" for m, c in calls.items()
                    if not c and m not in bad})
        self._drop(bad)
        self.shapes = {m: calls[m] for m, _ in self.modules}
        self.axes = {m: axes[m] for m, _ in self.modules}
        self.broadcast = {m: broadcast[m] for m, _ in self.modules}

    def _drop(self, bad: dict[str, str]) -> None:
        """Move the parameters of the modules in ``bad`` (name -> reason) to the fallback."""
        for mname, module in self.modules:
            if mname in bad:
                names = self.covers(mname, module)
                self.fallback += names
                self.reasons.update({n: bad[mname] for n in names})
        self.modules = [(m, mod) for m, mod in self.modules if m not in bad]
        self.rules = {m: r for m, r in self.rules.items() if m not in bad}

    # ---- factors for one block ---------------------------------------------------------------

    def factors(self, x: Tensor, n_out: int, outputs: Tensor | None = None,
                mismatches: dict[str, str] | None = None) -> list:
        """Factors of every rule module (and the fallback) on ``x`` for the given outputs.

        With ``mismatches``, a rule that does not fit its module is recorded there (module
        name -> reason) instead of raising."""
        b = x.shape[0]

        def zeros(shape, axis=0):
            if isinstance(shape, list):  # a composite rule's call: one zero per point
                return tuple(zeros(s) for s in shape)
            return torch.zeros(*shape[:axis], b, *shape[axis:], dtype=self.dtype,
                               device=x.device)

        zs = {m: [zeros(s, ax) for s, ax in zip(shp, self.axes[m], strict=True)]
              for m, shp in self.shapes.items()}
        modules = dict(self.modules)
        composite = {m: mod for m, mod in self.modules if _composite(self.rules[m][0])}
        params, frozen, model = self.params, self.frozen, self.model

        def f(zs):
            captured: dict[str, list] = {m: [] for m in zs}

            def perturber(mname: str):
                def point(i, a, y):
                    if i == 0:
                        captured[mname].append([])
                    call = captured[mname][-1]
                    call.append(a)
                    return y + zs[mname][len(captured[mname]) - 1][i]
                return point

            handles = []
            for mname, z_list in zs.items():
                if mname in composite:
                    continue

                def hook(mod, args, out, mname=mname, z_list=z_list):
                    k = len(captured[mname])
                    inp = args[0]
                    if self.broadcast[mname][k]:
                        inp = inp.expand(b, *inp.shape[1:])
                    elif self.axes[mname][k]:  # batch-first for the rule
                        inp = inp.movedim(self.axes[mname][k], 0)
                    captured[mname].append(inp)
                    return out + z_list[k]
                handles.append(modules[mname].register_forward_hook(hook))
            try:
                with _overridden(composite, self.rules, perturber):
                    out = functional_call(model, {**frozen, **params}, (x,), strict=False)
            finally:
                for h in handles:
                    h.remove()
            return flatten_output(out, b), captured

        factors: list = []
        if self.modules:
            # torch.func.vjp's return type is a union of the 2- and 3-tuple, not overloaded
            _, vjp_fn, captured = vjp(f, zs, has_aux=True)  # type: ignore[misc]
            basis = torch.eye(n_out, dtype=self.dtype, device=x.device)
            if outputs is not None:
                basis = basis[outputs]
            basis = basis.unsqueeze(1).expand(basis.shape[0], b, n_out)
            (deltas,) = map_or_loop(vjp_fn, (0,), basis, owner=self.model,
                                    what="the backward pass over the outputs")
            for mname, module in self.modules:
                prefix = f"{mname}." if mname else ""
                rule = self.rules[mname][0]
                ds = [d if not ax else d.movedim(ax + 1, 1)  # [O, B, ...] for the rule
                      for d, ax in zip(deltas[mname], self.axes[mname], strict=True)]
                try:
                    factors += rule(module, prefix, captured[mname], ds)
                except RuleMismatch as err:
                    if mismatches is None:
                        raise
                    mismatches[mname] = f"its {self.rules[mname][1]} rule does not fit: {err}"
        if self.fallback:
            fb = {n: self.params[n] for n in self.fallback}
            rest = {n: p for n, p in self.params.items() if n not in fb}
            f_all = single_fn(self.model, {**self.frozen, **rest})
            f_single = f_all if outputs is None else (lambda p, xi: f_all(p, xi)[outputs])
            g = per_example_jacobian(f_single, fb, x, owner=self.model)
            sizes = [fb[n].numel() for n in self.fallback]
            names, shapes = list(self.fallback), [fb[n].shape for n in self.fallback]

            def to_params(gr, names=names, shapes=shapes, sizes=sizes):
                return {n: c.reshape(*c.shape[:2], *s)
                        for n, c, s in zip(names, gr.split(sizes, dim=2), shapes, strict=True)}

            factors.append(GradFactor(g, to_params, names))
        return factors

    # ---- checking the rules against autograd -------------------------------------------------

    def verify(self, x: Tensor, n_out: int) -> dict[str, str]:
        """Rule modules whose gradients disagree with autograd on ``x`` (2 examples, a random
        cotangent), or whose rule does not fit them: module name -> reason.

        The tolerance follows the lowest floating-point precision the forward pass computes in
        (a float64 model whose RMSNorm computes in float32, as Hugging Face's do, is checked at
        float32 accuracy; a bfloat16 model at bfloat16's)."""
        x = x[:2]
        gen = torch.Generator(device="cpu").manual_seed(0)
        c = torch.randn(x.shape[0], n_out, generator=gen, dtype=self.dtype).to(x.device)
        f = batched_fn(self.model, self.frozen)
        with _FloatDtypes() as seen:
            # torch.func.vjp's return type is a union of the 2- and 3-tuple, not overloaded
            _, pull = vjp(lambda p: f(p, x), self.params)  # type: ignore[misc]
        (true,) = pull(c)
        recon: dict[str, Tensor] = {}
        bad: dict[str, str] = {}
        saved_fallback, self.fallback = self.fallback, []
        try:
            factors = self.factors(x, n_out, mismatches=bad)
        finally:
            self.fallback = saved_fallback
        for fac in factors:
            per = fac.to_params(fac.grads() if isinstance(fac, TokenFactor) else fac.g)
            for n, g in per.items():  # g: [B, O, *shape]; several factors may share a parameter
                part = torch.einsum("bo,bo...->...", c, g)
                recon[n] = part if n not in recon else recon[n] + part
        tol = max(_TOLERANCE.get(d, 1e-3) for d in seen.dtypes | {self.dtype})
        # compared per module (weight and bias together): a parameter whose exact gradient is 0
        # (e.g. an attention key bias) only carries round-off, judged against its module's scale
        total = sum(float(g.norm()) ** 2 for g in true.values()) ** 0.5
        for mname, module in self.modules:
            names = [n for n in self.covers(mname, module) if n in recon]
            if not names or mname in bad:
                continue
            err = sum(float((recon[n] - true[n]).norm()) ** 2 for n in names) ** 0.5
            scale = sum(float(true[n].norm()) ** 2 for n in names) ** 0.5
            if err > tol * scale + tol * 1e-3 * total + 1e-30:
                bad[mname] = (f"its {self.rules[mname][1]} rule does not reproduce autograd's "
                              f"gradient (relative error {err / max(scale, 1e-30):.1e}; a weight "
                              "also used outside the module, or a forward that differs)")
        return bad


def _batch_axis(out2: tuple, out3: tuple, in2: tuple, in3: tuple) -> int | None:
    """The batch axis of a module call seen with 2 and with 3 examples: the one axis of the
    output (and of its input) that is 2 and then 3, all else equal; ``-1`` for a batch-1 call
    whose output is broadcast to the batch (axis 0 of size 1 both times); ``None`` otherwise."""
    if len(out2) != len(out3) or not out2:
        return None
    if out2[0] == out3[0] == 1 and in2 and in2[0] == in3[0] == 1 and out2 == out3:
        return -1
    axes = [a for a in range(len(out2))
            if out2[a] == 2 and out3[a] == 3
            and out2[:a] + out2[a + 1:] == out3[:a] + out3[a + 1:]]
    if len(axes) != 1:
        return None
    axis = axes[0]
    if axis and (len(in2) <= axis or in2[axis] != 2 or in3[axis] != 3):
        return None  # the input's batch is elsewhere: the rule could not line them up
    return axis


def _composite(rule: object) -> TypeGuard[CompositeRule]:
    """A rule that replaces its module's forward to reach inside it (AttentionRule)."""
    return bool(getattr(rule, "composite", False))


@contextlib.contextmanager
def _overridden(modules: dict[str, nn.Module], rules: dict, point_for) -> Iterator[None]:
    """While inside, every composite-rule module's forward is its rule's ``forward`` with the
    ``point`` callback ``point_for(name)`` (an instance attribute, removed after)."""
    saved: dict[str, Callable | None] = {}
    try:
        for mname, module in modules.items():
            saved[mname] = module.__dict__.get("forward")
            module.forward = functools.partial(rules[mname][0].forward, module,
                                               point_for(mname))
        yield
    finally:
        for mname, module in modules.items():
            forward = saved.get(mname)
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward


_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 1e-2,
              torch.bfloat16: 5e-2}
"""Relative gradient tolerance of the rule check, by the lowest precision a forward uses."""


class _FloatDtypes(TorchDispatchMode):
    """Records the floating-point dtypes of every op's outputs while active."""

    def __enter__(self):
        self.dtypes: set[torch.dtype] = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.is_floating_point():
                self.dtypes.add(t.dtype)
        return out


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


def _sizes(engine: _Engine) -> tuple[int, int, int]:
    """Per-example element counts: deltas per output, inputs, and the largest per-example
    gradient of one layer per output (rough upper bounds, for choosing blocks)."""
    per_output, inputs, widest = 0, 0, 1
    for mname, module in engine.modules:
        for shp in engine.call_shapes(mname):
            numel = int(torch.Size(shp).numel())
            per_output += numel
            inputs += 2 * numel
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


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


FALLBACK_WARN_SHARE = 0.25
"""``ntk`` warns (once per model) when per-example Jacobians cover more of the parameters."""


def _plan(model: nn.Module, probe: Tensor, *, quiet: bool = False) -> tuple[_Engine, int]:
    """The structured engine for ``model``, with every rule verified against autograd once
    (cached per model structure, input shape and rule registry)."""
    key = (model_signature(model, probe), rules_version())
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == key:
        engine, n_out = cached[1], cached[2]
        engine.params, engine.frozen = trainable_params(model), frozen_state(model)
        return engine, n_out
    engine = _Engine(model, probe)
    with torch.no_grad():
        n_out = batched_fn(model, engine.frozen)(engine.params, probe).shape[1]
    try:
        bad = engine.verify(probe, n_out)
    except Exception as err:  # noqa: BLE001 - a broadcast batch-1 output the model cannot take
        shared = [m for m, calls in engine.broadcast.items() if any(calls)]
        if not shared:
            raise
        why = f"its batch-1 output cannot be given a per-example delta ({type(err).__name__})"
        engine = _Engine(model, probe, excluded=dict.fromkeys(shared, why))
        bad = engine.verify(probe, n_out)
    if bad:
        if not quiet:
            listed = "; ".join(f"{m or type(model).__name__}: {why}"
                               for m, why in sorted(bad.items())[:4])
            more = f"; and {len(bad) - 4} more" if len(bad) > 4 else ""
            warn(
                f"structured NTK: {len(bad)} module(s) use per-example Jacobians (exact, "
                f"slower) because their rule failed the autograd check ({listed}{more}); "
                "telescope.kernels.explain(model, x) shows the whole plan")
        engine = _Engine(model, probe, excluded=bad)
    if not quiet:
        _warn_fallback_share(engine, model)
    _PLANS[model] = (key, engine, n_out)
    return engine, n_out


def _warn_fallback_share(engine: _Engine, model: nn.Module) -> None:
    total = sum(p.numel() for p in engine.params.values())
    fallback = sum(engine.params[n].numel() for n in engine.fallback)
    if not total or fallback <= FALLBACK_WARN_SHARE * total:
        return
    modules = dict(model.named_modules())
    kinds: dict[str, int] = {}
    for name in engine.fallback:
        owner = modules.get(name.rpartition(".")[0])
        kind = type(owner).__name__ if owner is not None else "?"
        kinds[kind] = kinds.get(kind, 0) + engine.params[name].numel()
    top = ", ".join(f"{k} ({v / total:.0%})" for k, v in
                    sorted(kinds.items(), key=lambda kv: -kv[1])[:4])
    warn(
        f"structured NTK: {fallback / total:.0%} of the parameters have no per-layer rule and "
        f"use per-example Jacobians (exact, slower): {top}. telescope.kernels.explain(model, x) "
        "says why for each; telescope.kernels.register_rule adds a rule for your own layer "
        "types")


def explain(model: nn.Module, x: Tensor, *, output: str = "trace"):  # -> pandas.DataFrame
    """The structured plan of ``ntk(model, x)``: one row per trainable parameter.

    Columns: ``parameter``, ``module``, ``module_type``, ``shape``, ``numel``,
    ``share_of_params``, ``rule`` (``"linear"``, ``"linear (Conv1D)"``, ``"embedding"``,
    ``"convolution"``, ``"affine (norm)"``, ... or ``"per-example Jacobian"``), ``reason`` (why a
    parameter has no rule: no rule for its module type, shared with another module, a module
    called with a different batch size, a rule that failed the autograd check, ...), and
    ``cost_share``: the module's share of the estimated multiply-adds of the kernel's
    contraction for the ``N x N`` kernel of ``x`` (for a rule module the cheaper of its token
    Gram and per-example-gradient contractions, for per-example Jacobians their contraction,
    ``O P``, plus building them, ``~3 O`` backward passes of the parameter's layer per example;
    an estimate to compare modules, not a timing).
    """
    import pandas as pd


    if output not in ("trace", "full", "diagonal"):
        raise UsageError(f"output must be 'trace', 'full' or 'diagonal', got {output!r}")
    with ad_safe_backends(model):
        x, _ = checked_call(model, x)
        engine, n_out = _plan(model, at_least_two(x[:2]), quiet=True)
    n = x.shape[0]
    m = n_out * n_out if output == "full" else n_out
    modules = dict(model.named_modules())
    total = sum(p.numel() for p in engine.params.values())
    rule_of = {}
    cost: dict[str, float] = {}
    for mname, module in engine.modules:
        names = engine.covers(mname, module)
        numel = sum(engine.params[k].numel() for k in names)
        shapes = engine.call_shapes(mname)
        tokens = sum(int(torch.Size(shp[:-1]).numel()) if len(shp) > 1 else 1
                     for shp in shapes)
        width = shapes[0][-1] if shapes and shapes[0] else 1
        per_pair = min(tokens * tokens * (numel / max(width, 1) + m * width), m * numel)
        for k in names:
            rule_of[k] = engine.rules[mname][1]
            cost[k] = n * n * per_pair * engine.params[k].numel() / max(numel, 1)
    for k in engine.fallback:
        numel = engine.params[k].numel()
        cost[k] = n * n * m * numel + 3 * n * n_out * 2 * numel
    all_cost = sum(cost.values()) or 1.0
    rows = []
    for name, p in engine.params.items():
        owner = name.rpartition(".")[0]
        rows.append({
            "parameter": name, "module": owner,
            "module_type": type(modules.get(owner, model)).__name__,
            "shape": tuple(p.shape), "numel": p.numel(), "share_of_params": p.numel() / total,
            "rule": rule_of.get(name, "per-example Jacobian"),
            "reason": engine.reasons.get(name, "") if name not in rule_of else "",
            "cost_share": cost[name] / all_cost,
        })
    return pd.DataFrame(rows)


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
