"""Shared plumbing for the kernel code: validating and calling a model, shaping its outputs.

Everything here treats a model as a pure function ``f(theta, x)`` of its trainable parameters
``theta`` (the parameters with ``requires_grad=True``) evaluated at the model's current parameters,
buffers and train/eval mode. Nothing in this module changes the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

from telescope.errors import UnsupportedModelError, UsageError

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
    """Memory budget in bytes for blocking (default 2 GiB)."""
    if max_memory_gb is None:
        max_memory_gb = 2.0
    if not max_memory_gb > 0:
        raise UsageError(f"max_memory_gb must be positive, got {max_memory_gb}")
    return int(max_memory_gb * 2**30)


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
