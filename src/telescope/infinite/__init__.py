"""Infinite-width kernels: one description gives the finite network and its NNGP/NTK limit.

An architecture is composed of layers, as in neural-tangents' ``stax`` (Novak et al. 2020), in
PyTorch's layouts::

    from telescope import infinite as inf

    arch = inf.serial(inf.Conv(64, (3, 3), padding="same"), inf.Relu(),
                      inf.Conv(64, (3, 3), padding="same"), inf.Relu(),
                      inf.GlobalAvgPool(), inf.Dense(1))
    k = arch.kernel(x1, x2)            # {"nngp": [N1, N2], "ntk": [N1, N2]}, float64
    net = arch.module((3, 8, 8))       # the finite network, NTK parametrization

The empirical NTK of ``arch.module(...)`` (``telescope.ntk``) and its output covariance over
initializations (:func:`monte_carlo_kernel`) converge to ``arch.kernel`` as the widths grow
(Jacot et al. 2018; Lee et al. 2019; Yang 2019, Tensor Programs).

- layers: :class:`Dense`, :class:`Conv`, :class:`SelfAttention`, :class:`LayerNorm`,
  :class:`GlobalAvgPool`, :class:`Flatten`, :class:`Identity`; nonlinearities :class:`Relu`,
  :class:`LeakyRelu`, :class:`ABRelu`, :class:`Abs`, :class:`Erf`, :class:`Gelu`, :class:`Sin`,
  :class:`Cos`, :class:`Tanh`, :class:`Elementwise` (any function, by Gauss-Hermite quadrature);
- combinators :func:`serial`, :func:`parallel`, :class:`FanOut`, :class:`FanInSum`;
- :func:`monte_carlo_kernel` (finite networks averaged over initializations),
  :func:`gradient_descent_mse_ensemble` and :func:`gp_inference` (predictions of the infinite
  network), :func:`infinite_ntk` (the fully-connected shortcut).
"""

from telescope.infinite import families
from telescope.infinite._layer import ElementwiseLayer, Layer
from telescope.infinite.activations import (
    ABRelu,
    Abs,
    Cos,
    Elementwise,
    Erf,
    Gelu,
    LeakyRelu,
    Relu,
    Sin,
    Tanh,
)
from telescope.infinite.attention import SelfAttention
from telescope.infinite.combinators import FanInSum, FanOut, parallel, serial
from telescope.infinite.conv import Conv
from telescope.infinite.families import mlp, residual, transformer, with_positions
from telescope.infinite.layers import Dense, Flatten, GlobalAvgPool, Identity, LayerNorm
from telescope.infinite.monte_carlo import monte_carlo_kernel
from telescope.infinite.predictions import gp_inference, gradient_descent_mse_ensemble
from telescope.infinite.shortcuts import infinite_ntk

__all__ = [
    "Layer", "ElementwiseLayer",
    "Dense", "Conv", "SelfAttention", "LayerNorm", "GlobalAvgPool", "Flatten", "Identity",
    "Relu", "LeakyRelu", "ABRelu", "Abs", "Erf", "Gelu", "Sin", "Cos", "Tanh", "Elementwise",
    "serial", "parallel", "FanOut", "FanInSum",
    "monte_carlo_kernel", "gradient_descent_mse_ensemble", "gp_inference", "infinite_ntk",
    "families", "transformer", "mlp", "with_positions", "residual",
]
