"""The rank of a network's codes (activations at a hook point) on a fixed probe batch.

For the codes ``Z`` (``[N, k]``, one row per probe example, flattened after the batch axis) of
a fixed probe batch, centered over the batch by default (``Z - mean_n Z``: the rank of the
codes' covariance, what an autoencoder's latent rank means), with singular values ``s_1 >=
... >= s_m`` (``m = min(N, k)``):

- the effective rank (Roy & Vetterli, 2007) ``erank = exp(H(p))``, ``p_i = s_i / sum_j s_j``,
  ``H(p) = -sum_i p_i log p_i`` (``0 log 0 = 0``; between 1 and ``m``; ``r`` for ``r`` equal
  singular values), the formula of :func:`telescope.kernels.effective_rank` applied to the
  singular values of ``Z`` (that function, given the Gram matrix ``Z Z^T``, would weight by
  ``s_i^2``);
- the numerical rank ``#{i : s_i > max(atol, rtol * s_1)}``;
- the stable rank ``sum_i s_i^2 / s_1^2`` (Rudelson & Vershynin, 2007).

Greedy rank learning in autoencoders with a linear sub-network at the bottleneck (Sun, Thilak,
Littwin, Saremi & Susskind, 2021, arXiv:2107.01301) shows as these ranks rising one step at a
time while the singular values of the codes grow one after another. :class:`CodeRank` records
them over training as a :func:`telescope.train.fit` callback; :func:`code_spectrum` and
:func:`code_ranks` are the same computations on a tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from telescope.errors import UsageError
from telescope.models.hooks import capture

__all__ = ["CodeRank", "code_spectrum", "code_ranks"]


def _check_tolerances(rtol: float, atol: float) -> tuple[float, float]:
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0.0 <= rtol < 1.0:
        raise UsageError(f"rtol must be a number in [0, 1), got {rtol!r}")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not (
            math.isfinite(atol) and atol >= 0.0):
        raise UsageError(f"atol must be a finite number >= 0, got {atol!r}")
    return float(rtol), float(atol)


def code_spectrum(codes: Tensor, *, center: bool = True) -> Tensor:
    """Singular values (descending, float64, on the CPU) of ``codes`` ``[N, ...]`` flattened to
    ``[N, k]``, after subtracting the mean over the batch when ``center``."""
    if not isinstance(codes, Tensor) or codes.dim() < 2 or codes.shape[0] < 1:
        raise UsageError(f"codes must be a tensor [N, ...] with N >= 1 and a feature axis, got "
                         f"{getattr(codes, 'shape', type(codes).__name__)}")
    z = codes.detach().flatten(1).to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(z).all()):
        raise UsageError("codes hold NaN or infinite values (did training diverge?)")
    if center:
        z = z - z.mean(dim=0, keepdim=True)
    return torch.linalg.svdvals(z)


def code_ranks(s: Tensor, *, rtol: float = 0.01, atol: float = 0.0) -> dict[str, float]:
    """``{"effective_rank", "numerical_rank", "stable_rank", "sv_max"}`` of the singular values
    ``s`` (see the module docstring; all 0 for ``s = 0``)."""
    rtol, atol = _check_tolerances(rtol, atol)
    s = s.detach().to(torch.float64).flatten()
    s_max = float(s.max()) if s.numel() else 0.0
    if s_max <= 0.0:
        return {"effective_rank": 0.0, "numerical_rank": 0, "stable_rank": 0.0, "sv_max": 0.0}
    p = s / s.sum()
    p = p[p > 0]
    return {"effective_rank": float(torch.exp(-(p * p.log()).sum())),
            "numerical_rank": int((s > max(atol, rtol * s_max)).sum()),
            "stable_rank": float((s * s).sum()) / s_max ** 2,
            "sv_max": s_max}


class CodeRank:
    """The ranks of the codes at one hook point for a fixed probe batch, over training.

    Parameters
    ----------
    model
        A network with a :class:`~telescope.models.hooks.HookPoint` named ``hook`` (e.g.
        :class:`telescope.models.LinearBottleneckAutoencoder`'s ``"hook_code"``).
    x
        The probe batch (fixed: the same examples at every measurement).
    hook
        The hook point whose output are the codes.
    rtol, atol
        Numerical rank: singular values ``> max(atol, rtol * s_1)``.
    center
        Subtract the batch mean of the codes first (default).
    n_values
        How many of the largest singular values to report as columns ``sv_1 ...`` (``None``:
        all ``min(N, k)``; missing ones, when the codes are narrower, are not reported).
    prefix
        Prefix of the column names (``"code_"``: ``code_effective_rank``, ...).

    ``measure`` (a :func:`telescope.train.fit` callback method; fit runs it in eval mode)
    does one forward pass of ``x`` under ``torch.no_grad`` and returns the columns
    ``<prefix>effective_rank``, ``<prefix>numerical_rank``, ``<prefix>stable_rank``,
    ``<prefix>sv_max`` and ``<prefix>sv_1 ... <prefix>sv_<n>``; it also keeps every measured
    spectrum in :attr:`spectra` (``[(step, singular values)]``). It works in any loop:
    ``lens.measure()`` measures now (step ``None`` when no state is given). The model keeps no
    state: the hook is registered only for that forward pass.
    """

    def __init__(self, model: nn.Module, x: Tensor, *, hook: str = "hook_code",
                 rtol: float = 0.01, atol: float = 0.0, center: bool = True,
                 n_values: int | None = None, prefix: str = "code_") -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 1:
            raise UsageError("x must be a tensor holding a probe batch of at least one example")
        if not isinstance(hook, str):
            raise UsageError(f"hook must be the name of a hook point, got {hook!r}")
        self.rtol, self.atol = _check_tolerances(rtol, atol)
        if n_values is not None and (isinstance(n_values, bool) or not isinstance(n_values, int)
                                     or n_values < 0):
            raise UsageError(f"n_values must be None or an int >= 0, got {n_values!r}")
        self.model, self.x, self.hook = model, x, hook
        self.center, self.n_values, self.prefix = bool(center), n_values, str(prefix)
        self.spectra: list[tuple[int | None, Tensor]] = []
        with capture(model, [hook]):   # fail now, naming the model's hook points, if unknown
            pass

    def codes(self) -> Tensor:
        """The codes of the probe batch now (detached, as the model computes them)."""
        with torch.no_grad(), capture(self.model, [self.hook]) as cache:
            self.model(self.x)
        if self.hook not in cache:
            raise UsageError(f"CodeRank: the forward pass of {type(self.model).__name__} did not "
                             f"go through the hook point {self.hook!r}")
        return cache[self.hook]

    def singular_values(self) -> Tensor:
        """The singular values of the (centered) codes now: :func:`code_spectrum`."""
        return code_spectrum(self.codes(), center=self.center)

    def measure(self, state: object = None) -> dict[str, Any]:
        """The columns described in the class docstring, for the codes now."""
        s = self.singular_values()
        self.spectra.append((getattr(state, "step", None), s))
        p = self.prefix
        out: dict[str, Any] = {p + k: v for k, v in
                               code_ranks(s, rtol=self.rtol, atol=self.atol).items()}
        n = s.numel() if self.n_values is None else min(self.n_values, s.numel())
        out.update({f"{p}sv_{i + 1}": float(s[i]) for i in range(n)})
        return out
