"""Which parameters a lens follows, and whether they are still the ones it started with.

Both :class:`~telescope.lens.Telescope` and :class:`~telescope.lens.Smoother` follow a fixed
list of trainable parameters (all of them, or a ``params=`` subset) moved by one optimizer; a
replaced layer, ``add_param_group`` or a toggled ``requires_grad`` would make them describe
another network, so they check at every step and refuse instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from telescope.kernels.functional import ParamSpec, select_params

__all__ = ["optimizer_param_ids", "followed_parameters", "parameter_changes"]


def optimizer_param_ids(optimizer: torch.optim.Optimizer) -> list[int]:
    """The ids of every parameter in the optimizer's param groups, in order."""
    return [id(p) for group in optimizer.param_groups for p in group["params"]]


def followed_parameters(model: nn.Module, spec: ParamSpec) -> list[tuple[str, Tensor]]:
    """The trainable parameters ``spec`` selects (all trainable ones for ``None``)."""
    chosen = select_params(model, spec)
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and (chosen is None or n in chosen)]


def parameter_changes(model: nn.Module, spec: ParamSpec, names: list[str],
                      params: Sequence[Tensor], optimizer: torch.optim.Optimizer,
                      optimizer_ids: list[int]) -> str | None:
    """``None`` while the followed parameters and the optimizer's groups are those recorded
    (``names``, ``params``, ``optimizer_ids``); else what changed, e.g. ``"replaced: 4.bias,
    4.weight"`` (empty when only the optimizer's groups did)."""
    named = followed_parameters(model, spec)
    if ([n for n, _ in named] == names
            and all(p is q for (_, p), q in zip(named, params, strict=True))
            and optimizer_param_ids(optimizer) == optimizer_ids):
        return None
    now, old = dict(named), dict(zip(names, params, strict=True))
    added = sorted(set(now) - set(old))
    gone = sorted(set(old) - set(now))
    replaced = sorted(n for n in set(now) & set(old) if now[n] is not old[n])
    return "; ".join(f"{what}: {', '.join(found[:5])}" for what, found in (
        ("new", added), ("replaced", replaced), ("gone", gone)) if found)
