"""NAFNet: a nonlinear-activation-free U-shaped network for image restoration.

L. Chen, X. Chu, X. Zhang, J. Sun, "Simple Baselines for Image Restoration", ECCV 2022,
arXiv:2204.04676. Test-time Local Converter (TLC): X. Chu, L. Chen, C. Chen, X. Lu,
"Improving Image Restoration by Revisiting Global Information Aggregation", ECCV 2022,
arXiv:2112.04491. Written after megvii-research/NAFNet (``NAFNet_arch.py``, ``local_arch.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deblur.models.common import MODELS, PADDING_MODES, ResidualRestorer, start_near_identity

LAYER_NORM_EPS = 1e-6
EXPANSION = 2  # channel expansion of the depthwise branch and of the FFN (as in the paper)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (fp32 under autocast)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, LAYER_NORM_EPS)
        return y.permute(0, 3, 1, 2)


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class LocalAvgPool2d(nn.Module):
    """TLC's replacement for global average pooling: the mean over a ``window`` x ``window``
    neighbourhood of every pixel, from an integral image.

    Border pixels take the value of the nearest full window (edge padding), as NAFNet's
    ``AvgPool2d(fast_imp=False)``; a window covering the whole map is plain global pooling.
    Under ``torch.export`` (the ONNX export, deblur.artifact.onnx_model) that shortcut is skipped: the
    integral-image path with a window clipped to the map computes the same mean for every input
    size, where a traced branch would be fixed to the example input's size.
    """

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def extra_repr(self) -> str:
        return f"window={self.window}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if not torch.compiler.is_exporting() and self.window >= h and self.window >= w:
            return x.mean(dim=(-2, -1), keepdim=True)
        kh, kw = min(h, self.window), min(w, self.window)
        xf = x.float()
        mean = xf.mean(dim=(-2, -1), keepdim=True)
        # centring first keeps the fp32 integral image precise on large frames
        s = F.pad((xf - mean).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        box = s[..., kh:, kw:] - s[..., :-kh, kw:] - s[..., kh:, :-kw] + s[..., :-kh, :-kw]
        out = box / (kh * kw) + mean
        dh, dw = h - out.shape[-2], w - out.shape[-1]
        out = F.pad(out, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="replicate")
        return out.to(x.dtype)


class ChannelAttention(nn.Module):
    """Simplified channel attention: x * conv1x1(pool(x)); ``pool`` is global, or local under TLC."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.proj(self.pool(x))


class NAFBlock(nn.Module):
    """Norm -> 1x1 -> 3x3 depthwise -> SimpleGate -> SCA -> 1x1, then a gated FFN;
    both branches join the input through learnable per-channel scales (zero at init)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = channels * EXPANSION
        self.norm1 = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.gate = SimpleGate()
        self.sca = ChannelAttention(hidden // 2)
        self.conv3 = nn.Conv2d(hidden // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.conv4 = nn.Conv2d(channels, hidden, 1)
        self.conv5 = nn.Conv2d(hidden // 2, channels, 1)
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.sca(self.gate(self.conv2(self.conv1(self.norm1(x))))))
        x = x + y * self.beta
        y = self.conv5(self.gate(self.conv4(self.norm2(x))))
        return x + y * self.gamma


def _stage(channels: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*[NAFBlock(channels) for _ in range(blocks)])


@MODELS.register("nafnet")
class NAFNet(ResidualRestorer):
    """Intro 3x3 conv, encoder stages with 2x2 stride-2 downsampling, middle blocks, decoder
    stages with 1x1 conv + PixelShuffle(2) upsampling and additive skips, ending 3x3 conv;
    output = input + net(input).

    ``tlc``/``tlc_factor``: at inference (``prepare_inference``) global pooling becomes
    local pooling over ``tlc_factor * train_patch_size`` pixels (see ``use_local_pooling``).
    ``padding``: how an input whose sides are not multiples of ``2 ** len(enc_blocks)`` is
    padded (``reflect``, or ``zeros`` as the official implementation, for its weights to give
    exactly its outputs; see ``deblur.models.official``).
    """

    def __init__(
        self,
        width: int,
        enc_blocks: tuple[int, ...],
        middle_blocks: int,
        dec_blocks: tuple[int, ...],
        tlc: bool,
        tlc_factor: float,
        padding: str,
    ) -> None:
        super().__init__()
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError("nafnet: enc_blocks and dec_blocks must have the same length")
        if padding not in PADDING_MODES:
            raise ValueError(f"nafnet: padding {padding!r}; known: {list(PADDING_MODES)}")
        self.padding = padding
        self.tlc = tlc
        self.tlc_factor = tlc_factor
        self.size_multiple = 2 ** len(enc_blocks)
        self.intro = nn.Conv2d(3, width, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        channels = width
        for blocks in enc_blocks:
            self.encoders.append(_stage(channels, blocks))
            self.downs.append(nn.Conv2d(channels, 2 * channels, 2, stride=2))
            channels *= 2
        self.middle = _stage(channels, middle_blocks)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for blocks in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(channels, 2 * channels, 1, bias=False), nn.PixelShuffle(2)))
            channels //= 2
            self.decoders.append(_stage(channels, blocks))
        self.ending = nn.Conv2d(width, 3, 3, padding=1)
        start_near_identity(self.ending)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        x = self.intro(x)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = decoder(up(x) + skip)
        return self.ending(x)

    def identity_at_init(self) -> list[str]:
        """Every NAFBlock: with beta = gamma = 0 a fresh block passes its input through unchanged,
        so a trained NAFNet can grow deeper (more middle or stage blocks) without changing its output."""
        return [name for name, module in self.named_modules() if isinstance(module, NAFBlock)]

    def _stages_by_level(self) -> list[tuple[int, nn.Sequential]]:
        levels = len(self.encoders)
        return [
            *enumerate(self.encoders),
            (levels, self.middle),
            *((levels - 1 - i, d) for i, d in enumerate(self.decoders)),
        ]

    def _set_pools(self, make_pool) -> None:
        for level, stage in self._stages_by_level():
            for block in stage:
                block.sca.pool = make_pool(level)

    def use_local_pooling(self, base_window: int) -> None:
        """TLC: pool over ``base_window // 2**level`` pixels at each level (in place)."""
        self._set_pools(lambda level: LocalAvgPool2d(max(1, base_window // 2**level)))

    def use_global_pooling(self) -> None:
        """Back to the training-time global pooling (in place)."""
        self._set_pools(lambda level: nn.AdaptiveAvgPool2d(1))

    def prepare_inference(self, train_patch_size: int) -> None:
        if self.tlc:
            self.use_local_pooling(round(self.tlc_factor * train_patch_size))
