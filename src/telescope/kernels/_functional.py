"""Shared plumbing for the kernel code: validating and calling a model, shaping its outputs.

Everything here treats a model as a pure function ``f(theta, x)`` of its trainable parameters
``theta`` (the parameters with ``requires_grad=True``) evaluated at the model's current parameters,
buffers and train/eval mode. Nothing in this module changes the model.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

from telescope.errors import TelescopeError, UnsupportedModelError, UsageError

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


def flatten_output(out: Tensor, batch: int) -> Tensor:
    """Shape a model output ``[N]`` or ``[N, ...]`` into ``[N, O]`` (trailing dims flattened)."""
    if not isinstance(out, Tensor):
        raise UsageError(
            f"the model must return a Tensor of shape [N] or [N, O], got {type(out).__name__}"
        )
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


def check_inputs(x1: Tensor, x2: Tensor | None) -> None:
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not isinstance(x, Tensor):
            raise UsageError(
                f"{name} must be a torch.Tensor of shape [N, ...], got {type(x).__name__}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise UsageError(f"{name} must have shape [N, ...] with N >= 1, got {tuple(x.shape)}")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise UsageError(f"{name} contains NaN or infinite values")
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
    for name, p in model.named_parameters():
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


def check_batch_independence(model: nn.Module, x: Tensor, name: str = "x1") -> None:
    """Raise :class:`UnsupportedModelError` when the model's output for an example depends on
    the other examples of its batch (``h - h.mean(0)``, batch statistics, attention over the
    batch axis): its per-example tangent kernel is undefined, and a per-example computation of
    it would silently give something else (e.g. all zeros).

    Compares one batched forward over up to four examples of ``x`` with the same examples one
    at a time; with a single example, a second one is made from it (noise for float inputs, its
    values rolled for integer inputs). The result is cached per model structure
    (:func:`model_signature`), so the check costs a few small forward passes once.
    """
    key = model_signature(model, x)
    if _INDEPENDENCE.get(model) == key:
        return
    xs = x[:4]
    if xs.shape[0] == 1:
        if x.is_floating_point():
            gen = torch.Generator(device="cpu").manual_seed(0)
            noise = torch.randn(x[:1].shape, generator=gen, dtype=x.dtype).to(x.device)
            other = x[:1] + noise * (x[:1].abs().mean() + 1)
        else:
            other = x[:1].reshape(1, -1).roll(1, dims=1).reshape(x[:1].shape)
        xs = torch.cat([x[:1], other])
    batched = forward_checked(model, xs, name)
    single = torch.cat([forward_checked(model, xs[i:i + 1], name) for i in range(xs.shape[0])])
    low = batched.dtype in (torch.float16, torch.bfloat16)
    tol = 1e-2 if low else 1e-4
    diff = float((batched - single).abs().max())
    scale = float(single.abs().max())
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
    device. Must run with the attention backend the kernel uses (``ad_safe_attention``)."""
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
