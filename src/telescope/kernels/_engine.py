"""The structured engine (:class:`_Engine`): the plan of a structured kernel and the factors of
one block of examples.

The plan: which modules use which rule (a composite rule's module claims its submodules), which
parameters fall back to per-example Jacobians and why (no rule, a parameter shared with another
module, calls that cannot be lined up with the batch, a rule that does not fit), and the output
shape and batch axis of every call, found by forward passes on two and on three examples. The
factors: every rule module's inputs, captured with forward hooks, and the deltas of the selected
outputs from one batched reverse-mode pass (``vmap`` over the output basis of a single ``vjp``
of zeros added to each module's output), handed to the rules; per-example Jacobians for the
fallback. :meth:`_Engine.verify` checks every rule against autograd at the lowest precision the
forward pass computes in.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeGuard

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call, vjp
from torch.utils._python_dispatch import TorchDispatchMode

from telescope.kernels._blocks import per_example_jacobian
from telescope.kernels._functional import (
    batched_fn,
    flatten_output,
    frozen_state,
    map_or_loop,
    model_dtype_device,
    single_fn,
    trainable_params,
)
from telescope.kernels._rule_protocol import (
    CompositeRule,
    GradFactor,
    Rule,
    RuleMismatch,
    TokenFactor,
)
from telescope.kernels.rules import rule_for


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
