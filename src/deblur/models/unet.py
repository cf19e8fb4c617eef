"""U-Net (Ronneberger et al. 2015) for restoration: GroupNorm, bilinear upsampling, global residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deblur.models.common import MODELS, ResidualRestorer, start_near_identity


class DoubleConv(nn.Sequential):
    """(3x3 conv -> GroupNorm -> ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Bilinear x2 upsampling + 3x3 conv, concatenation with the skip, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.fuse = DoubleConv(2 * out_channels, out_channels, groups)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([self.reduce(x), skip], dim=1))


@MODELS.register("unet")
class UNet(ResidualRestorer):
    """Encoder of ``levels`` DoubleConvs (``base_channels`` doubling per level, max-pool
    downsampling), a ``bottleneck_channels`` DoubleConv, a mirrored decoder with
    concatenated skips and a final 1x1 conv to RGB; output = input + net(input)."""

    def __init__(self, base_channels: int, levels: int, bottleneck_channels: int, groups: int) -> None:
        super().__init__()
        widths = [base_channels * 2**level for level in range(levels)]
        bad = [c for c in [*widths, bottleneck_channels] if c % groups]
        if bad:
            raise ValueError(f"unet: channel counts {bad} are not divisible by groups={groups}")
        self.size_multiple = 2**levels
        self.encoders = nn.ModuleList()
        in_channels = 3
        for width in widths:
            self.encoders.append(DoubleConv(in_channels, width, groups))
            in_channels = width
        self.bottleneck = DoubleConv(in_channels, bottleneck_channels, groups)
        self.decoders = nn.ModuleList()
        in_channels = bottleneck_channels
        for width in reversed(widths):
            self.decoders.append(Up(in_channels, width, groups))
            in_channels = width
        self.head = nn.Conv2d(in_channels, 3, 1)
        start_near_identity(self.head)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for decoder, skip in zip(self.decoders, reversed(skips)):
            x = decoder(x, skip)
        return self.head(x)
