"""A model's structured plan, checked against autograd once and cached (per model structure,
input shape and rule registry), the warnings when modules fall back to per-example Jacobians,
and :func:`explain`, which shows the plan (re-exported by :mod:`telescope.kernels.structured`
and :mod:`telescope.kernels`).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from telescope.errors import UsageError, warn
from telescope.kernels._engine import _Engine
from telescope.kernels._functional import (
    ad_safe_backends,
    at_least_two,
    batched_fn,
    checked_call,
    frozen_state,
    model_signature,
    trainable_params,
)
from telescope.kernels.rules import rules_version

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
