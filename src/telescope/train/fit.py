"""One training loop, with the lenses attached as callbacks.

:func:`fit` trains ``model`` with ``optimizer`` on ``(x, y)`` for a number of optimizer steps. Each
step is the textbook one::

    optimizer.zero_grad();  loss = loss_fn(model(x[batch]), y[batch])
    (stop or raise if the loss is not finite);  loss.backward()
    callback.before_update(state)      # e.g. Smoother.record(batch)
    optimizer.step();  scheduler.step()
    callback.after_update(state)

and at the steps in ``eval_at`` (``0`` = before the first step) the model is put in eval mode and
every callback's ``measure(state)`` adds columns to that step's row of the :class:`History` (a
dict), or rows to its own table (a list of dicts). ``evaluate(model)`` is the same, for the
metrics a caller computes itself; it runs under ``torch.no_grad``.

A *callback* is any object with some of these methods (each optional; see :class:`Callback`):
``on_fit_start(state)``, ``before_update(state)``, ``after_update(state)``, ``measure(state)``,
``on_fit_end(state)``. The lenses implement them (:class:`~telescope.Telescope` observes the
optimizer by itself; :class:`~telescope.Smoother` records each batch in ``before_update``;
:class:`~telescope.lens.KernelEvolution`, :class:`~telescope.lens.WeightRank`,
:class:`~telescope.lens.NormCycles` and :class:`~telescope.lens.AttentionEntropy` measure), and
they keep working unchanged in a loop of the caller's own.

Batches (``batch_size``/``sampler``): ``batch_size=None`` is full batch (all of ``x``, in order,
no random numbers drawn). Otherwise ``sampler`` says how each step's indices are drawn from
``generator`` (a ``torch.Generator``, CPU):

- ``"random"``: ``randperm(n)[:batch_size]`` at every step (without replacement within a step);
- ``"epochs"``: one ``randperm(n)`` per epoch, cut into ``n // batch_size`` consecutive batches
  (the remainder is dropped);
- ``"replacement"``: ``randint(0, n, (batch_size,))`` at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from telescope.errors import DivergedError, UsageError
from telescope.kernels.functional import eval_mode
from telescope.train.progress import Progress, TqdmProgress

__all__ = ["fit", "FitState", "History", "Callback", "LOSSES", "SAMPLERS"]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: The losses ``fit`` knows by name (``loss=`` also takes any ``(output, target) -> loss``).
LOSSES: dict[str, LossFn] = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}

#: How the indices of a step's batch are drawn (see the module docstring).
SAMPLERS = ("random", "epochs", "replacement")

_HOOKS = ("on_fit_start", "before_update", "after_update", "measure", "on_fit_end")


@dataclass
class FitState:
    """What a callback sees: the model and optimizer, the step and its batch and loss.

    ``step`` counts optimizer steps taken (``0`` before the first); ``batch`` holds the indices
    into the training set of the step's examples (all of them for full batch) and ``loss`` the
    step's training loss, computed before the update (``nan`` at step 0).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: Tensor
    y: Tensor
    steps: int
    step: int = 0
    batch: Tensor | None = None
    loss: float = math.nan


class Callback(Protocol):
    """The callback protocol. Every method is optional: ``fit`` calls those an object has.

    ``before_update`` runs after ``loss.backward()`` and before ``optimizer.step()`` of step
    ``state.step`` (the step being taken); ``after_update`` right after it; ``measure`` at the
    steps in ``eval_at``, with the model in eval mode (gradients enabled: a lens may
    differentiate), returning columns for the step's row (a dict), rows for the callback's own
    table (a list of dicts, stored under its ``name`` attribute or class name) or ``None``.
    """

    def on_fit_start(self, state: FitState) -> None: ...

    def before_update(self, state: FitState) -> None: ...

    def after_update(self, state: FitState) -> None: ...

    def measure(self, state: FitState) -> dict[str, Any] | list[dict[str, Any]] | None: ...

    def on_fit_end(self, state: FitState) -> None: ...


@dataclass
class History:
    """What :func:`fit` measured: one row per step in ``eval_at`` (``step``, ``loss``, the
    columns of ``evaluate`` and of every callback whose ``measure`` returns a dict), and per
    callback whose ``measure`` returns a list of rows, a table (``tables[name]``, each row with
    its ``step``). ``diverged_at`` is the step whose loss was not finite (``on_nonfinite="stop"``),
    else ``None``; ``diverged_loss`` that loss."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    diverged_at: int | None = None
    diverged_loss: float = math.nan
    steps_done: int = 0

    def table_by_step(self, table: str) -> dict[int, list[dict[str, Any]]]:
        """The rows of the table ``table`` grouped by their ``step`` (``{}`` if it has none)."""
        out: dict[int, list[dict[str, Any]]] = {}
        for r in self.tables.get(table, []):
            out.setdefault(r["step"], []).append(r)
        return out

    def frame(self, table: str | None = None):  # -> pandas.DataFrame
        """``rows`` (or the table ``table``) as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows if table is None else self.tables.get(table, []))


def _callback_name(cb: object) -> str:
    return str(getattr(cb, "name", None) or type(cb).__name__)


def _check_callbacks(callbacks: Iterable[object]) -> list[object]:
    out = list(callbacks)
    for cb in out:
        if not any(callable(getattr(cb, h, None)) for h in _HOOKS):
            raise UsageError(
                f"callback {cb!r} has none of the callback methods ({', '.join(_HOOKS)}); "
                "pass lenses or objects implementing telescope.train.Callback")
    return out


def _resolve_loss(loss: str | LossFn) -> LossFn:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise UsageError(f"unknown loss {loss!r}; pass one of {sorted(LOSSES)} or a callable "
                         "(output, target) -> scalar loss")
    return LOSSES[loss]


def _resolve_schedule(schedule: Any, optimizer: torch.optim.Optimizer):
    if schedule is None or hasattr(schedule, "step"):
        return schedule
    if callable(schedule):   # a learning-rate multiplier of the step, as LambdaLR takes it
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    raise UsageError(f"schedule must be an LR scheduler, a callable step -> multiplier or None, "
                     f"not {type(schedule).__name__}")


def _batches(n: int, steps: int, batch_size: int | None, sampler: str,
             generator: torch.Generator | None, device: torch.device) -> Iterator[Tensor | None]:
    """The indices of each step's batch (``None``: the whole training set, in order)."""
    if batch_size is None:
        for _ in range(steps):
            yield None
        return
    if sampler == "random":
        for _ in range(steps):
            yield torch.randperm(n, generator=generator)[:batch_size].to(device)
    elif sampler == "replacement":
        for _ in range(steps):
            yield torch.randint(0, n, (batch_size,), generator=generator).to(device)
    else:   # epochs
        per_epoch = max(1, n // batch_size)
        done = 0
        while done < steps:
            perm = torch.randperm(n, generator=generator)
            for b in range(min(per_epoch, steps - done)):
                yield perm[b * batch_size:(b + 1) * batch_size].to(device)
            done += per_epoch


def _progress(progress: Progress | bool | None, steps: int) -> tuple[Progress, bool]:
    """The progress to report to, and whether ``fit`` owns (and closes) it."""
    if progress is not None and not isinstance(progress, bool):   # a Progress, or alike
        if getattr(progress, "total", None) is None:
            progress.set(steps)
        return progress, False
    bar = TqdmProgress("fit", position=0, enabled=bool(progress))
    bar.set(steps)
    return bar, True


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    loss: str | LossFn = "mse",
    batch_size: int | None = None,
    sampler: str = "random",
    generator: torch.Generator | None = None,
    schedule: Any = None,
    eval_at: Iterable[int] = (),
    evaluate: Callable[[nn.Module], Mapping[str, Any]] | None = None,
    callbacks: Iterable[object] = (),
    on_nonfinite: str = "raise",
    progress: Progress | bool | None = None,
) -> History:
    """Train ``model`` for ``steps`` optimizer steps on ``(x, y)``; measure at ``eval_at``.

    Parameters
    ----------
    model, optimizer:
        The network and an optimizer over (some of) its parameters. The model is trained in the
        mode it is in (call ``model.train()`` first for dropout/batch norm) and returned to that
        mode after each measurement, which runs in eval mode.
    x, y:
        The training inputs and targets (first axis: examples).
    steps:
        Optimizer steps to take.
    loss:
        ``"mse"``, ``"cross_entropy"`` (see :data:`LOSSES`) or a callable ``(output, target) ->
        scalar``; it may close over the model (e.g. the ``1/alpha^2`` scaling of a lazy model).
    batch_size, sampler, generator:
        Mini-batches: see the module docstring. ``generator`` defaults to a fresh CPU
        generator seeded with ``0`` so that a run is reproducible.
    schedule:
        An LR scheduler (stepped after every optimizer step), a callable ``step -> multiplier``
        (wrapped in ``LambdaLR``) or ``None``.
    eval_at:
        The steps after which to measure (``0``: before training).
    evaluate:
        ``model -> {column: value}``, run in eval mode under ``torch.no_grad`` at ``eval_at``.
    callbacks:
        Lenses or other objects with the methods of :class:`Callback`.
    on_nonfinite:
        A step whose loss is NaN or infinite: ``"raise"`` a :class:`~telescope.errors.
        DivergedError` (naming the step and the fix), or ``"stop"`` training there (without
        that step's update) and set :attr:`History.diverged_at`. The same for an update that
        leaves a parameter non-finite, checked at the steps of ``eval_at`` before measuring
        (``diverged_loss`` is then NaN; the update is not undone).
    progress:
        A :class:`~telescope.train.Progress` to count steps on (its total is set to ``steps`` if
        unset), ``True`` for a tqdm bar, or ``None``/``False`` for none.

    Returns
    -------
    History
        The measured rows and tables (``History.frame()`` for a DataFrame).
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"optimizer must be a torch.optim.Optimizer, not "
                         f"{type(optimizer).__name__}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise UsageError("x and y must be tensors (inputs and targets, examples first)")
    n = x.shape[0]
    if y.shape[0] != n or n == 0:
        raise UsageError(f"x and y must hold the same positive number of examples; got "
                         f"{n} inputs and {y.shape[0]} targets")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UsageError(f"steps must be a non-negative integer, not {steps!r}")
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    most = math.inf if sampler == "replacement" else n
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or not 1 <= batch_size <= most):
        raise UsageError(f"batch_size must be None (full batch) or an integer in [1, {most}] "
                         f"(sampler {sampler!r}), not {batch_size!r}")
    if on_nonfinite not in ("raise", "stop"):
        raise UsageError(f"on_nonfinite must be 'raise' or 'stop', not {on_nonfinite!r}")
    evals = {int(s) for s in eval_at}
    if any(s < 0 or s > steps for s in evals):
        raise UsageError(f"eval_at must hold steps in [0, {steps}]")
    loss_fn = _resolve_loss(loss)
    scheduler = _resolve_schedule(schedule, optimizer)
    cbs = _check_callbacks(callbacks)
    if generator is None and batch_size is not None:
        generator = torch.Generator().manual_seed(0)

    state = FitState(model=model, optimizer=optimizer, x=x, y=y, steps=steps)
    history = History()
    full = torch.arange(n, device=x.device)
    bar, own_bar = _progress(progress, steps)

    def call(hook: str) -> None:
        for cb in cbs:
            method = getattr(cb, hook, None)
            if callable(method):
                method(state)

    def measure() -> None:
        row: dict[str, Any] = {"step": state.step, "loss": state.loss}
        with eval_mode(model):
            if evaluate is not None:
                with torch.no_grad():
                    row.update(evaluate(model))
            for cb in cbs:
                method = getattr(cb, "measure", None)
                if not callable(method):
                    continue
                got = method(state)
                if isinstance(got, Mapping):
                    row.update(got)
                elif got is not None:
                    table = history.tables.setdefault(_callback_name(cb), [])
                    table.extend({"step": state.step, **r} for r in got)
        history.rows.append(row)

    try:
        call("on_fit_start")
        if 0 in evals:
            measure()
        for step, idx in enumerate(_batches(n, steps, batch_size, sampler, generator,
                                            x.device), start=1):
            optimizer.zero_grad(set_to_none=True)
            xb, yb = (x, y) if idx is None else (x[idx], y[idx])
            value = loss_fn(model(xb), yb)
            if not isinstance(value, Tensor) or value.dim() != 0:
                raise UsageError(f"the loss must return a scalar tensor, got "
                                 f"{getattr(value, 'shape', type(value).__name__)}; reduce it "
                                 "(e.g. .mean())")
            if not torch.isfinite(value.detach()).all():
                bad = float(value.detach())
                if on_nonfinite == "raise":
                    raise DivergedError(
                        f"the training loss is {bad} at step {step}: training diverged; lower "
                        "the learning rate, add warmup or gradient clipping")
                history.diverged_at, history.diverged_loss = step, bad
                break
            value.backward()
            state.step, state.batch, state.loss = step, (full if idx is None else idx), float(
                value.detach())
            call("before_update")
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            call("after_update")
            if step in evals and not all(bool(torch.isfinite(p).all())
                                         for p in model.parameters()):
                # the loss before this update was finite, the update was not: say so here
                # rather than let the measurements fail on non-finite weights
                if on_nonfinite == "raise":
                    raise DivergedError(
                        f"the parameters are not finite after the update of step {step} (its "
                        "loss was finite): training diverged; lower the learning rate, add "
                        "warmup or gradient clipping")
                history.diverged_at, history.diverged_loss = step, math.nan
                history.steps_done = step
                break
            history.steps_done = step
            bar.update()
            if step in evals:
                measure()
        call("on_fit_end")
    finally:
        if own_bar:
            bar.close()
    return history
