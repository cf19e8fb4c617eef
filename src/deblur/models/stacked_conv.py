"""Plain stacked 3x3 convolutions with a global residual: the simplest baseline."""

from __future__ import annotations

import torch
from torch import nn

from deblur.models.common import MODELS, ResidualRestorer, start_near_identity


@MODELS.register("stacked_conv")
class StackedConv(ResidualRestorer):
    """``depth`` 3x3 convolutions, ``channels`` wide, ReLU between them; output = input + net(input)."""

    size_multiple = 1

    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(channels, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)
        start_near_identity(self.net[-1])

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
