"""Kernels: empirical NTK (jacobian / vector / structured), its per-layer plan and rules,
low-rank NTK, infinite-width kernels, kernel regression and kernel metrics."""

from telescope.kernels.empirical import ntk
from telescope.kernels.infinite import infinite_ntk
from telescope.kernels.lowrank import lowrank_ntk
from telescope.kernels.metrics import (
    alignment,
    effective_rank,
    kernel_distance,
    kernel_target_alignment,
    spectrum,
)
from telescope.kernels.regression import kernel_regression
from telescope.kernels.rules import AffineRule, LinearRule, register_rule
from telescope.kernels.structured import explain

__all__ = [
    "ntk",
    "explain",
    "register_rule",
    "LinearRule",
    "AffineRule",
    "lowrank_ntk",
    "infinite_ntk",
    "kernel_regression",
    "alignment",
    "kernel_distance",
    "kernel_target_alignment",
    "spectrum",
    "effective_rank",
]
