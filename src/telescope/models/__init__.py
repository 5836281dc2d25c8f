"""Small, readable models for kernels, lenses and studies."""

from telescope.models.autoencoder import LinearBottleneckAutoencoder
from telescope.models.bottleneck import (
    BottleneckMLP,
    LinearFlow,
    deep_linear_bottleneck_flow,
    sample_linear_factors,
    scalar_bottleneck_time,
    scalar_bottleneck_trajectory,
)
from telescope.models.cnn import ConvNet1d
from telescope.models.ensemble import BlockDiagonalLinear, Ensemble, collegial_ensemble
from telescope.models.hypernetwork import HyperNetwork
from telescope.models.lazy import LazyModel
from telescope.models.mlp import MLP, NTKLinear
from telescope.models.ntk_attention import NTKSelfAttention
from telescope.models.ntk_conv import NTKConv
from telescope.models.polynomial import TwoLayerPolynomialNet
from telescope.models.resnet import ResNet18
from telescope.models.sigma_reparam import SigmaReparamLinear
from telescope.models.transformer import TinyTransformer
from telescope.models.vae import VAE, EncoderMean, NoisyELBO

__all__ = ["MLP", "NTKLinear", "ConvNet1d", "TinyTransformer", "SigmaReparamLinear", "LazyModel",
           "ResNet18", "TwoLayerPolynomialNet", "NTKSelfAttention",
           "NTKConv", "HyperNetwork", "BlockDiagonalLinear", "Ensemble", "collegial_ensemble",
           "LinearBottleneckAutoencoder",
           "BottleneckMLP", "LinearFlow", "deep_linear_bottleneck_flow", "sample_linear_factors",
           "scalar_bottleneck_time", "scalar_bottleneck_trajectory",
           "VAE", "NoisyELBO", "EncoderMean"]
