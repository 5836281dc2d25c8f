"""What :class:`telescope.Smoother` accepts, checked at its door: the optimizer (whose update
it reproduces exactly: ``torch.optim.SGD``, ``Adam`` and ``AdamW``, every param-group option read
against an allow-list), the parameters it follows, the model's training mode, batch indices and
targets. Everything else raises a :mod:`telescope.errors` error naming the problem and the fix.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from telescope.errors import UnsupportedModelError, UnsupportedOptimizerError, UsageError
from telescope.kernels.functional import check_model


def trained_param_names(model: nn.Module, optimizer: torch.optim.Optimizer,
                 chosen: list[str] | None) -> list[str]:
    named = {id(p): n for n, p in model.named_parameters()
             if p.requires_grad and (chosen is None or n in chosen)}
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for i, n in named.items() if i not in in_opt]
    if missing:
        raise UsageError(f"Smoother: trainable parameters not in the optimizer: {missing}; "
                         "freeze them (requires_grad_(False)) or add them to the optimizer")
    left_out = [n for n, p in model.named_parameters()
                if p.requires_grad and id(p) in in_opt and id(p) not in named]
    if left_out:
        raise UsageError(f"Smoother: the optimizer also trains parameters that params= leaves "
                         f"out ({', '.join(left_out[:5])}); select every parameter it trains")
    extra = [i for i in in_opt if i not in named and i not in {id(p) for p in model.parameters()}]
    if extra:
        raise UsageError(f"Smoother: the optimizer holds {len(extra)} parameters that are not "
                         "trainable parameters of the model")
    if any(len(st) for st in optimizer.state.values()):
        raise UsageError("Smoother: the optimizer already has state (momentum or moments from "
                         "earlier steps); attach the Smoother to a freshly created optimizer")
    return list(named.values())


# Every option of the optimizers the smoother reproduces, with the values it reproduces (a
# predicate). An optimizer's step reads exactly the keys of its ``defaults``; any other key of
# a param group (a scheduler's ``initial_lr``, a user's ``name``) does not change the step.
def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _anything(v) -> bool:
    return True


def _false(v) -> bool:
    return not v


_SGD_OPTIONS = {
    "lr": _number, "momentum": _number, "dampening": _number, "weight_decay": _number,
    "nesterov": _anything, "maximize": _anything, "foreach": _anything, "fused": _anything,
    "differentiable": _false,
}
_ADAM_OPTIONS = {
    "lr": _number, "eps": _number, "weight_decay": _number,
    "betas": lambda v: len(v) == 2 and all(_number(float(b)) for b in v),
    "amsgrad": _anything, "maximize": _anything, "foreach": _anything, "fused": _anything,
    "capturable": _anything, "decoupled_weight_decay": _anything, "differentiable": _false,
}
_RULES = {torch.optim.SGD: ("sgd", _SGD_OPTIONS), torch.optim.Adam: ("adam", _ADAM_OPTIONS),
          torch.optim.AdamW: ("adam", _ADAM_OPTIONS)}
_SGD_UNIFORM = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


def optimizer_rule(optimizer: torch.optim.Optimizer, mode: str) -> tuple[str, str]:
    """``(kind, mode)`` for an optimizer the smoother reproduces exactly, from what it does:
    its class (``torch.optim.SGD``, ``Adam`` or ``AdamW``, or a subclass that keeps their
    ``step``) and every option of every param group, read against an allow-list; anything else
    raises :class:`UnsupportedOptimizerError` naming the option. ``Adam(...,
    decoupled_weight_decay=True)`` is AdamW (as in PyTorch >= 2.6), per param group."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"optimizer must be a torch.optim.Optimizer, got "
                         f"{type(optimizer).__name__}")
    name = type(optimizer).__name__
    base = cast("type[torch.optim.Optimizer] | None",  # a key of _RULES
                next((cls for cls in type(optimizer).__mro__ if cls in _RULES), None))
    if base is None or type(optimizer).step is not base.step:
        what = (f"{name} overrides {base.__name__}.step" if base is not None else
                f"{name} is not one of them")
        raise UnsupportedOptimizerError(
            f"Smoother reproduces the updates of torch.optim.SGD, Adam and AdamW exactly; "
            f"{what}. (telescope.Telescope follows any optimizer.)")
    kind, allowed = _RULES[base]
    for key in optimizer.defaults:
        if key not in allowed:
            raise UnsupportedOptimizerError(
                f"Smoother: {name} option {key!r} is not reproduced (known options: "
                f"{', '.join(allowed)}); use telescope.Telescope, or a torch version whose "
                f"{name} has no such option")
    for i, group in enumerate(optimizer.param_groups):
        for key, ok in allowed.items():
            if key not in group:
                continue
            value = group[key]
            if isinstance(value, Tensor):
                raise UnsupportedOptimizerError(
                    f"Smoother: param group {i} has a tensor {key} ({value!r}); pass a Python "
                    f"number")
            try:
                good = ok(value)
            except (TypeError, ValueError):
                good = False
            if not good:
                raise UnsupportedOptimizerError(
                    f"Smoother: {name} with {key}={value!r} (param group {i}) is not "
                    f"reproduced; "
                    + ("differentiable optimizers are not supported" if key == "differentiable"
                       else f"{key} must be a finite number"))
    if kind == "sgd":
        uniform = uniform_groups(optimizer)
        if mode == "auto":
            return kind, "function" if uniform else "weight"
        if mode == "function" and not uniform:
            raise UsageError("Smoother(mode='function') needs the same SGD hyperparameters in "
                             "every param group; use mode='weight' (or 'auto')")
        return kind, mode
    if mode == "function":
        raise UsageError(f"Smoother(mode='function') supports SGD only; {name} needs "
                         "mode='weight' (the default 'auto' picks it)")
    return kind, "weight"


def uniform_groups(optimizer: torch.optim.Optimizer) -> bool:
    first = optimizer.param_groups[0]
    return all(all(g.get(k) == first.get(k) for k in _SGD_UNIFORM)
               for g in optimizer.param_groups)


def check_uniform_groups(optimizer: torch.optim.Optimizer) -> None:
    if not uniform_groups(optimizer):
        raise UsageError(
            "Smoother: the SGD param groups no longer share their hyperparameters (a schedule "
            "with one rule per group?), which the function-space recursion needs; create the "
            "Smoother with mode='weight'")


def check_training_mode(model: nn.Module) -> None:
    """The training step must be a deterministic function of each example."""
    try:
        check_model(model)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(
            f"Smoother: the model trains in a mode whose steps the smoother cannot reproduce: "
            f"{err} (The smoother follows deterministic, per-example training steps: train "
            "with the model in eval mode, or without such layers.)") from None


def as_batch_indices(batch: object, n: int) -> Tensor:
    """Integer indices ``[B]`` from integer indices or a boolean mask of length ``n``."""
    if isinstance(batch, Tensor):
        idx = batch.detach()
    else:
        try:
            idx = torch.as_tensor(batch)
        except (TypeError, ValueError, RuntimeError) as err:
            raise UsageError(f"batch indices must be integers or a boolean mask, got "
                             f"{type(batch).__name__} ({err})") from None
    if idx.numel() == 0:
        raise UsageError("the batch is empty")
    if idx.dtype == torch.bool:
        if idx.ndim != 1 or idx.shape[0] != n:
            raise UsageError(f"a boolean batch mask must have length n = {n}, got shape "
                             f"{tuple(idx.shape)}")
        idx = idx.nonzero()[:, 0]
    elif idx.is_floating_point() or idx.is_complex():
        raise UsageError(f"batch indices must be integers (or a boolean mask of length {n}), "
                         f"got {idx.dtype} values")
    elif idx.ndim > 1:
        raise UsageError(f"batch indices must be 1-D, got shape {tuple(idx.shape)}")
    idx = idx.reshape(-1).long()
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise UsageError(f"batch indices must lie in [0, {n}), got [{int(idx.min())}, "
                         f"{int(idx.max())}]")
    return idx


def target_matrix(y: Tensor, n: int, o: int, loss: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise UsageError(f"y_train must be a tensor, got {type(y).__name__}")
    if y.shape[0] != n:
        raise UsageError(f"y_train has {y.shape[0]} rows, x_train {n}")
    if loss == "cross_entropy" and y.ndim == 1:
        if y.is_floating_point():
            raise UsageError("cross-entropy targets must be integer classes or one-hot rows")
        if int(y.min()) < 0 or int(y.max()) >= o:
            raise UsageError(f"class labels must lie in [0, {o}), the model has {o} outputs")
        return torch.nn.functional.one_hot(y.long(), o)
    y2 = y.reshape(n, -1)
    if y2.shape[1] != o:
        raise UsageError(f"y_train has {y2.shape[1]} targets per example, the model {o} outputs")
    if y2.is_floating_point() and not torch.isfinite(y2).all():
        raise UsageError("y_train contains NaN or infinite values")
    return y2
