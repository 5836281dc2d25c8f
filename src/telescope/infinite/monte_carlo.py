"""Monte Carlo estimates of the NNGP and NTK: empirical kernels averaged over initializations.

For a network ``f(x; theta)`` with ``O`` outputs and random initial parameters ``theta``, the
two kernels of the infinite-width theory are expectations over the initialization:

.. math::

    K(x, x') = \\frac{1}{O}\\, \\mathbb E_\\theta\\big[\\langle f(x;\\theta),
        f(x';\\theta)\\rangle\\big],
    \\qquad
    \\Theta(x, x') = \\frac{1}{O}\\, \\mathbb E_\\theta\\Big[\\sum_{o=1}^{O}
        \\Big\\langle \\frac{\\partial f_o(x;\\theta)}{\\partial\\theta},
        \\frac{\\partial f_o(x';\\theta)}{\\partial\\theta}\\Big\\rangle\\Big],

i.e. the NNGP kernel (the output covariance, Neal 1996; Lee et al. 2018; Matthews et al. 2018)
and the NTK (Jacot et al. 2018), both per output: the sum over outputs divided by ``O``, which
is the quantity that converges to the infinite-width kernel of one output when the outputs are
i.i.d. in the limit. :func:`monte_carlo_kernel` estimates both by the sample mean over
``n_samples`` independent initializations, the estimator of neural-tangents'
``monte_carlo_kernel_fn`` (Novak et al. 2020). Each empirical NTK is computed by
:func:`telescope.ntk` (its structured per-layer engine by default, Novak et al. 2022).

For a finite width both estimates carry the ``O(1/width)`` finite-width bias of the empirical
kernels on top of the ``O(1/sqrt(n_samples))`` sampling noise; the standard errors returned with
``standard_errors=True`` measure only the latter.

References
----------
* R. Neal. Bayesian Learning for Neural Networks. 1996.
* J. Lee, Y. Bahri, R. Novak, S. Schoenholz, J. Pennington, J. Sohl-Dickstein. Deep Neural
  Networks as Gaussian Processes. ICLR 2018.
* A. Jacot, F. Gabriel, C. Hongler. Neural Tangent Kernel. NeurIPS 2018.
* R. Novak et al. Neural Tangents: Fast and Easy Infinite Neural Networks in Python. ICLR 2020.
* R. Novak, J. Sohl-Dickstein, S. Schoenholz. Fast Finite Width Neural Tangent Kernel. ICML 2022.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor, nn

from telescope.errors import UsageError
from telescope.kernels import ntk
from telescope.kernels.functional import forward_checked

__all__ = ["monte_carlo_kernel"]

_METHODS = ("auto", "jacobian", "vector", "structured")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="monte carlo samples", leave=False)


class _RunningMean:
    """Welford's running mean and sum of squared deviations, in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, value: Tensor) -> None:
        value = value.to(torch.float64)
        self.count += 1
        if self.mean is None or self.m2 is None:
            self.mean = value.clone()
            self.m2 = torch.zeros_like(value)
            return
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    def standard_error(self) -> Tensor:
        """``sqrt(s^2 / n)`` with the unbiased sample variance ``s^2`` (NaN for one sample)."""
        assert self.mean is not None and self.m2 is not None
        if self.count < 2:
            return torch.full_like(self.mean, math.nan)
        return torch.sqrt(self.m2 / (self.count - 1) / self.count)


def _check_args(make_module: object, x1: object, x2: object, n_samples: object, seed: object,
                method: object, progress: object, device: object) -> torch.device | None:
    if isinstance(make_module, nn.Module):
        raise UsageError(
            f"make_module must be a zero-argument callable that returns a freshly initialized "
            f"module, got the module instance {type(make_module).__name__}: every sample needs "
            f"its own initialization, so pass e.g. `lambda: {type(make_module).__name__}(...)`")
    if not callable(make_module):
        raise UsageError(
            f"make_module must be a zero-argument callable returning an nn.Module (e.g. "
            f"`lambda: MyNet()`), got {type(make_module).__name__}")
    if not isinstance(x1, Tensor):
        raise UsageError(f"x1 must be a torch.Tensor of shape [N1, ...], got "
                         f"{type(x1).__name__}")
    if x2 is not None and not isinstance(x2, Tensor):
        raise UsageError(f"x2 must be a torch.Tensor of shape [N2, ...] or None (x2 = x1), got "
                         f"{type(x2).__name__}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or (
            n_samples < 1):
        raise UsageError(f"n_samples must be a positive int (the number of random "
                         f"initializations to average over, e.g. 100), got {n_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise UsageError(f"seed must be a non-negative int (sample i uses torch.manual_seed("
                         f"seed + i)), got {seed!r}")
    if method not in _METHODS:
        raise UsageError(f"method must be one of {_METHODS}, got {method!r}")
    if not isinstance(progress, bool):
        raise UsageError(f"progress must be True or False, got {progress!r}")
    if device is None:
        return None
    if not isinstance(device, str | torch.device):
        raise UsageError(f"device must be None, a string such as 'cpu' or 'cuda:0', or a "
                         f"torch.device, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"device {device!r} is not a valid torch device (e.g. 'cpu', "
                         f"'cuda:0'): {err}") from err


def _build(make_module: Callable[[], nn.Module], index: int, seed: int,
           device: torch.device | None) -> nn.Module:
    module = make_module()
    if not isinstance(module, nn.Module):
        raise UsageError(
            f"make_module() must return a torch.nn.Module, but sample {index} (seed "
            f"{seed + index}) got {type(module).__name__}: pass a callable such as "
            f"`lambda: MyNet()` that builds and returns a fresh module")
    if not any(p.requires_grad for p in module.parameters()):
        raise UsageError(
            f"the module returned by make_module() (sample {index}) has no trainable "
            f"parameters: the NTK needs parameters with requires_grad=True")
    if device is not None:
        module = module.to(device)
    return module


def _model_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(p for p in module.parameters() if p.requires_grad)
    return p.dtype, p.device


def monte_carlo_kernel(
    make_module: Callable[[], nn.Module],
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    n_samples: int,
    seed: int = 0,
    method: str = "auto",
    block_size: int | None = None,
    max_memory_gb: float | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    standard_errors: bool = False,
) -> dict[str, Tensor]:
    """NNGP and NTK per output, averaged over ``n_samples`` random initializations.

    Sample ``i`` builds ``module = make_module()`` under ``torch.random.fork_rng()`` after
    ``torch.manual_seed(seed + i)`` (so the result is reproducible and the caller's global RNG
    state, CPU and CUDA, is left untouched), then computes, with ``f(x)`` the module's output
    flattened to ``[N, O]``,

    * ``nngp_i = f(x1) f(x2)^T / O`` (``[N1, N2]``), and
    * ``ntk_i = telescope.ntk(module, x1, x2, output="trace", method=method) / O``,

    and returns the sample means

    .. math::

        \\hat K = \\frac{1}{S} \\sum_{i=1}^S \\frac{f_i(x_1) f_i(x_2)^\\top}{O}, \\qquad
        \\hat \\Theta = \\frac{1}{S} \\sum_{i=1}^S \\frac{1}{O} \\sum_o
            J_{i,o}(x_1) J_{i,o}(x_2)^\\top,

    unbiased Monte Carlo estimates of the finite-width network's expected kernels, which
    approach the infinite-width kernels as the width grows (Lee et al. 2018; Jacot et al. 2018).
    This is neural-tangents' ``monte_carlo_kernel_fn(init_fn, apply_fn, key, n_samples)``
    (Novak et al. 2020) for a PyTorch module. Each sample's kernels are computed in the
    module's dtype; the running means (and variances) are accumulated in float64.

    Parameters
    ----------
    make_module : callable
        Zero arguments, returns a freshly initialized ``nn.Module`` mapping ``[N, ...]`` to
        ``[N]`` or ``[N, O]`` (e.g. ``lambda: arch.module((3, 8, 8))`` or ``lambda: MyNet()``).
        It must draw its initialization from torch's global RNG (as every ``nn.Module``
        constructor does) for ``seed`` to control it. The module is used in the mode it is
        built in (``telescope.ntk`` refuses dropout in train mode and batch statistics).
    x1, x2 : Tensor
        Inputs ``[N1, ...]`` and ``[N2, ...]``; ``x2=None`` means ``x1`` (symmetric result).
    n_samples : int
        Number of initializations ``S >= 1``.
    seed : int
        Sample ``i`` is drawn with ``torch.manual_seed(seed + i)``.
    method, block_size, max_memory_gb :
        Passed to :func:`telescope.ntk` (``"auto"``: the structured engine; ``"jacobian"`` and
        ``"vector"`` are the slower generic paths).
    progress : bool
        Show a tqdm progress bar over the samples.
    device : str or torch.device, optional
        Move every module there (``module.to(device)``) before use; the inputs follow the
        module. ``None``: where ``make_module`` puts it. The initialization is drawn where
        ``make_module`` draws it (on the CPU for modules built there and moved), so a seed gives
        the same networks whichever ``device`` is used.
    standard_errors : bool
        Also return ``"nngp_sem"`` and ``"ntk_sem"``: the standard error of each entry's mean,
        ``sqrt(s^2 / S)`` with the unbiased sample variance ``s^2`` over the ``S`` samples (NaN
        for ``S = 1``). Within a few of them the estimate matches the width's expected kernel;
        they do not include the finite-width bias.

    Returns
    -------
    dict
        ``{"nngp": [N1, N2], "ntk": [N1, N2]}`` (plus ``"nngp_sem"``, ``"ntk_sem"`` with
        ``standard_errors=True``), in the dtype and on the device of the first sample's module.

    Raises
    ------
    UsageError
        For a ``make_module`` that is not a callable returning a module with trainable
        parameters, ``n_samples`` or ``seed`` that is not a valid int, an unknown ``method``,
        samples whose output shapes differ, and everything :func:`telescope.ntk` refuses.
    """
    target = _check_args(make_module, x1, x2, n_samples, seed, method, progress, device)
    if not isinstance(standard_errors, bool):
        raise UsageError(f"standard_errors must be True or False, got {standard_errors!r}")
    n_samples, seed = int(n_samples), int(seed)
    nngp_acc, ntk_acc = _RunningMean(), _RunningMean()
    out_dtype: torch.dtype | None = None
    out_device: torch.device | None = None
    n_out: int | None = None
    bar = _progress_bar(n_samples, progress)
    try:
        for i in range(n_samples):
            with torch.random.fork_rng():
                torch.manual_seed(seed + i)
                module = _build(make_module, i, seed, target)
                # telescope.ntk runs every check at the door (model, parameters, inputs) first
                k_ntk = ntk(module, x1, x2, method=method, output="trace",
                            block_size=block_size, max_memory_gb=max_memory_gb,
                            progress=False)
                dtype, dev = _model_dtype_device(module)
                f1 = forward_checked(module, x1.to(dev), "x1")
                f2 = f1 if x2 is None else forward_checked(module, x2.to(dev), "x2")
            if n_out is None:
                n_out, out_dtype, out_device = f1.shape[1], dtype, dev
            elif f1.shape[1] != n_out or f2.shape[1] != n_out:
                raise UsageError(
                    f"sample {i} (seed {seed + i}) has {f1.shape[1]} outputs but sample 0 had "
                    f"{n_out}: make_module must build the same architecture every time")
            f1_64 = f1.to(torch.float64)
            f2_64 = f1_64 if x2 is None else f2.to(torch.float64)
            k_nngp = f1_64 @ f2_64.T / n_out
            if x2 is None:
                k_nngp = 0.5 * (k_nngp + k_nngp.T)
            nngp_acc.add(k_nngp.to(out_device))
            ntk_acc.add(k_ntk.to(device=out_device, dtype=torch.float64) / n_out)
            del module
            bar.update(1)
    finally:
        bar.close()
    assert nngp_acc.mean is not None and ntk_acc.mean is not None and out_dtype is not None
    result = {"nngp": nngp_acc.mean.to(out_dtype), "ntk": ntk_acc.mean.to(out_dtype)}
    if standard_errors:
        result["nngp_sem"] = nngp_acc.standard_error().to(out_dtype)
        result["ntk_sem"] = ntk_acc.standard_error().to(out_dtype)
    return result
