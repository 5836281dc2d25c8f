"""The telescoping model of a network in training (Jeffares, Curth & van der Schaar, NeurIPS 2024).

A trained network is its initial function plus the change made by every optimizer step. Telescoping
that sum and replacing each step's change by its first-order Taylor expansion around the
parameters *before* the step gives the telescoping model (the paper's Eq. 5)

    f~_T(x) = f_0(x) + sum_{t=1}^{T} grad_theta f_{theta_{t-1}}(x)^T (theta_t - theta_{t-1}),

with ``f_t = f(.; theta_t)``. The error of each term is second order in the step,
``O(||theta_t - theta_{t-1}||^2)``, so for small learning rates ``f~_T`` tracks the real network
closely through the whole of training. It is far more accurate than the model linearized around
the initialization (the lazy / neural-tangent-kernel regime),

    f_lin(x) = f_0(x) + grad_theta f_{theta_0}(x)^T (theta_T - theta_0),

whose error is second order in the *total* distance travelled, ``O(||theta_T - theta_0||^2)``.
The paper's Figures 2, 7 and 8 compare both against the actual network; :class:`Telescope`
records the same comparison for any model and optimizer.

(The module is one class of about 600 lines, a third of them the docstrings with the recursion,
its memory and its cost per step; its hooks, state and readers are one recursion and stay
together.)

Reference
---------
A. Jeffares, A. Curth, M. van der Schaar (2024), "Deep Learning Through A Telescoping Lens: A
Simple Model Provides Empirical Insights On Grokking, Gradient Boosting & Beyond", NeurIPS 2024.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from telescope.errors import DivergedError, UnsupportedModelError, UsageError
from telescope.kernels.functional import (
    ParamSpec,
    ad_safe_backends,
    batched_fn,
    check_model,
    check_parameters,
    eval_mode,
    frozen_state,
    unwrap_output,
)
from telescope.lens._tracked import (
    followed_parameters,
    optimizer_param_ids,
    parameter_changes,
)

__all__ = ["Telescope", "NonFiniteStepError"]


class NonFiniteStepError(DivergedError, ValueError):
    """An optimizer step produced NaN or infinite parameters (training diverged)."""


class Telescope:
    r"""The telescoping model of a network, recorded through training by observing its optimizer.

    For every probe set ``x`` it maintains the telescoping model (paper, Eq. 5)

    .. math::

        \tilde f_T(x) = f_0(x) + \sum_{t=1}^{T} \nabla_\theta f_{\theta_{t-1}}(x)^\top
                        (\theta_t - \theta_{t-1}),

    a sum of first-order updates, each taken around the parameters *before* its step, and offers
    the model linearized around the initialization,
    :math:`f_{lin}(x) = f_0(x) + \nabla_\theta f_{\theta_0}(x)^\top (\theta_T - \theta_0)`, and
    the actual network :math:`f_T(x)` for comparison.

    How: a step pre-hook on the optimizer keeps :math:`\theta_{t-1}`; a step post-hook forms
    :math:`\delta_t = \theta_t - \theta_{t-1}` and evaluates one forward-mode Jacobian-vector
    product ``torch.func.jvp`` of the functional model at :math:`\theta_{t-1}` with tangent
    :math:`\delta_t` per probe set. Its tangent output is the increment
    :math:`\nabla_\theta f_{\theta_{t-1}}(x)^\top \delta_t`; its primal output is
    :math:`f_{t-1}(x)`, the actual network before the step, which the history reuses for free.
    Because the Telescope only *observes* the step, it works unchanged for every
    ``torch.optim.Optimizer`` (SGD with momentum, nesterov or weight decay, Adam, AdamW, learning
    rate schedules, gradient clipping, custom optimizers): whatever rule produced
    :math:`\theta_t`, the telescoping model follows the parameters it actually took.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module`` mapping a batch ``[N, ...]`` to ``[N]`` or ``[N, ...]``. Its
        trainable parameters (``requires_grad=True``, in ``named_parameters`` order) are
        :math:`\theta`. The Telescope never modifies them, never touches ``.grad`` and restores
        the model's train/eval mode after each evaluation.
    optimizer:
        The ``torch.optim.Optimizer`` training the model. Every trainable parameter of the model
        must be in its ``param_groups``, and it may hold no parameter that is not the model's
        (frozen parameters of the model may be there: they receive no gradient, so no
        optimizer moves them).
    probes:
        ``{name: inputs}``: the points the telescoping model is tracked on, e.g.
        ``{"train": x_train, "test": x_test}``. Inputs of any type the model takes (integer
        tokens included); they are moved to the model's device.
    every:
        Record a :attr:`history` row every ``every`` steps (the telescoping model itself is
        updated at every step, as it must be).
    track_linearized:
        Also record the error of the linearized model in :attr:`history` (one more JVP per probe
        set on recorded steps). :meth:`linearized` works either way.
    params:
        Follow a subset of the trainable parameters (names, glob patterns or a predicate, as
        in :func:`telescope.ntk`): the parameters that are trained, e.g. ``"*lora*"`` when
        only LoRA adapters are fine-tuned. The optimizer must hold all of them and no other
        trainable parameter; the others must not change. ``None``: every trainable parameter.
    chunk_size:
        Evaluate probe sets in chunks of at most this many inputs (bounds the memory of the JVP);
        ``None`` evaluates each probe set at once.

    Notes
    -----
    - Probes are evaluated with the model in **eval mode**: dropout is off and BatchNorm uses
      its running statistics. Buffers (such as running statistics) are read as they are at
      evaluation time: their changes are not parameter changes and are not part of the
      telescoping model, so for a network whose buffers change during training the telescoping
      model tracks the parameters' contribution only.
    - Only changes made by ``optimizer.step()`` are telescoped. If the parameters are changed
      between steps by other code (a projection, loading weights), a warning is issued once and
      the change is not part of the telescoping model.
    - Memory is independent of the number of steps: three copies of the trainable parameters
      (:math:`\theta_0`, :math:`\theta_{t-1}` and a reused buffer for the step) and, per probe
      set, :math:`f_0(x)` and the running sum (kept in float64 for float32 and lower-precision
      models, so 5000 steps of round-off do not swamp the second-order error being measured).
      Only :attr:`history` grows, by one small dict per probe set per recorded step.
    - Cost per step: one JVP per probe set (roughly two to three forward passes). On recorded
      steps with ``track_linearized``, one more JVP per probe set at :math:`\theta_0`. The actual
      network at step ``t`` comes from the primal output of step ``t + 1``'s JVP; reading
      :attr:`history` before that costs one forward pass for the newest row.

    Examples
    --------
    >>> with Telescope(model, optimizer, {"train": x, "test": x_test}) as tel:  # doctest: +SKIP
    ...     for step in range(1000):
    ...         optimizer.zero_grad()
    ...         loss_fn(model(x), y).backward()
    ...         optimizer.step()
    >>> tel.history[-1]  # doctest: +SKIP
    {'step': 1000, 'probe': 'test', 'telescoping_mae': ..., 'linearized_mae': ...,
     'output_scale': ...}

    References
    ----------
    Jeffares, Curth & van der Schaar (2024), "Deep Learning Through A Telescoping Lens: A Simple
    Model Provides Empirical Insights On Grokking, Gradient Boosting & Beyond", NeurIPS 2024,
    Eq. (5) and Figures 2, 7, 8.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        probes: dict[str, Tensor],
        *,
        every: int = 1,
        track_linearized: bool = True,
        chunk_size: int | None = None,
        params: ParamSpec = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UsageError(f"every must be a positive integer, got {every!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool)
                                       or not isinstance(chunk_size, int) or chunk_size < 1):
            raise UsageError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        with eval_mode(model):
            check_model(model)
        check_parameters(model)

        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.track_linearized = bool(track_linearized)
        self.chunk_size = chunk_size

        self._spec = params
        named = followed_parameters(model, params)
        self._check_optimizer(named, optimizer, model)
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._opt_ids = optimizer_param_ids(optimizer)
        with torch.no_grad():
            self._theta0 = [p.detach().clone() for p in self._params]
            self._prev = [p.detach().clone() for p in self._params]  # theta_{t-1}
            self._delta = [torch.empty_like(p) for p in self._params]  # reused step buffer
        device = self._params[0].device

        self._x: dict[str, Tensor] = self._check_probes(probes, device)
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self._f0: dict[str, Tensor] = {}  # [N, O], the model's output dtype
        self._sum: dict[str, Tensor] = {}  # [N, O], the telescoping model (accumulation dtype)
        with self._evaluating():
            for name, x in self._x.items():
                out = self._forward_raw(name, x, self._theta0)
                self._shape[name] = tuple(out.shape)
                self._dtype[name] = out.dtype
                f0 = out.reshape(out.shape[0], -1)
                self._f0[name] = f0
                self._sum[name] = f0.to(_accumulation_dtype(out.dtype, out.device)).clone()
        self._groups = self._group_probes()

        self._step = 0
        self._pending: int | None = None  # a recorded step whose history row awaits f_t(x)
        self._history: list[dict[str, Any]] = []
        self._warned_external = False
        self._in_step = False
        self._closed = False
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]

    # ------------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _check_optimizer(named: list[tuple[str, Tensor]], optimizer: torch.optim.Optimizer,
                         model: nn.Module) -> None:
        if not named:
            raise UnsupportedModelError(
                "the model has no trainable parameters (requires_grad=True): nothing to telescope")
        in_opt: dict[int, int] = {}
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                in_opt.setdefault(id(p), gi)
        missing = [n for n, p in named if id(p) not in in_opt]
        if missing:
            listed = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise UsageError(
                f"{len(missing)} trainable parameter(s) of the model are not in the optimizer's "
                f"param_groups, so its steps would not move them: {listed}. Pass "
                "all of model.parameters() to the optimizer, or set requires_grad=False on the "
                "parameters you mean to freeze.")
        followed = {id(p) for _, p in named}
        left_out = [n for n, p in model.named_parameters()
                    if p.requires_grad and id(p) not in followed and id(p) in in_opt]
        if left_out:
            listed = ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else "")
            raise UsageError(
                f"the optimizer also trains {len(left_out)} parameter(s) that params= leaves "
                f"out ({listed}): the telescoping model would miss their changes. Select every "
                "parameter the optimizer trains, or build the optimizer from the selected ones")
        model_ids = {id(p) for p in model.parameters()}
        extra = [(gi, tuple(p.shape)) for gi, group in enumerate(optimizer.param_groups)
                 for p in group["params"] if id(p) not in model_ids]
        if extra:
            listed = ", ".join(f"group {gi} shape {list(s)}" for gi, s in extra[:5])
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            raise UsageError(
                f"the optimizer holds {len(extra)} parameter(s) that are not parameters of the "
                f"model ({listed}{more}): the telescoping model would miss their changes. Build "
                "the optimizer from this model's parameters.")

    @staticmethod
    def _check_probes(probes: Any, device: torch.device) -> dict[str, Tensor]:
        if not isinstance(probes, Mapping):
            raise UsageError(
                "probes must be a dict mapping names to input tensors, e.g. "
                f"{{'train': x_train, 'test': x_test}}, got {type(probes).__name__}")
        if not probes:
            raise UsageError("probes is empty: give at least one probe set, e.g. {'test': x}")
        checked: dict[str, Tensor] = {}
        for name, x in probes.items():
            if not isinstance(name, str):
                raise UsageError(f"probe names must be strings, got {name!r}")
            if not isinstance(x, Tensor):
                raise UsageError(
                    f"probe {name!r} must be a torch.Tensor of inputs [N, ...], got "
                    f"{type(x).__name__}")
            if x.ndim == 0 or x.shape[0] == 0:
                raise UsageError(
                    f"probe {name!r} must have shape [N, ...] with N >= 1, got {tuple(x.shape)}")
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise UsageError(f"probe {name!r} contains NaN or infinite values")
            checked[name] = x.detach().to(device)
        return checked

    def _group_probes(self) -> list[tuple[list[str], Tensor]]:
        """Probe sets with the same per-example input shape and dtype are concatenated once and
        evaluated by one JVP per step (fewer, larger kernels); each probe's inputs become a view
        of its group's tensor, so the inputs are stored once."""
        by_key: dict[tuple, list[str]] = {}
        for name, x in self._x.items():
            by_key.setdefault((tuple(x.shape[1:]), x.dtype), []).append(name)
        groups = []
        for names in by_key.values():
            if len(names) == 1:
                groups.append((names, self._x[names[0]]))
                continue
            x_cat = torch.cat([self._x[n] for n in names])
            start = 0
            for n in names:
                size = self._x[n].shape[0]
                self._x[n] = x_cat[start:start + size]
                start += size
            groups.append((names, x_cat))
        return groups

    # ------------------------------------------------------------------------------------------
    # evaluating the functional model
    # ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """No autograd graph, eval mode (restored after), SDPA math backend for forward-mode AD."""
        with torch.no_grad(), eval_mode(self.model), ad_safe_backends(self.model):
            yield

    def _as_dict(self, tensors: list[Tensor]) -> dict[str, Tensor]:
        return dict(zip(self._names, tensors, strict=True))

    def _chunks(self, x: Tensor) -> Iterator[Tensor]:
        size = self.chunk_size or x.shape[0]
        for start in range(0, x.shape[0], size):
            yield x[start:start + size]

    def _forward_raw(self, name: str, x: Tensor, theta: list[Tensor]) -> Tensor:
        """The model's output on probe ``name`` at parameters ``theta``, in the model's shape."""
        params = {**frozen_state(self.model), **self._as_dict(theta)}
        outs = []
        for xc in self._chunks(x):
            try:
                out = unwrap_output(functional_call(self.model, params, (xc,), strict=False))
            except (RuntimeError, TypeError, ValueError, IndexError) as err:
                raise UsageError(
                    f"the model failed on probe {name!r} (inputs {tuple(x.shape)}, "
                    f"{x.dtype}): {err}") from err
            if not isinstance(out, Tensor):
                raise UsageError(f"the model must return a Tensor, got {type(out).__name__}")
            if out.ndim == 0 or out.shape[0] != xc.shape[0]:
                raise UsageError(
                    f"probe {name!r}: the model returned shape {tuple(out.shape)} for a batch of "
                    f"{xc.shape[0]} inputs; expected [N] or [N, ...] with N the number of inputs")
            if not out.is_floating_point():
                raise UsageError(f"the model output must be floating point, got {out.dtype}")
            outs.append(out)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _forward(self, name: str, theta: list[Tensor]) -> Tensor:
        """``f(x; theta)`` on probe ``name``, shaped ``[N, O]``."""
        out = self._forward_raw(name, self._x[name], theta)
        return out.reshape(out.shape[0], -1)

    def _jvp(self, theta: list[Tensor], tangent: list[Tensor], names: list[str] | None = None
             ) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (f(x; theta), J_theta(x) tangent)}`` by forward-mode AD, each ``[N, O]``, for
        the probe sets ``names`` (default: all): one JVP per group of probe sets (per chunk).

        Must run inside :meth:`_evaluating`.
        """
        f = batched_fn(self.model, frozen_state(self.model))
        primal, tan = self._as_dict(theta), self._as_dict(tangent)
        result: dict[str, tuple[Tensor, Tensor]] = {}
        for group, x in self._groups:
            if names is not None and not any(n in names for n in group):
                continue
            outs, douts = [], []
            for xc in self._chunks(x):
                # torch.func.jvp's return type is a union of the 2- and 3-tuple, not overloaded
                out, dout = jvp(lambda th, xc=xc: f(th, xc), (primal,), (tan,))  # type: ignore[misc]
                outs.append(out)
                douts.append(dout)
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
            dout = torch.cat(douts) if len(douts) > 1 else douts[0]
            for n, o, d in zip(group, out.split([self._x[n].shape[0] for n in group]),
                               dout.split([self._x[n].shape[0] for n in group]), strict=True):
                result[n] = (o, d)
        return result

    def _linearized(self, tangent: list[Tensor], names: list[str] | None = None
                    ) -> dict[str, Tensor]:
        """``{name: f_0(x) + J_0(x) tangent}`` in the accumulation dtype, where
        ``tangent = theta - theta_0`` (one JVP at theta_0 per group of probe sets)."""
        lin = {}
        for name, (_, dout) in self._jvp(self._theta0, tangent, names).items():
            acc = self._sum[name].dtype
            lin[name] = self._f0[name].to(acc) + dout.to(acc)
        return lin

    # ------------------------------------------------------------------------------------------
    # the optimizer hooks
    # ------------------------------------------------------------------------------------------

    def _check_structure(self) -> None:
        """Refuse to go on when the trained parameters are no longer the ones the telescoping
        model follows (a replaced layer, ``add_param_group``, ``requires_grad`` toggled): its
        sums and ``actual`` would silently describe another network."""
        detail = parameter_changes(self.model, self._spec, self._names, self._params,
                                   self.optimizer, self._opt_ids)
        if detail is not None:
            raise UsageError(
                f"Telescope: the model's trainable parameters or the optimizer's param groups "
                f"changed after step {self._step}{f' ({detail})' if detail else ''}; the "
                "telescoping model follows the parameters it was created with only. Create a "
                "new Telescope (and optimizer) after changing the model")

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """Before the step: make sure ``self._prev`` holds theta_{t-1} (the current parameters)."""
        self._check_structure()
        with torch.no_grad():
            changed = [n for n, p, q in zip(self._names, self._params, self._prev, strict=True)
                       if not torch.equal(p, q)]
            if changed:
                if not self._warned_external:
                    self._warned_external = True
                    warnings.warn(
                        f"Telescope: parameters changed outside optimizer.step() before step "
                        f"{self._step + 1} ({', '.join(changed[:5])}"
                        f"{', ...' if len(changed) > 5 else ''}); the telescoping model only "
                        "includes the changes made by optimizer steps (warned once)",
                        RuntimeWarning, stacklevel=3)
                for p, q in zip(self._params, self._prev, strict=True):
                    q.copy_(p)
        self._in_step = True

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """After the step: add ``J_{t-1}(x) (theta_t - theta_{t-1})`` to every probe set."""
        if not self._in_step:  # pragma: no cover - a post hook always follows a pre hook
            return
        self._in_step = False
        t = self._step + 1
        with torch.no_grad():
            for d, p, q in zip(self._delta, self._params, self._prev, strict=True):
                torch.sub(p, q, out=d)
            finite = torch.stack([torch.isfinite(p).all() for p in self._params])
            if not bool(finite.all()):
                bad = [n for n, ok in zip(self._names, finite.tolist(), strict=True) if not ok]
                raise NonFiniteStepError(
                    f"Telescope: optimizer step {t} produced NaN or infinite parameters "
                    f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): training "
                    "diverged (lower the learning rate?); the telescoping model stops here")

        row_step, self._pending = self._pending, None
        rows = []
        with self._evaluating():
            # f_{t-1}(x) and the increment J_{t-1}(x) delta_t, for every probe set
            evaluated = self._jvp(self._prev, self._delta)
            for name in self._x:  # the probes' order, as in every history row
                f_prev, inc = evaluated[name]
                if row_step is not None:  # the row of step t-1 needs f_{t-1}(x): this primal
                    rows.append(self._row(row_step, name, f_prev, None))
                self._sum[name] += inc.to(self._sum[name].dtype)
            if row_step is not None and self.track_linearized:
                # theta_{t-1} - theta_0 into the step buffer (free now that the JVPs are done)
                for d, q, p0 in zip(self._delta, self._prev, self._theta0, strict=True):
                    torch.sub(q, p0, out=d)
                lin = self._linearized(self._delta)
                for row in rows:
                    name = row["probe"]
                    row["linearized_mae"] = _mae(lin[name], evaluated[name][0])
            for p, q in zip(self._params, self._prev, strict=True):
                q.copy_(p)  # theta_t: the next step's theta_{t-1}
        self._history.extend(rows)
        self._step = t
        if t % self.every == 0:
            self._pending = t

    def _row(self, step: int, name: str, actual: Tensor, linearized: Tensor | None
             ) -> dict[str, Any]:
        """A history row: errors of the telescoping model (its value *before* the current
        increment is added, i.e. at ``step``) against ``actual = f_step(x)``."""
        row: dict[str, Any] = {"step": step, "probe": name,
                               "telescoping_mae": _mae(self._sum[name], actual)}
        if self.track_linearized:
            row["linearized_mae"] = None if linearized is None else _mae(linearized, actual)
        row["output_scale"] = float(actual.double().abs().mean())
        return row

    def _flush(self) -> None:
        """Complete the newest recorded row with a forward pass at the current parameters."""
        if self._pending is None or self._in_step:
            return
        step, self._pending = self._pending, None
        current = [p.detach() for p in self._params]
        rows = []
        with self._evaluating():
            lin: dict[str, Tensor] = {}
            if self.track_linearized:
                lin = self._linearized([p - p0 for p, p0 in zip(current, self._theta0,
                                                                strict=True)])
            for name in self._x:
                rows.append(self._row(step, name, self._forward(name, current), lin.get(name)))
        self._history.extend(rows)

    # ------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Number of optimizer steps observed so far."""
        return self._step

    @property
    def probes(self) -> tuple[str, ...]:
        """Names of the probe sets."""
        return tuple(self._x)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has removed the hooks."""
        return self._closed

    @property
    def history(self) -> list[dict[str, Any]]:
        """Tidy rows, one per probe set every ``every`` steps (the paper's Figures 2, 7, 8).

        ``{"step": t, "probe": name, "telescoping_mae": ..., "linearized_mae": ...,
        "output_scale": ...}`` with ``MAE = mean |g(x) - f_t(x)|`` over the probe points and
        outputs of the telescoping model ``g = f~_t`` and of the linearized model
        ``g = f_lin`` (present when ``track_linearized``), against the actual network ``f_t``;
        ``output_scale = mean |f_t(x)|`` puts the errors in scale. Rows are in step order.
        """
        self._flush()
        return self._history

    def history_frame(self):  # -> pandas.DataFrame
        """:attr:`history` as a ``pandas.DataFrame`` (requires pandas)."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - pandas is installed in development
            raise ImportError(
                "Telescope.history_frame() needs pandas (pip install pandas); "
                "Telescope.history holds the same rows as a list of dicts") from err
        return pd.DataFrame(self.history)

    def measure(self, state) -> dict[str, Any] | None:
        """The :func:`telescope.train.fit` callback (the Telescope follows the optimizer by
        itself; this only reads): at a recorded step (a multiple of ``every``), the
        :attr:`history` rows of that step as columns ``"<column>_<probe>"``
        (``telescoping_mae_test``, ``linearized_mae_test``, ``output_scale_test``); else
        ``None``. Reading a row at its own step costs one forward pass per probe set (it is
        otherwise completed from the next step's JVP, whose primal output is the same network
        value up to round-off)."""
        rows: list[dict[str, Any]] = []
        for r in reversed(self.history):   # newest first: stop at the steps before this one
            if r["step"] < state.step:
                break
            if r["step"] == state.step:
                rows.insert(0, r)
        if not rows:
            return None
        return {f"{key}_{r['probe']}": value for r in rows for key, value in r.items()
                if key not in ("step", "probe")}

    def _name(self, name: str) -> str:
        if name not in self._x:
            raise KeyError(f"unknown probe {name!r}; the probe sets are {list(self._x)}")
        return name

    def _shaped(self, name: str, flat: Tensor) -> Tensor:
        return flat.to(self._dtype[name]).reshape(self._shape[name])

    def telescoping(self, name: str) -> Tensor:
        r"""The telescoping model :math:`\tilde f_T(x)` on probe set ``name`` after the steps so
        far (the model's output shape and dtype)."""
        return self._shaped(self._name(name), self._sum[name].clone())

    def linearized(self, name: str) -> Tensor:
        r"""The model linearized around the initialization,
        :math:`f_0(x) + \nabla_\theta f_{\theta_0}(x)^\top (\theta_T - \theta_0)`, at the current
        parameters (one JVP, computed on demand)."""
        self._name(name)
        self._check_structure()
        with self._evaluating():
            tangent = [p.detach() - p0 for p, p0 in zip(self._params, self._theta0, strict=True)]
            return self._shaped(name, self._linearized(tangent, [name])[name])

    def actual(self, name: str) -> Tensor:
        """The actual network :math:`f_T(x)` on probe set ``name`` (a forward pass in eval
        mode at the current parameters)."""
        self._name(name)
        self._check_structure()
        with self._evaluating():
            return self._shaped(name, self._forward(name, [p.detach() for p in self._params]))

    def initial(self, name: str) -> Tensor:
        """The network at construction, :math:`f_0(x)`, on probe set ``name``."""
        return self._shaped(self._name(name), self._f0[name].clone())

    def close(self) -> None:
        """Complete the history and remove the optimizer hooks (idempotent). The results stay
        readable; later steps are not observed."""
        if self._closed:
            return
        self._flush()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._closed = True

    def __enter__(self) -> Telescope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {x.shape[0]}" for n, x in self._x.items())
        state = "closed" if self._closed else "open"
        return (f"Telescope(step={self._step}, probes={{{sizes}}}, every={self.every}, "
                f"params={sum(p.numel() for p in self._params):,}, {state})")


def _accumulation_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float64, except on devices without it (MPS)."""
    return dtype if device.type == "mps" else torch.float64


def _mae(approx: Tensor, actual: Tensor) -> float:
    return float((approx.to(torch.float64) - actual.to(torch.float64)).abs().mean())
