"""The kernel plumbing the layers above ``kernels`` may use: a model as a pure function of its
trainable parameters, the checks at the door, per-example Jacobians, the kernel to a subset.

A lens (or the training loop) that follows the model through the same function the kernels
differentiate imports these from here, never from the private modules they live in
(``kernels/_functional.py``, ``kernels/_blocks.py``), so the kernels may rearrange their
insides freely; the ``private_modules`` import-linter contract (``pyproject.toml``) enforces it.

- parameters: :data:`ParamSpec` (what ``params=`` accepts), :func:`select_params` (the names it
  selects), :func:`only_params` (the others frozen for a while), :func:`trainable_params`,
  :func:`frozen_state` (the buffers and frozen parameters, held fixed);
- checks: :func:`check_model` (no batch statistics, no dropout in train mode),
  :func:`check_parameters` (with values, finite), :func:`check_input`,
  :func:`check_batch_independence`, :func:`forward_checked` (a forward the model accepts, its
  output as ``[B, O]``), :func:`checked_call` (all of them, cached per model structure);
- the function: :func:`batched_fn` / :func:`single_fn` (``f(params, x)`` on a batch or one
  example), :func:`unwrap_output` (the logits of a ``ModelOutput``), :func:`flatten_output`
  (``[N, O]``), :func:`eval_mode` (every submodule in eval mode, then each one's flag
  restored), :func:`ad_safe_backends` (backends whose kernels support every autodiff
  transform);
- derivatives: :func:`per_example_jacobian` (``[B, O, P]``), :func:`ntk_to_subset` (the
  structured kernel between every point and a batch drawn from them).
"""

from telescope.kernels._blocks import per_example_jacobian
from telescope.kernels._functional import (
    ParamSpec,
    ad_safe_backends,
    batched_fn,
    check_batch_independence,
    check_input,
    check_model,
    check_parameters,
    checked_call,
    eval_mode,
    flatten_output,
    forward_checked,
    frozen_state,
    only_params,
    select_params,
    single_fn,
    trainable_params,
    unwrap_output,
)
from telescope.kernels.structured import ntk_to_subset

__all__ = [
    "ParamSpec",
    "select_params",
    "only_params",
    "trainable_params",
    "frozen_state",
    "check_model",
    "check_parameters",
    "check_input",
    "check_batch_independence",
    "forward_checked",
    "checked_call",
    "batched_fn",
    "single_fn",
    "unwrap_output",
    "flatten_output",
    "eval_mode",
    "ad_safe_backends",
    "per_example_jacobian",
    "ntk_to_subset",
]
