"""A small 1-D convolutional network (for MNIST-1D and other sequences of features)."""

from __future__ import annotations

from torch import Tensor, nn


class ConvNet1d(nn.Module):
    """``[N, C, L]`` or ``[N, L]`` -> conv(k=5) -> ReLU -> conv(k=3, stride 2) -> ReLU -> dense."""

    def __init__(self, in_channels: int = 1, length: int = 40, channels: int = 16,
                 out_features: int = 10) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size=5, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1)
        self.act = nn.ReLU()
        out_len = (length + 2 - 3) // 2 + 1
        self.head = nn.Linear(channels * out_len, out_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            x = x.unsqueeze(1)
        h = self.act(self.conv1(x))
        h = self.act(self.conv2(h))
        return self.head(h.flatten(1))
