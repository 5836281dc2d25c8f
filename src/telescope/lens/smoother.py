"""The trained network as a smoother, and its effective parameters.

Jeffares, Curth & van der Schaar (NeurIPS 2024, "Deep Learning Through A Telescoping Lens") write
the telescoping model of a network trained on the squared loss as a linear smoother of the
training labels,

    f~_t(x) = S_t(x) vec(Y) + c_t(x),

where ``S_t(x)`` (``[O, n O]``) are the *smoother weights* of ``x`` on the ``n`` training labels
and ``c_t(x)`` is an offset that does not depend on the labels. Every optimizer step adds its
first-order functional update ``grad f_{t-1}(x)^T (theta_t - theta_{t-1})``; the gradient of the
loss involves the network's outputs on the batch, which are replaced by their telescoping
approximations ``f~_{t-1}(x_i) = S_{t-1}(x_i) vec(Y) + c_{t-1}(x_i)``, so the recursion stays
linear in ``Y``. From the weights come the *effective parameters* of a set of points ``I``,

    p(I) = n / (|I| O) * sum_{j in I} ||S(x_j)||_F^2,

(the paper's ``p = n/|I| sum ||s(x_j)||^2``, divided by ``O`` so that ``O`` identical copies of a
model count as one) and the kernel weight norms ``||S(x)||_F``.

Two exact recursions, chosen from the optimizer that is really used (``mode="auto"``):

**Function space** (``torch.optim.SGD`` with the same hyperparameters in every group). With the
loss ``L = mean_{i in B, o} (f_o(x_i) - y_io)^2`` (``F.mse_loss``, mean reduction), the step's
functional gradient at a tracked point ``x`` is

    g_t(x) = 2/(|B| O) sum_{i in B} K_t(x, x_i) (f~_{t-1}(x_i) - y_i) + lambda * w_t(x),

with ``K_t`` the empirical NTK (``[O, O]``) at ``theta_{t-1}``. PyTorch's weight decay adds
``lambda theta_{t-1}`` to the gradient, whose functional effect is ``J_x theta_{t-1}`` (``J_x``
the Jacobian at ``theta_{t-1}``). Writing ``theta_{t-1} = theta_0 + sum_k (theta_k -
theta_{k-1})`` and telescoping each increment with the Jacobian of its own step, as the telescoping
model does everywhere, gives

    w_t(x) = J_x theta_0 + f~_{t-1}(x) - f_0(x):

its label part is ``S_{t-1}(x)``, its offset part ``J_x theta_0 + c_{t-1}(x) - f_0(x)`` (one JVP
per step). (The paper prints the weight-decay recursion as if ``lambda theta`` were already a
function of ``x``; the line above is the derivation that type-checks. For a model that is linear
in its parameters ``J_x theta_0 = f_0(x)`` and the term is exactly ``lambda f~_{t-1}(x)``.)
Momentum is PyTorch's heavy ball *without* bias correction (unlike the paper's form):
``b_1 = g_1``, ``b_t = mu b_{t-1} + (1 - dampening) g_t``, update ``u_t = g_t + mu b_t``
(Nesterov) or ``b_t``; ``f~_t = f~_{t-1} - lr_t u_t``. The buffer is kept in function space,
``b_t(x) = S^b_t(x) vec(Y) + c^b_t(x)``, which is exact when the Jacobian is constant (models
linear in their parameters) and first order otherwise (older gradients act through the kernel of
their own step). The learning rate is read from ``param_groups`` at every step, so schedules work.

**Weight space** (Adam, AdamW, or SGD with per-group hyperparameters). The parameter increment is
kept as a linear function of the labels, ``theta_t - theta_0 = D_t [vec(Y); 1]`` (``[P, nO+1]``),
and PyTorch's exact update is applied column by column: the gradient ``J_B^T rho_t`` (+ L2
``lambda theta_{t-1}``), first moment ``m_t = b1 m_{t-1} + (1-b1) g_t``, AdamW's decoupled decay
``theta <- theta (1 - lr lambda)``, bias corrections, and the *observed* second moments
(``exp_avg_sq`` after the step, or ``max_exp_avg_sq`` with amsgrad) as a fixed diagonal
preconditioner ``1 / (sqrt(v_t / (1 - b2^t)) + eps)``. The functional update of a tracked point is
``J_x (D_t - D_{t-1})``. Exact for linear models; cost ``O(P (n + m) O^2 n)`` per step, so it is
meant for small models (the function-space path is the fast one).

**Cross-entropy** (``loss="cross_entropy"``, a first-order extension of ours; the paper stops at
the squared loss). The gradient of ``F.cross_entropy`` (mean reduction) with respect to the
logits is ``(p_i - y_i)/|B|`` with ``p_i`` the softmax of the *actual* network's logits. Treating
the observed probabilities as fixed along the trajectory (as Adam's second moments are treated),
the labels enter linearly with coefficient ``-1`` and ``p_i`` goes into the offset: ``S(x)`` then
says how much each one-hot training label pushed the logits of ``x``, and ``c(x)`` holds the
initial logits and the softmax pull. ``predict`` is the telescoping model of the logits; unlike
the squared loss, ``c`` depends on the labels through the observed ``p``.

(The module is one class of about 530 lines, a seventh of them this derivation; what the
smoother accepts at its door is in :mod:`telescope.lens._smoother_checks`.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from telescope.errors import DivergedError, UsageError
from telescope.kernels import smoothing
from telescope.kernels.functional import (
    ParamSpec,
    ad_safe_backends,
    check_batch_independence,
    check_input,
    check_parameters,
    eval_mode,
    flatten_output,
    forward_checked,
    frozen_state,
    ntk_to_subset,
    only_params,
    per_example_jacobian,
    select_params,
)
from telescope.lens._smoother_checks import (
    as_batch_indices,
    check_training_mode,
    check_uniform_groups,
    optimizer_rule,
    target_matrix,
    trained_param_names,
)
from telescope.lens._tracked import optimizer_param_ids, parameter_changes

TRAIN = "train"
LOSSES = ("mse", "cross_entropy")
MODES = ("auto", "function", "weight")


class Smoother:
    """Smoother weights ``S(x)``, offsets ``c(x)`` and effective parameters through training.

    Parameters
    ----------
    model, optimizer:
        The network and the ``torch.optim.SGD``, ``Adam`` or ``AdamW`` optimizer training it
        (freshly constructed: no state yet; a subclass is accepted when it keeps their
        ``step``). The update rule is read from every param group's options, so
        ``Adam(decoupled_weight_decay=True)`` is AdamW, per group; options the smoother does
        not reproduce (``differentiable=True``, tensor learning rates, options of a newer
        torch it does not know) and other optimizers raise
        :class:`~telescope.errors.UnsupportedOptimizerError`. Every trainable parameter of the
        model must be in the optimizer. The model must train in a deterministic, per-example
        way (no dropout or BatchNorm in train mode, no ops across the batch). Only the
        optimizer's steps may change the parameters: an in-place edit between steps, a
        replaced layer or ``add_param_group`` raise at the next step instead of letting the
        smoother drift from the network.
    x_train, y_train:
        The training set; ``y_train`` is ``[n]`` or ``[n, O]`` for the squared loss, integer
        classes ``[n]`` (or one-hot ``[n, O]``) for cross-entropy.
    probes:
        Further point sets to track (e.g. ``{"test": x_test}``). The name ``"train"`` is
        reserved for the training set.
    loss:
        ``"mse"``: ``F.mse_loss(model(x[batch]), y[batch])`` (mean reduction); or
        ``"cross_entropy"``: ``F.cross_entropy(model(x[batch]), y[batch])``.
    mode:
        ``"function"``, ``"weight"`` or ``"auto"`` (see the module docstring).
    every:
        Log effective parameters and kernel weight norms in ``.history`` every ``every`` steps.
    params:
        The trained subset of the parameters (names, glob patterns or a predicate, as in
        :func:`telescope.ntk`): kernels and Jacobians are of these; the optimizer must hold all
        of them and no other trainable parameter. ``None``: every trainable parameter.
    check_gradient:
        Verify at the first step that the gradient the optimizer sees is the gradient of the
        declared loss on the recorded batch (catches a wrong loss, reduction or batch).

    Usage: call ``smoother.record(batch_indices)`` just before each ``optimizer.step()``, or
    pass the smoother to :func:`telescope.train.fit` as a callback, which does that.
    Kernels and Jacobians are evaluated with the model in eval mode.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, x_train: Tensor,
                 y_train: Tensor, *, probes: dict[str, Tensor] | None = None,
                 loss: str = "mse", mode: str = "auto", every: int = 1,
                 check_gradient: bool = True, params: ParamSpec = None) -> None:
        if loss not in LOSSES:
            raise UsageError(f"loss must be one of {LOSSES}, got {loss!r}")
        if mode not in MODES:
            raise UsageError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UsageError(f"every must be a positive int, got {every!r}")
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_input("x_train", x_train)
        probes = dict(probes or {})
        if TRAIN in probes:
            raise UsageError('the probe name "train" is reserved for the training set')
        for name, x in probes.items():
            check_input(f"probe {name!r}", x)
            if x.shape[1:] != x_train.shape[1:] or x.dtype != x_train.dtype:
                raise UsageError(f"probe {name!r} has per-example shape {tuple(x.shape[1:])} "
                                 f"({x.dtype}), the training inputs {tuple(x_train.shape[1:])} "
                                 f"({x_train.dtype})")
        kind, self.mode = optimizer_rule(optimizer, mode)  # before anything reads its state
        check_training_mode(model)
        check_parameters(model)
        self.model, self.optimizer, self.loss, self.every = model, optimizer, loss, every
        self.check_gradient = check_gradient
        self._spec = params
        self._names = trained_param_names(model, optimizer, select_params(model, params))
        self.params = [dict(model.named_parameters())[n] for n in self._names]
        dtype = self.params[0].dtype
        device = self.params[0].device
        self.dtype = dtype
        self.x_train = x_train.to(device)
        n = self.x_train.shape[0]
        self.n = n
        with eval_mode(model), ad_safe_backends(model):
            # kernels and Jacobians are per example: the model must not couple its examples
            check_batch_independence(model, self.x_train, "x_train")
            f0_train = forward_checked(model, self.x_train, "x_train").to(dtype)
        self.n_out = o = f0_train.shape[1]
        self.y = target_matrix(y_train, n, o, loss).to(device=device, dtype=dtype)  # [n, O]
        self.sets = {TRAIN: self.x_train, **{k: v.to(device) for k, v in probes.items()}}
        self.kind = kind  # "sgd" or "adam" (Adam and AdamW)
        # A(x) = [S(x) | c(x)]: [m, O, nO + 1]; f~(x) = A(x) @ [vec(Y); 1]
        self.f0: dict[str, Tensor] = {}
        self.A: dict[str, Tensor] = {}
        for name, x in self.sets.items():
            if name == TRAIN:
                f0 = f0_train
            else:
                with eval_mode(model), ad_safe_backends(model):
                    f0 = forward_checked(model, x, f"probe {name!r}").to(dtype)
            self.f0[name] = f0
            a = torch.zeros(x.shape[0], o, n * o + 1, dtype=dtype, device=device)
            a[:, :, -1] = f0
            self.A[name] = a
        self._x_all = torch.cat(list(self.sets.values()))  # train first: batch rows = indices
        self._sizes = [x.shape[0] for x in self.sets.values()]
        self.theta0 = [p.detach().clone() for p in self.params]
        self._seen = [p.detach().clone() for p in self.params]  # after the last step
        self._opt_ids = optimizer_param_ids(optimizer)
        self._buffers: dict[str, Tensor] | None = None  # function-space momentum
        self._D: Tensor | None = None  # weight space: theta - theta0 = D [vecY; 1]
        self._m: Tensor | None = None  # weight space: Adam first moment / SGD momentum
        self._pending: dict | None = None
        self.step = 0
        self.history: list[dict] = []
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]
        self._log()

    # ---- public API ------------------------------------------------------------------------

    def record(self, batch_indices: Sequence[int] | Tensor) -> None:
        """Declare the training examples of the batch of the coming ``optimizer.step()``:
        integer indices into ``x_train`` (a 1-D tensor, list or array; repeats allowed), or a
        boolean mask of length ``n`` (its ``True`` positions)."""
        self._batch: Tensor | None = as_batch_indices(batch_indices, self.n).to(
            self.x_train.device)

    def weights(self, name: str = TRAIN) -> Tensor:
        """Smoother weights: ``[m, n]`` for a single output, else ``[m, O, n O]``
        (column ``j O + o'`` is the weight on label ``y_j[o']``)."""
        s = self._get(name)[:, :, :-1]
        return s[:, 0, :] if self.n_out == 1 else s

    def offset(self, name: str = TRAIN) -> Tensor:
        """Offsets ``c(x)``: ``[m]`` for a single output, else ``[m, O]``."""
        c = self._get(name)[:, :, -1]
        return c[:, 0] if self.n_out == 1 else c

    def predict(self, name: str = TRAIN) -> Tensor:
        """The smoother's prediction ``S(x) vec(Y) + c(x)`` (the telescoping model)."""
        a = self._get(name)
        f = a[:, :, :-1] @ self.y.reshape(-1) + a[:, :, -1]
        return f[:, 0] if self.n_out == 1 else f

    def kernel_weight_norms(self, name: str = TRAIN) -> Tensor:
        """``||S(x)||_F / sqrt(O)`` for every point of the set (``||s(x)||_2`` for O = 1), by
        :func:`telescope.kernels.smoothing.kernel_weight_norms`."""
        return smoothing.kernel_weight_norms(self._label_weights(name))

    def effective_parameters(self, name: str = TRAIN) -> float:
        """``p(I) = n / (|I| O) sum_{j in I} ||S(x_j)||_F^2`` (paper: ``n/|I| sum ||s||^2``), by
        :func:`telescope.kernels.smoothing.effective_parameters`."""
        return smoothing.effective_parameters(self._label_weights(name))

    def max_kernel_weight_norm(self, name: str, *, normalize: bool = True) -> float:
        """Largest kernel weight norm over the set, divided by the largest over the training
        set when ``normalize`` (how much more any one point of the set leans on single training
        labels than the training points themselves do)."""
        return smoothing.max_kernel_weight_norm(
            self._label_weights(name), self._label_weights(TRAIN) if normalize else None,
            normalize=normalize)

    # ---- as a telescope.train.fit callback -------------------------------------------------

    def before_update(self, state) -> None:
        """Record the step's batch (``state.batch``) before ``optimizer.step()``."""
        self.record(state.batch)

    def measure(self, state) -> dict[str, float]:
        """Effective parameters of the training set and of every probe set, as history
        columns ``"p_<name>"`` (``p_train``, ``p_test``, ...)."""
        return {f"p_{name}": self.effective_parameters(name) for name in self.A}

    def close(self) -> None:
        """Remove the optimizer hooks (the recorded state stays readable)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> Smoother:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- hooks -----------------------------------------------------------------------------

    def _pre_step(self, optimizer, args, kwargs) -> None:
        batch = getattr(self, "_batch", None)
        if batch is None:
            raise UsageError("Smoother: call smoother.record(batch_indices) before every "
                             "optimizer.step()")
        self._batch = None
        self._check_unchanged()
        if self.mode == "function":
            check_uniform_groups(optimizer)  # a schedule may have made the groups differ
        if self.check_gradient and self.step == 0:
            self._check_gradient(batch)
        resid = self._residual(batch)  # [|B|, O, nO+1]
        if self.mode == "function":
            self._pending = dict(batch=batch, resid=resid, **self._function_kernels(batch))
        else:
            self._pending = dict(batch=batch, resid=resid, **self._weight_jacobians(batch))

    def _post_step(self, optimizer, args, kwargs) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if self.mode == "function":
            self._function_update(pending)
        else:
            self._weight_update(pending)
        for seen, p in zip(self._seen, self.params, strict=True):
            seen.copy_(p.detach())
        self.step += 1
        for name, a in self.A.items():
            if not torch.isfinite(a).all():
                raise DivergedError(
                    f"Smoother: non-finite smoother weights for {name!r} at step {self.step} "
                    "(the training diverged: lower the learning rate)")
        if self.step % self.every == 0:
            self._log()

    # ---- shared pieces ---------------------------------------------------------------------

    def _check_unchanged(self) -> None:
        """Refuse to go on when anything but the optimizer's steps changed what is trained: the
        smoother would silently drift from the network."""
        detail = parameter_changes(self.model, self._spec, self._names, self.params,
                                   self.optimizer, self._opt_ids)
        if detail is not None:
            raise UsageError(
                f"Smoother: the model's trainable parameters or the optimizer's param groups "
                f"changed after step {self.step}{f' ({detail})' if detail else ''}; the "
                "smoother follows the parameters it started with only (a replaced layer, "
                "add_param_group, requires_grad toggled). Create a new Smoother (and optimizer) "
                "after changing the model")
        check_training_mode(self.model)
        changed = [n for n, p, q in zip(self._names, self.params, self._seen, strict=True)
                   if not torch.equal(p.detach(), q)]
        if changed:
            raise UsageError(
                f"Smoother: parameters changed outside optimizer.step() after step {self.step} "
                f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); the "
                "smoother is exact only for changes made by the optimizer's steps. Make such "
                "changes before creating the Smoother (telescope.Telescope tolerates them)")

    def _get(self, name: str) -> Tensor:
        if name not in self.A:
            raise KeyError(f"unknown point set {name!r}; known: {sorted(self.A)}")
        return self.A[name]

    def _label_weights(self, name: str) -> Tensor:
        """``S(x)`` as ``[m, O, n O]`` (the layout of :mod:`telescope.kernels.smoothing`)."""
        return self._get(name)[:, :, :-1]

    def _residual(self, batch: Tensor) -> Tensor:
        """The loss gradient w.r.t. the batch outputs, as a linear function of [vec(Y); 1]."""
        b, o = batch.numel(), self.n_out
        sel = torch.zeros(b, o, self.n * o + 1, dtype=self.dtype, device=batch.device)
        cols = (batch[:, None] * o + torch.arange(o, device=batch.device)[None, :])
        sel.scatter_(2, cols.unsqueeze(-1), 1.0)
        if self.loss == "mse":
            return (2.0 / (b * o)) * (self.A[TRAIN][batch] - sel)
        with torch.no_grad(), eval_mode(self.model):
            logits = flatten_output(self.model(self.x_train[batch]), b).to(self.dtype)
        resid = -sel
        resid[:, :, -1] = logits.softmax(dim=1)
        return resid / b

    def _check_gradient(self, batch: Tensor) -> None:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise RuntimeError("Smoother: optimizer.step() was called without gradients "
                               "(call loss.backward() first)")
        params = dict(zip(self._names, (p.detach() for p in self.params), strict=True))
        frozen = frozen_state(self.model)
        x, y = self.x_train[batch], self.y[batch]

        def loss_fn(p):
            out = flatten_output(functional_call(self.model, {**frozen, **p}, (x,)), len(batch))
            if self.loss == "mse":
                return torch.nn.functional.mse_loss(out, y)
            return torch.nn.functional.cross_entropy(out, y)

        # detached: parameters outside params= stay requires_grad and may be recorded
        expected = {k: v.detach() for k, v in torch.func.grad(loss_fn)(params).items()}
        num = sum(float((g - expected[n]).norm()) ** 2
                  for n, g in zip(self._names, grads, strict=True)) ** 0.5
        den = sum(float(e.norm()) ** 2 for e in expected.values()) ** 0.5
        if num > 1e-4 * den + 1e-12:
            raise UsageError(
                f"Smoother: the gradient in .grad differs from the gradient of "
                f"F.{'mse_loss' if self.loss == 'mse' else 'cross_entropy'}(model(x[batch]), "
                f"y[batch]) (mean reduction) on the recorded batch (relative difference "
                f"{num / max(den, 1e-30):.2e}). Compute the loss exactly so, on the batch passed "
                "to record(), with the same targets (or pass check_gradient=False).")

    def _log(self) -> None:
        for name in self.A:
            w = self.kernel_weight_norms(name)
            self.history.append({
                "step": self.step, "probe": name,
                "effective_parameters": self.effective_parameters(name),
                "mean_kernel_weight_norm": float(w.mean()),
                "max_kernel_weight_norm": float(w.max()),
            })

    # ---- function space (SGD) --------------------------------------------------------------

    def _function_kernels(self, batch: Tensor) -> dict:
        """``K_t(x, x_i)`` ``[m, |B|, O, O]`` for every set, from one structured pass over all
        tracked points (the batch's factors are rows of the training set's); with weight decay
        also ``J_x theta_0`` from the same pass."""
        decay = self.optimizer.param_groups[0]["weight_decay"] != 0
        tangent = dict(zip(self._names, self.theta0, strict=True)) if decay else None
        with eval_mode(self.model), ad_safe_backends(self.model), \
                only_params(self.model, self._names):
            res = ntk_to_subset(self.model, self._x_all, batch, output="full", tangent=tangent)
        k, jt0 = res if isinstance(res, tuple) else (res, None)  # a tuple with the tangent
        out = {"kernels": dict(zip(self.sets, k.to(self.dtype).split(self._sizes), strict=True))}
        if jt0 is not None:
            out["jt0"] = dict(zip(self.sets, jt0.to(self.dtype).split(self._sizes), strict=True))
        return out

    def _function_update(self, pending: dict) -> None:
        g = self.optimizer.param_groups[0]
        lr, mu, damp = g["lr"], g["momentum"], g["dampening"]
        wd, nesterov = g["weight_decay"], g["nesterov"]
        sign = -1.0 if g.get("maximize", False) else 1.0
        resid = pending["resid"]
        grads = {}
        for name, k in pending["kernels"].items():
            # sum_i K(x, x_i) rho_i : [m, O, nO+1], as one matmul
            m, b, o = k.shape[:3]
            kk = k.permute(0, 2, 1, 3).reshape(m * o, b * o)
            grad = (kk @ resid.reshape(b * o, -1)).view(m, o, -1)
            if sign < 0:
                grad = -grad
            if wd != 0:
                w = self.A[name].clone()
                w[:, :, -1] += pending["jt0"][name] - self.f0[name]
                grad = grad + wd * w
            grads[name] = grad
        if mu != 0:
            if self._buffers is None:
                self._buffers = {k: v.clone() for k, v in grads.items()}
            else:
                for k, v in grads.items():
                    self._buffers[k].mul_(mu).add_(v, alpha=1 - damp)
            upd = ({k: grads[k] + mu * self._buffers[k] for k in grads} if nesterov
                   else self._buffers)
        else:
            upd = grads
        for name in self.A:
            self.A[name].add_(upd[name], alpha=-lr)

    # ---- weight space (Adam, AdamW, general SGD) -------------------------------------------

    def _weight_jacobians(self, batch: Tensor) -> dict:
        params = dict(zip(self._names, (p.detach() for p in self.params), strict=True))
        frozen = frozen_state(self.model)

        def f_single(p, x):
            return flatten_output(functional_call(self.model, {**frozen, **p}, (x[None],)), 1)[0]

        with eval_mode(self.model), ad_safe_backends(self.model):
            jac = {name: per_example_jacobian(f_single, params, x,
                                                      owner=self.model).to(self.dtype)
                   for name, x in self.sets.items()}  # [m, O, P]
        return {"jac": jac}

    def _weight_update(self, pending: dict) -> None:
        jac, resid = pending["jac"], pending["resid"]
        jb = jac[TRAIN][pending["batch"]]  # [|B|, O, P]
        # gradient of the loss as a linear function of [vecY; 1]: [P, nO+1]
        grad = torch.einsum("bop,bok->pk", jb, resid)
        sizes = [p.numel() for p in self.params]
        if self._D is None:
            self._D = grad.new_zeros(grad.shape)
        theta_prev = self._D.clone()
        theta_prev[:, -1] += torch.cat([t.reshape(-1) for t in self.theta0])
        delta = torch.zeros_like(grad)
        start = 0
        groups = {id(p): grp for grp in self.optimizer.param_groups for p in grp["params"]}
        new_m = grad.new_zeros(grad.shape) if self._m is None else self._m
        for p, size in zip(self.params, sizes, strict=True):
            rows = slice(start, start + size)
            start += size
            grp = groups[id(p)]
            state = self.optimizer.state[p]
            g = grad[rows] * (-1.0 if grp.get("maximize", False) else 1.0)
            lr = grp["lr"]
            if self.kind == "sgd":
                wd, mu = grp["weight_decay"], grp["momentum"]
                if wd:
                    g = g + wd * theta_prev[rows]
                if mu:
                    buf = g.clone() if self._m is None else (
                        mu * new_m[rows] + (1 - grp["dampening"]) * g)
                    new_m[rows] = buf
                    g = g + mu * buf if grp["nesterov"] else buf
                delta[rows] = -lr * g
                continue
            b1, b2 = (float(b) for b in grp["betas"])
            wd, eps = grp["weight_decay"], grp["eps"]
            step = float(state["step"])
            if grp.get("decoupled_weight_decay", isinstance(self.optimizer,
                                                            torch.optim.AdamW)):
                delta[rows] -= lr * wd * theta_prev[rows]
            elif wd:
                g = g + wd * theta_prev[rows]
            m = (1 - b1) * g if self._m is None else b1 * new_m[rows] + (1 - b1) * g
            new_m[rows] = m
            v = state["max_exp_avg_sq"] if grp.get("amsgrad", False) else state["exp_avg_sq"]
            denom = (v.reshape(-1).to(self.dtype) / (1 - b2**step)).sqrt() + eps
            delta[rows] -= (lr / (1 - b1**step)) * m / denom[:, None]
        self._m = new_m
        self._D = self._D + delta
        for name in self.A:
            self.A[name].add_(torch.einsum("mop,pk->mok", jac[name], delta))


__all__ = ["Smoother"]
