"""Kernels: empirical NTK (jacobian / vector / structured), its per-layer plan and rules,
low-rank NTK, kernel regression (gradient flow) and kernel gradient descent, kernel smoothers
(smoother weights, effective parameters, kernel weight norms) and kernel metrics.

:mod:`telescope.kernels.functional` holds the plumbing the layers above may use (a model as a
function of its parameters, the checks at the door, per-example Jacobians); the modules whose
names start with ``_`` are private to ``kernels``."""

from telescope.kernels.empirical import ntk
from telescope.kernels.fisher import fisher_information, fisher_kernel, lowrank_fisher_kernel
from telescope.kernels.lowrank import lowrank_ntk
from telescope.kernels.metrics import (
    alignment,
    effective_rank,
    kernel_distance,
    kernel_target_alignment,
    normalized_variance,
    spectrum,
)
from telescope.kernels.regression import kernel_descent, kernel_regression
from telescope.kernels.rules import AffineRule, LinearRule, register_rule
from telescope.kernels.smoothing import (
    absolute_ridge,
    effective_parameters,
    kernel_weight_norms,
    max_kernel_weight_norm,
    smoother_weights,
)
from telescope.kernels.solvers import (
    KernelSolve,
    kernel_diagonal,
    kernel_matmul,
    solve_kernel_system,
)
from telescope.kernels.structured import explain

__all__ = [
    "ntk",
    "explain",
    "register_rule",
    "LinearRule",
    "AffineRule",
    "lowrank_ntk",
    "fisher_kernel",
    "lowrank_fisher_kernel",
    "fisher_information",
    "kernel_regression",
    "kernel_descent",
    "smoother_weights",
    "absolute_ridge",
    "effective_parameters",
    "kernel_weight_norms",
    "max_kernel_weight_norm",
    "solve_kernel_system",
    "KernelSolve",
    "kernel_matmul",
    "kernel_diagonal",
    "alignment",
    "kernel_distance",
    "kernel_target_alignment",
    "normalized_variance",
    "spectrum",
    "effective_rank",
]
