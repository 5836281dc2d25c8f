"""How far the empirical NTK has moved from its initial value (Fort et al., 2020, "Deep learning
versus kernel learning: an empirical study of loss landscape geometry and the time evolution of
the Neural Tangent Kernel", NeurIPS 2020).

On fixed probe points ``x`` the lens computes ``K_0 = Theta_0(x, x)`` once and, at every
:meth:`KernelEvolution.measure`, ``K_t = Theta_t(x, x)`` and

- the kernel distance ``1 - <K_t, K_0>_F / (||K_t||_F ||K_0||_F)`` (Fort et al.),
- the centered kernel-target alignment of ``K_t`` with ``y y^T`` (Cristianini et al., 2002;
  Cortes et al., 2012),
- ``tr K_t`` and the entropy effective rank of ``K_t`` (Roy & Vetterli, 2007).

In the lazy / kernel regime (Jacot et al., 2018; Chizat et al., 2019) the distance stays near 0;
feature learning shows as a growing distance and, typically, a rising target alignment.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from telescope.kernels import effective_rank, kernel_distance, kernel_target_alignment, ntk
from telescope.kernels.functional import ParamSpec, eval_mode

__all__ = ["KernelEvolution"]


def _as_matrix(k: Tensor, output: str) -> Tensor:
    """An ``[N O, N O]`` matrix (rows ``(i, o)``) from a ``full`` or ``diagonal`` kernel."""
    if output == "trace":
        return k
    if output == "diagonal":  # [N, N, O] -> block form with K[(i,o),(j,o')] = 0 for o != o'
        k = k.diag_embed()
    n, _, o, _ = k.shape
    return k.permute(0, 2, 1, 3).reshape(n * o, n * o)


class KernelEvolution:
    """Distance, target alignment, trace and effective rank of the NTK ``K_t`` against ``K_0``.

    Parameters
    ----------
    model
        The network; ``K_0 = telescope.ntk(model, x, output=output, method=method)`` is computed
        at construction, from the model's parameters and mode at that moment.
    x
        Probe inputs ``[N, ...]``.
    y
        Targets ``[N]`` or ``[N, O]`` for the kernel-target alignment (one-hot encode labels),
        or ``None`` (the alignment is then NaN). For ``output="full"``/``"diagonal"`` the
        kernel is used as the ``[N O, N O]`` matrix with rows ``(i, o)`` and ``y [N, O]`` is
        flattened to match.
    output, method, params
        Passed to :func:`telescope.ntk` (``params``: the kernel of a parameter subset).
        ``"full"`` and ``"diagonal"`` kernels are compared as ``[N O, N O]`` matrices
        (``diagonal`` as its block form, zero for ``o != o'``). Kernels are evaluated with the
        model in eval mode (as :class:`telescope.Telescope` evaluates its probes), its own mode
        restored after.

    Attributes
    ----------
    kernel0
        ``K_0`` as returned by :func:`telescope.ntk`.
    kernel
        The last measured ``K_t`` (``K_0`` before the first :meth:`measure`).
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor | None = None, *,
                 output: str = "trace", method: str = "auto", params: ParamSpec = None) -> None:
        self.model, self.x, self.y = model, x, y
        self.output, self.method, self.params = output, method, params
        self.kernel0 = self._kernel()
        self.kernel = self.kernel0

    def _kernel(self) -> Tensor:
        with eval_mode(self.model):
            return ntk(self.model, self.x, output=self.output, method=self.method,
                       params=self.params)

    def _target(self) -> Tensor | None:
        if self.y is None or self.output == "trace":
            return self.y
        return self.y.reshape(-1)

    def measure(self, state: object = None) -> dict:
        """``{"kernel_distance", "kernel_target_alignment", "kernel_trace",
        "kernel_effective_rank"}`` of ``K_t = telescope.ntk(model, x)`` at the current
        parameters: ``kernel_distance(K_t, K_0)``, ``kernel_target_alignment(K_t, y)`` (NaN
        without ``y``), ``tr K_t`` (``sum_{i,o} K[(i,o),(i,o)]``) and ``effective_rank(K_t)``.

        As a :func:`telescope.train.fit` callback (``state`` is then the fit's state, unused)
        these are columns of the history row of each measured step.
        """
        self.kernel = self._kernel()
        k = _as_matrix(self.kernel, self.output)
        k0 = _as_matrix(self.kernel0, self.output)
        y = self._target()
        return {
            "kernel_distance": kernel_distance(k, k0),
            "kernel_target_alignment": math.nan if y is None else kernel_target_alignment(k, y),
            "kernel_trace": float(k.diagonal().sum()),
            "kernel_effective_rank": effective_rank(k),
        }
