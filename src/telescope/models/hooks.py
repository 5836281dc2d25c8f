"""Named hook points: read a model's intermediate activations by name, without the model keeping
any state for it (the idea of TransformerLens' ``HookPoint``, Nanda & Bloom, 2022).

A :class:`HookPoint` is an identity module placed where a model computes an activation worth
reading, e.g. ``self.hook_pattern = HookPoint()`` in ``__init__`` and
``attn = self.hook_pattern(scores.softmax(-1))`` in ``forward``. Its name is its qualified module
name (``blocks.0.attn.hook_pattern``). Without hooks registered it returns its input unchanged,
so it changes no number and works under ``torch.func.functional_call``, ``vmap`` and
forward-mode AD.

:func:`capture` registers temporary forward hooks on the hook points it is asked for and collects
what passes through them; the hooks are removed when the ``with`` block ends, also on an error::

    with capture(model, ["blocks.0.attn.hook_pattern"]) as cache:
        model(x)
    pattern = cache["blocks.0.attn.hook_pattern"]          # [N, heads, S_q, S_k]

:func:`run_with_cache` is the same for one call: ``output, cache = run_with_cache(model, x)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from telescope.errors import UsageError

__all__ = ["HookPoint", "hook_points", "capture", "run_with_cache"]

Names = str | Iterable[str] | Callable[[str], bool] | None


class HookPoint(nn.Module):
    """The identity ``x -> x``: a named place where :func:`capture` can read an activation."""

    def forward(self, x: Any) -> Any:
        return x


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Every :class:`HookPoint` of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}


def _select(model: nn.Module, names: Names) -> dict[str, HookPoint]:
    points = hook_points(model)
    if names is None:
        return points
    if callable(names):
        return {n: m for n, m in points.items() if names(n)}
    wanted = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in wanted if n not in points]
    if unknown:
        known = ", ".join(points) if points else "none"
        raise UsageError(f"capture: {type(model).__name__} has no hook point named "
                         f"{', '.join(map(repr, unknown))}; its hook points: {known} (add one "
                         f"with telescope.models.hooks.HookPoint)")
    return {n: points[n] for n in wanted}


@contextmanager
def capture(model: nn.Module, names: Names = None, *,
            detach: bool = True) -> Iterator[dict[str, Tensor]]:
    """Collect the activations at hook points of ``model`` while the ``with`` block runs.

    Parameters
    ----------
    model
        Any module with :class:`HookPoint` submodules.
    names
        Which hook points: ``None`` (all), one name, a list of names (each must exist, else
        :class:`~telescope.errors.UsageError`), or a filter ``name -> bool``.
    detach
        Store ``output.detach()`` (default) or the tensor itself (to differentiate through it).

    Yields
    ------
    dict
        ``{name: tensor}``, filled during the forward passes in the block; a hook point called
        several times keeps its last call, one not called has no entry. The hooks are removed
        when the block ends, normally or by an exception; the model keeps no state.
    """
    cache: dict[str, Tensor] = {}
    handles = []

    def store(name: str):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            cache[name] = output.detach() if detach and isinstance(output, Tensor) else output
        return hook

    try:
        for name, point in _select(model, names).items():
            handles.append(point.register_forward_hook(store(name)))
        yield cache
    finally:
        for handle in handles:
            handle.remove()


def run_with_cache(model: nn.Module, *args: Any, names: Names = None, detach: bool = True,
                   **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
    """``(model(*args, **kwargs), cache)`` with the activations at the selected hook points
    (``names`` and ``detach`` as in :func:`capture`). Mode and autograd are left as they are."""
    with capture(model, names, detach=detach) as cache:
        output = model(*args, **kwargs)
    return output, cache
