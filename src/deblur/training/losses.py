"""Training losses: weighted sums of named components, built from ``LossConfig``.

Every component is zero for identical images and positive otherwise, and is computed in
fp32 whatever the input dtype (autocast is switched off inside ``CompositeLoss``).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim
from torch import nn

from deblur.core.config import LossConfig
from deblur.core.registry import Registry

log = logging.getLogger(__name__)

LOSSES: Registry = Registry("loss")

PSNR_MSE_FLOOR = 1e-8  # NAFNet's PSNRLoss adds this to the MSE; identical images score 80 dB
MS_SSIM_WIN = 11  # pytorch_msssim's Gaussian window; MS-SSIM needs a side > (11 - 1) * 2**4 = 160


class Component(nn.Module):
    """One loss term: ``forward(pred, target)`` -> scalar, both (N, C, H, W) fp32."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()


def _charbonnier(diff: torch.Tensor, eps: float) -> torch.Tensor:
    """mean(sqrt(d^2 + eps^2)) - eps: smooth L1, shifted to be 0 at d = 0."""
    return (diff.square() + eps * eps).sqrt().mean() - eps


@LOSSES.register("charbonnier")
class Charbonnier(Component):
    def __init__(self, cfg: LossConfig) -> None:
        super().__init__(cfg)
        self.eps = cfg.charbonnier_eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _charbonnier(pred - target, self.eps)


@LOSSES.register("l1")
class L1(Component):
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(pred, target)


@LOSSES.register("mse")
class MSE(Component):
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target)


@LOSSES.register("psnr")
class PSNRLoss(Component):
    """Batch mean of 10 log10(1 + MSE_i / 1e-8) = (80 dB - PSNR_i) for data range 1.

    NAFNet's PSNR loss, 10 log10(MSE_i + 1e-8), shifted by the constant 80 dB so identical
    images give 0: the gradient is NAFNet's exactly.
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mse = (pred - target).square().flatten(1).mean(1)
        return (10.0 / math.log(10.0) * torch.log1p(mse / PSNR_MSE_FLOOR)).mean()


def ssim_window(height: int, width: int) -> int:
    """Largest odd window of at most ``MS_SSIM_WIN`` pixels that fits the image."""
    side = min(height, width, MS_SSIM_WIN)
    return side if side % 2 else side - 1


@LOSSES.register("ms_ssim")
class MSSSIM(Component):
    """1 - MS-SSIM (data range 1); below ``ms_ssim_min_side`` pixels, 1 - single-scale SSIM
    with the largest odd window that fits. ``variant`` names what the last call used."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__(cfg)
        self.min_side = cfg.ms_ssim_min_side
        self.variant: str | None = None

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h, w = pred.shape[-2:]
        if min(h, w) >= self.min_side:
            variant = "ms_ssim"
            score = ms_ssim(pred, target, data_range=1.0, win_size=MS_SSIM_WIN)
        else:
            win = ssim_window(h, w)
            variant = f"ssim(win={win})"
            score = ssim(pred, target, data_range=1.0, win_size=win)
        if variant != self.variant:
            log.info("ms_ssim loss on %dx%d images: using %s", h, w, variant)
            self.variant = variant
        return 1.0 - score


@LOSSES.register("fft")
class FFTLoss(Component):
    """Mean |real| + |imag| difference of the orthonormal 2-D real FFTs (MIMO-UNet's FFT loss,
    with ``norm="ortho"`` so its scale does not grow with the image size)."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = torch.fft.rfft2(pred, norm="ortho") - torch.fft.rfft2(target, norm="ortho")
        return torch.view_as_real(diff).abs().mean()


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


@LOSSES.register("edge")
class EdgeLoss(Component):
    """Charbonnier (same eps) of the difference of 3x3 Laplacians, replicate-padded."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__(cfg)
        self.eps = cfg.charbonnier_eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        channels = pred.shape[1]
        kernel = LAPLACIAN.to(pred.device).expand(channels, 1, 3, 3)
        diff = F.pad(pred - target, (1, 1, 1, 1), mode="replicate")
        return _charbonnier(F.conv2d(diff, kernel, groups=channels), self.eps)


class CompositeLoss(nn.Module):
    """Weighted sum of the components with weight > 0 in ``cfg``.

    ``forward(pred, target)`` returns ``(total, components)``: ``components`` maps each
    computed component's name to its unweighted, detached value.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.weights = cfg.weights()
        self.terms = nn.ModuleDict({name: LOSSES.get(name)(cfg) for name in self.weights})

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, target = pred.float(), target.float()
            values = {name: term(pred, target) for name, term in self.terms.items()}
            total = sum(self.weights[name] * value for name, value in values.items())
        return total, {name: value.detach() for name, value in values.items()}
