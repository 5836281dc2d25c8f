"""``Conv``: a convolution in NTK parametrization and its infinite-width limit.

The finite layer (:class:`telescope.models.NTKConv`, PyTorch layout ``[N, C, *spatial]``) is
``y = (W_std / sqrt(C * prod(k))) conv(pad(x), W) + b_std b`` with ``W, b ~ N(0, 1)``. As the
channel counts grow, every output channel is a Gaussian process whose covariance between
position ``o`` of ``x`` and ``o'`` of ``x'`` is the input covariance averaged along the filter's
diagonal,

.. math::

    K'(x, x')[o, o'] = \\frac{W_{std}^2}{|k|} \\sum_{\\delta} K(x, x')[o s + \\delta,
        o' s + \\delta] + b_{std}^2, \\qquad
    \\Theta' = K' + \\frac{W_{std}^2}{|k|} \\sum_{\\delta} \\Theta[o s + \\delta, o' s + \\delta],

with the covariance zero-padded ("same") or wrapped ("circular") like the input (Novak et al.
2019, "Bayesian deep convolutional networks with many channels are Gaussian processes"; Arora
et al. 2019, "On exact computation with an infinitely wide neural net"; neural-tangents'
``stax.Conv`` with ``padding="SAME"|"VALID"|"CIRCULAR"``).
"""

from __future__ import annotations

import numbers

from torch import nn

from telescope.errors import UsageError, check_positive_int, check_std
from telescope.infinite._conv import conv_covariance, conv_output_size
from telescope.infinite._layer import Layer, Shape, State, one_branch
from telescope.infinite._state import Covariances, Geometry
from telescope.infinite.layers import affine
from telescope.models.ntk_conv import NTKConv

__all__ = ["Conv"]

_PADDINGS = ("valid", "same", "circular")


def _int_tuple(value: object, name: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not value or any(
            isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in value):
        raise UsageError(
            f"{name} must be a tuple of positive ints, one per spatial axis (e.g. (3, 3) for "
            f"images, (3,) for sequences), got {value!r}")
    return tuple(int(v) for v in value)


class Conv(Layer):
    """Convolution over the spatial axes of ``[N, C, *spatial]`` (1, 2 or 3 of them) in NTK
    parametrization, and its infinite-width limit (see the module docstring).

    ``kernel_size`` is a tuple whose length is the number of spatial axes; ``stride`` an int or
    such a tuple; ``padding`` ``"valid"``, ``"same"`` (XLA's: the extra pad of an even filter
    goes after) or ``"circular"`` (wrap-around, ``"same"``-sized output).
    """

    requires_layout = ("channels_first",)

    def __init__(self, out_channels: int, kernel_size: tuple[int, ...],
                 stride: int | tuple[int, ...] = 1, padding: str = "valid",
                 W_std: float = 1.0, b_std: float = 0.0) -> None:
        self.out_channels = check_positive_int(out_channels, "out_channels")
        self.kernel_size = _int_tuple(kernel_size, "kernel_size")
        if isinstance(stride, numbers.Integral) and not isinstance(stride, bool):
            stride = (int(stride),) * len(self.kernel_size)
        self.stride = _int_tuple(stride, "stride")
        if len(self.stride) != len(self.kernel_size):
            raise UsageError(
                f"stride {self.stride} and kernel_size {self.kernel_size} must have one entry "
                "per spatial axis each")
        if not isinstance(padding, str) or padding.lower() not in _PADDINGS:
            raise UsageError(f"padding must be one of {_PADDINGS}, got {padding!r}")
        self.padding = padding.lower()
        self.W_std = check_std(W_std, "W_std")
        self.b_std = check_std(b_std, "b_std")

    def __repr__(self) -> str:
        return (f"Conv({self.out_channels}, {self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, W_std={self.W_std}, b_std={self.b_std})")

    def geometry(self, shape: Shape) -> Shape:
        one_branch(shape, self)
        assert isinstance(shape, Geometry)
        if shape.layout != "channels_first":
            raise UsageError(
                f"{self!r} takes [N, C, *spatial] inputs (PyTorch's nn.Conv layout), but its "
                f"input is {shape.layout.replace('_', ' ')} ([N, F] or [N, T, D])")
        if len(shape.spatial) != len(self.kernel_size):
            raise UsageError(
                f"{self!r} has a {len(self.kernel_size)}-d kernel_size but its input has "
                f"{len(shape.spatial)} spatial axes {shape.spatial}")
        spatial = tuple(conv_output_size(size, k, s, self.padding) for size, k, s in zip(
            shape.spatial, self.kernel_size, self.stride, strict=True))
        return Geometry("channels_first", spatial,
                        None if shape.features is None else self.out_channels)

    def max_pair_entries(self, shape: Shape) -> int:
        assert isinstance(shape, Geometry)
        n = 1
        for size, k in zip(shape.spatial, self.kernel_size, strict=True):
            n *= (size + k) ** 2  # the padded covariance
        return n

    def apply(self, state: State) -> State:
        one_branch(state, self)
        assert isinstance(state, Covariances)

        def conv(t, batch_ndim):
            return conv_covariance(t, batch_ndim, self.kernel_size, self.stride, self.padding)

        var1 = conv(state.var1, 1)
        mixed = state.replace(
            nngp=conv(state.nngp, 2), ntk=conv(state.ntk, 2), var1=var1,
            var2=var1 if state.symmetric else conv(state.var2, 1),
            geometry=self.geometry(state.geometry))
        return affine(mixed, self.W_std**2, self.b_std**2)

    def build(self, shape: Shape) -> nn.Module:
        assert isinstance(shape, Geometry) and shape.features is not None
        return NTKConv(shape.features, self.out_channels, self.kernel_size, stride=self.stride,
                       padding=self.padding, weight_std=self.W_std, bias_std=self.b_std,
                       bias=self.b_std > 0)
