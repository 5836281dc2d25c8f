"""Shared plumbing for the kernel code: validating and calling a model, shaping its outputs.

Everything here treats a model as a pure function ``f(theta, x)`` of its trainable parameters
``theta`` (the parameters with ``requires_grad=True``) evaluated at the model's current parameters,
buffers and train/eval mode. Nothing in this module changes the model.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import math
import numbers
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call, vmap

from telescope.errors import TelescopeError, UnsupportedModelError, UsageError, warn

_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
               nn.FeatureAlphaDropout)


def check_model(model: nn.Module) -> None:
    """Raise a clear error for models whose per-example NTK is undefined in their current mode.

    A BatchNorm layer in train mode normalizes with statistics of the whole batch, so the output
    for one example depends on the others (and a forward pass would update its running
    statistics); dropout in train mode makes the function random.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        where = name or type(model).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise UnsupportedModelError(
                f"{where} ({type(module).__name__}) is in train mode: it couples the examples of a "
                "batch through batch statistics, so a per-example tangent kernel is undefined. "
                "Call model.eval() first (BatchNorm then uses its running statistics), or use a "
                "per-example normalization such as LayerNorm or GroupNorm."
            )
        if isinstance(module, _STOCHASTIC) and module.training and module.p > 0:
            raise UnsupportedModelError(
                f"{where} ({type(module).__name__}, p={module.p}) is in train mode: the network "
                "is random, so its tangent kernel is undefined. Call model.eval() first."
            )
        if isinstance(module, nn.Embedding) and (module.max_norm is not None
                                                 or module.scale_grad_by_freq):
            raise UnsupportedModelError(
                f"{where} (Embedding) uses max_norm or scale_grad_by_freq: max_norm rewrites the "
                "weight in place during forward and scale_grad_by_freq changes gradients to "
                "something that is not the derivative of the function, so the tangent kernel is "
                "not well defined. Construct the Embedding without these options."
            )
    if not any(p.requires_grad for p in model.parameters()):
        raise UnsupportedModelError(
            "the model has no trainable parameters (requires_grad=True): its tangent kernel is 0"
        )


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """Named trainable parameters, detached (so torch.func transforms own their autograd)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def frozen_state(model: nn.Module) -> dict[str, Tensor]:
    """Buffers and non-trainable parameters: held fixed while differentiating."""
    state = {n: b for n, b in model.named_buffers()}
    state.update({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
    return state


def unwrap_output(out: Any) -> Any:
    """The logits of a mapping with a ``"logits"`` tensor (a Hugging Face ``ModelOutput``);
    anything else as it is."""
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    return out


def flatten_output(out: Tensor, batch: int) -> Tensor:
    """Shape a model output ``[N]`` or ``[N, ...]`` into ``[N, O]`` (trailing dims flattened).

    A mapping with a ``"logits"`` entry (the ``ModelOutput`` of Hugging Face models) stands for
    its logits (:func:`unwrap_output`)."""
    out = unwrap_output(out)
    if not isinstance(out, Tensor):
        raise UsageError(
            f"the model must return a Tensor of shape [N] or [N, O] (or a ModelOutput with "
            f"logits), got {type(out).__name__}: wrap it in a module whose forward returns the "
            "tensor the kernel is of")
    if out.ndim == 0 or out.shape[0] != batch:
        raise UsageError(
            f"the model returned shape {tuple(out.shape)} for a batch of {batch}; "
            "expected [N] or [N, O] with N the batch size"
        )
    if not out.is_floating_point():
        raise UsageError(f"the model output must be floating point, got {out.dtype}")
    return out.reshape(batch, -1)


def batched_fn(model: nn.Module, frozen: dict[str, Tensor]) -> Callable[[dict, Tensor], Tensor]:
    """``f(params, x) -> [N, O]``: the model on a batch, as a function of its trainable params."""

    def f(params: dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **params}, (x,), strict=False)
        return flatten_output(out, x.shape[0])

    return f


def single_fn(model: nn.Module, frozen: dict[str, Tensor]) -> Callable[[dict, Tensor], Tensor]:
    """``f(params, x) -> [O]``: the model on one example (for ``vmap`` over examples)."""
    fb = batched_fn(model, frozen)

    def f(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return fb(params, x.unsqueeze(0))[0]

    return f


def check_input(name: str, x: object) -> None:
    """``x`` must be a tensor of examples ``[N, ...]``, ``N >= 1``, without NaN or inf."""
    if not isinstance(x, Tensor):
        raise UsageError(
            f"{name} must be a torch.Tensor of shape [N, ...], got {type(x).__name__}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise UsageError(f"{name} must have shape [N, ...] with N >= 1, got {tuple(x.shape)}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise UsageError(f"{name} contains NaN or infinite values")


def check_inputs(x1: Tensor, x2: Tensor | None) -> None:
    check_input("x1", x1)
    if x2 is not None:
        check_input("x2", x2)
    if x2 is not None and x1.dtype != x2.dtype:
        raise UsageError(f"x1 and x2 must have the same dtype, got {x1.dtype} and {x2.dtype}")
    if x2 is not None and x1.shape[1:] != x2.shape[1:]:
        raise UsageError(
            f"x1 and x2 must have the same per-example shape, got {tuple(x1.shape[1:])} and "
            f"{tuple(x2.shape[1:])}"
        )


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(p for p in model.parameters() if p.requires_grad)
    return p.dtype, p.device


def num_outputs(model: nn.Module, x: Tensor) -> int:
    """Number of outputs O of the model (one forward pass on a single example, no autograd)."""
    with torch.no_grad():
        f = batched_fn(model, frozen_state(model))
        return f(trainable_params(model), x[:1]).shape[1]


def parse_memory(max_memory_gb: float | None) -> int:
    """Memory budget in bytes for blocking (default 2 GiB); a clear error for anything but a
    finite positive number of GiB."""
    if max_memory_gb is None:
        max_memory_gb = 2.0
    if isinstance(max_memory_gb, bool) or not isinstance(max_memory_gb, numbers.Real):
        raise UsageError(f"max_memory_gb must be a number of GiB such as 2 or 0.5, got "
                         f"{max_memory_gb!r} ({type(max_memory_gb).__name__})")
    if not (math.isfinite(max_memory_gb) and max_memory_gb > 0):
        raise UsageError(f"max_memory_gb must be a finite positive number of GiB (the memory "
                         f"you can spare, e.g. 2 or 64), got {max_memory_gb!r}")
    return int(max_memory_gb * 2**30)


def check_parameters(model: nn.Module) -> None:
    """Raise a clear error for parameters without values (meta device) or with NaN/inf: the
    kernel of such a model would be meaningless (meta) or NaN."""
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise UsageError(
                f"parameter {name!r} is on the meta device (it has a shape but no values): "
                "materialize the model first (model.to_empty(device='cpu') and initialize it, "
                "or load its weights)")
        if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all()):
            raise UsageError(
                f"parameter {name!r} holds NaN or infinite values, so every kernel would be "
                "NaN: did the training diverge? Use a finite checkpoint (or lower the learning "
                "rate)")


_INDEPENDENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_signature(model: nn.Module, x: Tensor) -> tuple:
    """What a per-model plan or check depends on: the model's structure and mode and the
    per-example input shape, dtype and device (not the parameter values)."""
    params = tuple((n, id(p), tuple(p.shape), p.dtype, p.requires_grad)
                   for n, p in model.named_parameters(remove_duplicate=False))
    modules = tuple((n, id(m), m.training) for n, m in model.named_modules())
    return params, modules, tuple(x.shape[1:]), x.dtype, x.device


def forward_checked(model: nn.Module, x: Tensor, name: str = "x1") -> Tensor:
    """``model(x)`` as ``[N, O]`` without autograd; the model's own error on inputs it does not
    take becomes a :class:`UsageError` that names the input and what the model expects."""
    try:
        with torch.no_grad():
            return batched_fn(model, frozen_state(model))(trainable_params(model), x)
    except TelescopeError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        dtype, _ = model_dtype_device(model)
        raise UsageError(
            f"the model failed on {name} (per-example shape {tuple(x.shape[1:])}, {x.dtype}; "
            f"its parameters are {dtype}): {type(err).__name__}: {err}. Pass {name} with the "
            "per-example shape and dtype the model's forward takes") from err


def at_least_two(x: Tensor) -> Tensor:
    """``x`` with at least two examples: a single one gets a second made from it (noise for
    float inputs, its values rolled for integer inputs), so that shapes that depend on the
    batch size and couplings between examples can show."""
    if x.shape[0] > 1:
        return x
    if x.is_floating_point():
        gen = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        other = x + noise * (x.abs().mean() + 1)
    else:
        other = x.reshape(1, -1).roll(1, dims=1).reshape(x.shape)
    return torch.cat([x, other])


def check_batch_independence(model: nn.Module, x: Tensor, name: str = "x1") -> None:
    """Raise :class:`UnsupportedModelError` when the model's output for an example depends on
    the other examples of its batch (``h - h.mean(0)``, batch statistics, attention over the
    batch axis): its per-example tangent kernel is undefined, and a per-example computation of
    it would silently give something else (e.g. all zeros).

    Compares one batched forward over up to four examples of ``x`` with the same examples one
    at a time (a single example gets a second, :func:`at_least_two`), and two batched forward
    passes (a random model differs between them). The result is cached per model structure
    (:func:`model_signature`), so the check costs a few small forward passes once.
    """
    key = model_signature(model, x)
    if _INDEPENDENCE.get(model) == key:
        return
    xs = at_least_two(x[:4])
    batched = forward_checked(model, xs, name)
    single = torch.cat([forward_checked(model, xs[i:i + 1], name) for i in range(xs.shape[0])])
    low = batched.dtype in (torch.float16, torch.bfloat16)
    tol = 1e-2 if low else 1e-4
    again = forward_checked(model, xs, name)
    scale = float(batched.abs().max())
    # not torch.equal: GPU kernels may differ in the last bits between two runs
    if not float((batched - again).abs().max()) <= tol * scale + tol * 1e-3:
        raise UnsupportedModelError(
            "the model gives different outputs for the same inputs (a random operation such "
            "as F.dropout in train mode?), so its tangent kernel is undefined: call "
            "model.eval() first, or make the operation respect self.training")
    diff = float((batched - single).abs().max())
    if not diff <= tol * scale + tol * 1e-3:
        raise UnsupportedModelError(
            f"the model's output for one example depends on the other examples of its batch "
            f"(a batch of {xs.shape[0]} and the same examples one at a time differ by "
            f"{diff:.3g}, outputs of scale {scale:.3g}): the per-example tangent kernel is "
            "undefined. Typical causes are batch statistics (x - x.mean(0), BatchNorm in "
            "train mode) or attention or pooling over the batch axis; make the forward treat "
            "every example on its own")
    _INDEPENDENCE[model] = key


def checked_call(model: nn.Module, x1: Tensor, x2: Tensor | None = None
                 ) -> tuple[Tensor, Tensor | None]:
    """Every check a kernel computation makes at the door, in order: the model's modules
    (:func:`check_model`), its parameters (:func:`check_parameters`), the inputs
    (:func:`check_inputs`), a forward pass on them that the model accepts, and that examples do
    not interact (:func:`check_batch_independence`). Returns the inputs on the model's
    device. Must run with the attention backend the kernel uses (:func:`ad_safe_backends`)."""
    check_model(model)
    check_parameters(model)
    check_inputs(x1, x2)
    _, device = model_dtype_device(model)
    x1 = x1.to(device)
    x2 = None if x2 is None else x2.to(device)
    check_batch_independence(model, x1 if x1.shape[0] > 1 or x2 is None else
                             torch.cat([x1, x2[:3]]))
    if x2 is not None:
        forward_checked(model, x2[:1], "x2")
    return x1, x2


_NO_VMAP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def map_or_loop(fn: Callable, in_dims: tuple, *args: Any, owner: object, what: str) -> Any:
    """``vmap(fn, in_dims)(*args)``; when ``fn`` cannot run under ``torch.func.vmap``
    (data-dependent control flow such as ``pad_token_id in input_ids``, ``.item()``, ops without
    a batching rule, RNN hidden states), the same one slice at a time (exact, slower), with one
    warning naming the cause. Which ``(owner, what)`` pairs fail is remembered, so later calls
    go straight to the loop. A random operation (``F.dropout`` in train mode) raises
    :class:`UnsupportedModelError`: a random network has no tangent kernel.

    ``in_dims`` holds 0 (mapped over the leading axis) or ``None`` per argument; the outputs
    (any pytree of tensors) are stacked along a new leading axis."""
    failed = _NO_VMAP.setdefault(owner, set()) if _weakrefable(owner) else set()
    if what not in failed:
        try:
            return vmap(fn, in_dims=in_dims)(*args)
        except (RuntimeError, NotImplementedError) as err:
            if "randomness" in str(err):
                raise UnsupportedModelError(
                    "the model calls a random operation (e.g. F.dropout in train mode), so its "
                    "tangent kernel is undefined: call model.eval() first (or make the "
                    "operation respect self.training)") from None
            failed.add(what)
            cause = (str(err).strip().splitlines() or [""])[0][:200]
            warn(
                f"{what} cannot run under torch.func.vmap ({type(err).__name__}: {cause}); "
                "computing it one slice at a time instead (exact, slower)", RuntimeWarning)
    size = next(a.shape[0] for a, d in zip(args, in_dims, strict=True) if d is not None)
    outs = [fn(*(a[i] if d is not None else a for a, d in zip(args, in_dims, strict=True)))
            for i in range(size)]
    return pytree.tree_map(lambda *xs: torch.stack(xs), *outs)


def _weakrefable(obj: object) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


ParamSpec = str | Sequence[str] | Callable[[str, Tensor], bool] | None
"""Which parameters a kernel is of: ``None`` (every trainable parameter), a parameter name or
glob pattern (``"*.bias"``, ``"transformer.h.3.*"``), a sequence of them, or a predicate
``(name, parameter) -> bool``. Only trainable parameters (``requires_grad=True``) count."""


def select_params(model: nn.Module, params: ParamSpec) -> list[str] | None:
    """The names of the trainable parameters ``params`` selects (``None``: all of them), in
    ``named_parameters`` order; a clear error when it selects nothing or names a parameter the
    model does not have."""
    if params is None:
        return None
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in trainable]
    if callable(params) and not isinstance(params, str):
        chosen = [n for n, p in trainable if params(n, p)]
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        if not patterns or not all(isinstance(q, str) for q in patterns):
            raise UsageError(f"params must be parameter names, glob patterns or a predicate "
                             f"(name, param) -> bool, got {params!r}")
        for q in patterns:
            if not any(ch in q for ch in "*?[") and q not in names:
                close = difflib.get_close_matches(q, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(f"params: the model has no trainable parameter {q!r}{hint}")
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, q) for q in patterns)]
    if not chosen:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise UsageError(f"params={params!r} selects no trainable parameter; the model's are: "
                         f"{shown}")
    return chosen


@contextlib.contextmanager
def only_params(model: nn.Module, names: list[str] | None) -> Iterator[None]:
    """Treat every trainable parameter not in ``names`` as frozen (``requires_grad=False``)
    while inside, then restore each flag (``names=None``: no change)."""
    if names is None:
        yield
        return
    keep = set(names)
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and n not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


@contextlib.contextmanager
def ad_safe_backends(model: nn.Module | None = None) -> Iterator[None]:
    """Backends whose kernels support every autodiff transform (same numbers, maybe slower):

    - the math backend of ``F.scaled_dot_product_attention`` (the fused CPU kernels have no
      forward-mode derivative);
    - ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` without their inference fast
      path (``_transformer_encoder_layer_fwd`` and ``_native_multi_head_attention`` have no
      forward-mode derivative either);
    - for models with RNN modules, the native RNN kernels instead of oneDNN's
      (``mkldnn_rnn_layer`` has no forward-mode derivative); oneDNN stays on for everything
      else, convolutions included.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    has_rnn = isinstance(model, nn.Module) and any(isinstance(m, nn.RNNBase)
                                                   for m in model.modules())
    fastpath = torch.backends.mha.get_fastpath_enabled()
    onednn = torch._C._get_mkldnn_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    if has_rnn:
        torch._C._set_mkldnn_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        torch._C._set_mkldnn_enabled(onednn)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own ``training`` flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
