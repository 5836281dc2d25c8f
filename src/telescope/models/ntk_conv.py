"""Convolutions in NTK parametrization, and the padding arithmetic of XLA's ``"SAME"``.

:class:`NTKConv` is neural-tangents' ``stax.Conv`` on PyTorch's ``[N, C, *spatial]`` layout, for
1, 2 or 3 spatial dimensions:

    ``y = (weight_std / sqrt(C * prod(kernel_size))) * conv(pad(x), W) + bias_std * b``

with ``W`` (``[out, in, *kernel_size]``) and ``b`` (``[out]``) i.i.d. ``N(0, 1)``, so that the
empirical NNGP and NTK of a wide network of these layers converge to the infinite-width kernels
of :mod:`telescope.infinite` (Novak et al. 2019, "Bayesian deep convolutional networks with
many channels are Gaussian processes"; Arora et al. 2019, "On exact computation with an
infinitely wide neural net", the CNTK).

The padding arithmetic lives here, below both the finite layer and the kernel
(``telescope.infinite`` imports it), so the two pad identically:

* ``"valid"``: no padding, ``out = floor((size - kernel) / stride) + 1``;
* ``"same"``: XLA's ``SAME``: ``out = ceil(size / stride)``, ``total = max((out - 1) * stride +
  kernel - size, 0)`` zeros, ``low = total // 2`` before and ``high = total - low`` after (so an
  even kernel pads one more zero after than before; PyTorch's ``padding="same"`` pads the other
  way round and refuses strides);
* ``"circular"``: the ``SAME`` output size, the input padded by wrap-around (a torus), with the
  same ``low``/``high`` (any amount: the input is tiled as often as needed, as ``numpy.pad``'s
  ``"wrap"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from telescope.errors import UsageError, check_positive_int

__all__ = ["NTKConv", "PADDINGS", "same_padding", "conv_output_size", "conv_pads",
           "check_conv_geometry", "wrap_pad"]

PADDINGS = ("valid", "same", "circular")

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """``(low, high)``: the zeros XLA's ``"SAME"`` padding puts before and after an axis.

    ``out = ceil(size / stride)``, ``total = max((out - 1) * stride + kernel - size, 0)``,
    ``low = total // 2``, ``high = total - low`` (``lax.padtype_to_pads``).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_output_size(size: int, kernel: int, stride: int, padding: str) -> int:
    """The output length of one spatial axis: ``floor((size - kernel) / stride) + 1`` for
    ``"valid"``, ``ceil(size / stride)`` for ``"same"`` and ``"circular"``."""
    padding = _check_padding(padding)
    if padding == "valid":
        if size < kernel:
            raise UsageError(f"a 'valid' convolution needs every spatial size >= the kernel "
                             f"size, got size {size} < kernel {kernel}; use padding='same'")
        return (size - kernel) // stride + 1
    return -(-size // stride)


def conv_pads(spatial: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
              padding: str) -> tuple[tuple[int, int], ...]:
    """``(low, high)`` for every spatial axis (``(0, 0)`` for ``"valid"``)."""
    padding = _check_padding(padding)
    if padding == "valid":
        return tuple((0, 0) for _ in spatial)
    return tuple(same_padding(n, k, s) for n, k, s in zip(spatial, kernel_size, stride,
                                                          strict=True))


def wrap_pad(x: Tensor, dim: int, low: int, high: int) -> Tensor:
    """``x`` padded by wrap-around along ``dim``: ``low`` entries before and ``high`` after,
    ``out[i] = x[(i - low) mod n]`` (any amount, like ``numpy.pad(mode="wrap")``)."""
    if low == 0 and high == 0:
        return x
    n = x.shape[dim]
    if low <= n and high <= n:  # two slices, no index tensor
        parts = [x.narrow(dim, n - low, low), x, x.narrow(dim, 0, high)]
        return torch.cat([p for p in parts if p.shape[dim]], dim=dim)
    idx = torch.arange(-low, n + high, device=x.device).remainder(n)
    return x.index_select(dim, idx)


def _check_padding(padding: object) -> str:
    p = padding.lower() if isinstance(padding, str) else padding
    if p not in PADDINGS:
        raise UsageError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return p  # type: ignore[return-value]


def _positive_ints(value: object, what: str, length: int | None = None) -> tuple[int, ...]:
    ok = (isinstance(value, (tuple, list)) and len(value) > 0
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
    if not ok or (length is not None and len(value) != length):  # type: ignore[arg-type]
        n = "one per spatial dimension" if length is None else f"{length} of them"
        raise UsageError(f"{what} must be a tuple of positive ints ({n}, e.g. "
                         f"{(3,) * (length or 2)}), got {value!r}")
    return tuple(value)  # type: ignore[arg-type]


def check_conv_geometry(kernel_size: object, stride: object = 1,
                        padding: object = "valid") -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """Validated ``(kernel_size, stride, padding)``: ``kernel_size`` a tuple of positive ints,
    ``stride`` a positive int (every axis) or a tuple of the same length, ``padding`` one of
    :data:`PADDINGS` (case-insensitive, so neural-tangents' ``"SAME"`` works). Raises
    :class:`~telescope.errors.UsageError` otherwise."""
    kernel = _positive_ints(kernel_size, "kernel_size")
    if isinstance(stride, int) and not isinstance(stride, bool):
        stride = (stride,) * len(kernel)
    strides = _positive_ints(stride, "stride (an int or a tuple matching kernel_size)",
                             len(kernel))
    return kernel, strides, _check_padding(padding)


class NTKConv(nn.Module):
    """Convolution in NTK parametrization on ``[N, C, *spatial]`` (1, 2 or 3 spatial dims).

    ``y = (weight_std / sqrt(C * prod(kernel_size))) * conv(pad(x), W) + bias_std * b`` with
    ``W`` ``[out, in, *kernel_size]`` and ``b`` ``[out]`` initialized i.i.d. ``N(0, 1)``: the
    convention of neural-tangents' ``stax.Conv(out, filter_shape, strides, padding, W_std,
    b_std)`` (Novak et al. 2019; Arora et al. 2019), with ``padding`` ``"valid"``, ``"same"``
    (XLA's low/high zeros, also for even kernels and strides) or ``"circular"`` (wrap-around to
    the ``"same"`` size); see the module docstring.

    The layer declares its own structured-NTK rule in :attr:`ntk_rule` (a convolution rule with
    the constant factors ``weight_scale`` and ``bias_std`` and this layer's :meth:`pad_input`),
    read by :mod:`telescope.kernels.rules`, so ``telescope.ntk`` contracts input patches
    instead of per-example Jacobians (1-D, 2-D and 3-D).
    """

    ntk_rule: ClassVar[dict[str, str]] = {"kind": "conv", "weight_scale": "weight_scale",
                                          "bias_scale": "bias_std", "pad": "pad_input"}
    groups: ClassVar[int] = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...],
                 stride: tuple[int, ...] | int = 1, padding: str = "valid", *,
                 weight_std: float = 1.0, bias_std: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        kernel, strides, pad = check_conv_geometry(kernel_size, stride, padding)
        if len(kernel) not in _CONV:
            raise UsageError(f"NTKConv supports 1, 2 or 3 spatial dimensions, got kernel_size "
                             f"{kernel_size!r}")
        in_channels = check_positive_int(in_channels, "in_channels")
        out_channels = check_positive_int(out_channels, "out_channels")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel, strides, pad
        self.dilation = (1,) * len(kernel)
        self.weight_std, self.bias_std = float(weight_std), float(bias_std)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self.bias = nn.Parameter(torch.randn(out_channels)) if bias else None

    @property
    def weight_scale(self) -> float:
        """``weight_std / sqrt(in_channels * prod(kernel_size))``."""
        return self.weight_std / math.sqrt(self.in_channels * math.prod(self.kernel_size))

    def output_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The output's spatial sizes for an input of spatial sizes ``spatial``."""
        return tuple(conv_output_size(n, k, s, self.padding)
                     for n, k, s in zip(spatial, self.kernel_size, self.stride, strict=True))

    def pad_input(self, x: Tensor) -> Tensor:
        """``x`` (``[N, C, *spatial]``) padded so that a ``"valid"`` convolution gives the
        output (zeros for ``"same"``, wrap-around for ``"circular"``)."""
        d = len(self.kernel_size)
        if x.ndim != d + 2 or x.shape[1] != self.in_channels:
            raise UsageError(f"NTKConv({self.in_channels}, ..., kernel_size={self.kernel_size}) "
                             f"takes [N, {self.in_channels}, {d} spatial axes], got "
                             f"{tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        self.output_shape(spatial)  # a 'valid' input smaller than the kernel is a clear error
        pads = conv_pads(spatial, self.kernel_size, self.stride, self.padding)
        if self.padding == "same":
            flat = [p for low_high in reversed(pads) for p in low_high]
            return F.pad(x, flat) if any(flat) else x
        for i, (low, high) in enumerate(pads):
            x = wrap_pad(x, 2 + i, low, high)
        return x

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight * self.weight_scale
        bias = None if self.bias is None else self.bias * self.bias_std
        return _CONV[len(self.kernel_size)](self.pad_input(x), weight, bias, stride=self.stride)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}, weight_std={self.weight_std}, "
                f"bias_std={self.bias_std}, bias={self.bias is not None}")
