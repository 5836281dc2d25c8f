"""ResNet-18's architecture (He et al. 2016, "Deep Residual Learning for Image Recognition"),
written out so that no torchvision is needed: a stem, four stages of two basic blocks
(3x3 convolutions with BatchNorm, a 1x1 projection where the shape changes) and a pooled linear
head. ``width`` scales every stage (64 is the original); ``stem="imagenet"`` is the original
7x7 stride-2 convolution with max-pooling, ``"cifar"`` a 3x3 stride-1 convolution (the usual
choice for 32x32 images)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from telescope.errors import UsageError

__all__ = ["BasicBlock", "ResNet18"]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                       nn.BatchNorm2d(c_out)) if stride != 1 or c_in != c_out
                         else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """``[N, C, H, W]`` images -> ``[N, classes]`` logits (11.2M parameters at width 64)."""

    def __init__(self, classes: int = 10, *, width: int = 64, in_channels: int = 3,
                 stem: Literal["imagenet", "cifar"] = "imagenet") -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise UsageError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU())
        blocks, c = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            blocks += [BasicBlock(c, out, 1 if i == 0 else 2), BasicBlock(out, out, 1)]
            c = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))
