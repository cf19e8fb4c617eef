"""LPIPS perceptual distance from local weight files only; nothing is ever downloaded.

After Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"
(CVPR 2018) and its reference code (github.com/richzhang/PerceptualSimilarity, v0.1):
both images go through a scaling layer and a frozen ImageNet backbone; at five ReLU taps the
features are unit-normalised over channels, their squared difference is weighted per channel
by a linear head (1x1 conv, no bias), averaged over space and summed over taps.

Files, as their owners publish them (documentation/diffusion.md says where to get them):
- backbone: torchvision's ``alexnet`` or ``vgg16`` state dict (keys ``features.N.weight/bias``;
  ``classifier.*`` is ignored). The classes below rebuild those feature stacks, so the file
  loads as is without torchvision.
- linear heads (optional): the lpips package's ``weights/v0.1/<net>.pth`` (keys
  ``lin0..lin4.model.1.weight``). Without it every channel weighs 1, the package's
  uncalibrated ``lpips=False`` variant.

Large images are scored in tiles (``TILE_SIDE``); ``PerceptualLoss`` is the differentiable form
for training objectives.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deblur.core.errors import DeblurError

NETS = ("alex", "vgg")
TILE_SIDE = 512                      # images with a side above this are scored tile by tile
MIN_SIDE = {"alex": 32, "vgg": 16}   # smaller images are reflect-padded up to this (the pools need it)
# Where each tap ends in ``features`` (exclusive), as lpips.pretrained_networks slices them.
TAP_ENDS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}
TAP_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class PerceptualError(DeblurError, ValueError):
    """An LPIPS weight file is missing or does not fit the network; the message names the file and key."""


class AlexNetBackbone(nn.Module):
    """torchvision's ``alexnet().features`` up to conv5's ReLU, under the same state-dict keys."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True))


class VGG16Backbone(nn.Module):
    """torchvision's ``vgg16().features`` up to relu5_3, under the same state-dict keys."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)


BACKBONES = {"alex": AlexNetBackbone, "vgg": VGG16Backbone}


class ScalingLayer(nn.Module):
    """LPIPS's input normalisation: [-1, 1] images shifted and scaled to ImageNet statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class LinearHead(nn.Module):
    """One tap's channel weights, laid out as lpips's ``NetLinLayer`` (``model.1`` is the 1x1 conv)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS distance of two batches of [0, 1] RGB images (N, 3, H, W) -> (N,); 0 for identical images."""

    def __init__(self, net: str, calibrated: bool) -> None:
        super().__init__()
        if net not in NETS:
            raise PerceptualError(f"unknown LPIPS net {net!r}; known: {list(NETS)}")
        self.net_name = net
        self.calibrated = calibrated
        self.scaling = ScalingLayer()
        self.backbone = BACKBONES[net]()
        self.lins = nn.ModuleList(LinearHead(c) for c in TAP_CHANNELS[net]) if calibrated else None
        self.eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU feature maps of [0, 1] images."""
        h, out, start = self.scaling(2 * x - 1), [], 0
        for end in TAP_ENDS[self.net_name]:
            h = self.backbone.features[start:end](h)
            out.append(h)
            start = end
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.distance(self.taps(a), self.taps(b))

    def distance(self, taps_a: list[torch.Tensor], taps_b: list[torch.Tensor]) -> torch.Tensor:
        """LPIPS from two images' ``taps`` (lets one reference be compared with several outputs)."""
        total = 0.0
        for k, (fa, fb) in enumerate(zip(taps_a, taps_b)):
            diff = (_unit_normalise(fa) - _unit_normalise(fb)) ** 2
            weighted = self.lins[k](diff) if self.lins is not None else diff.sum(dim=1, keepdim=True)
            total = total + weighted.mean(dim=(2, 3))
        return total.flatten()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)    # always eval: dropout in the heads must never fire


def _unit_normalise(features: torch.Tensor) -> torch.Tensor:
    """Features divided by their norm over channels, as lpips.normalize_tensor."""
    return features / (torch.sqrt((features ** 2).sum(dim=1, keepdim=True)) + 1e-10)


def load_lpips(backbone_path: str | Path, linear_path: str | Path | None, net: str) -> LPIPS:
    """A frozen LPIPS from a torchvision backbone file and (optionally) the lpips linear heads.

    A missing or unreadable file, a missing key or a wrong shape is a ``PerceptualError``
    naming the file and the (first) offending key.
    """
    if net not in NETS:
        raise PerceptualError(f"unknown LPIPS net {net!r}; known: {list(NETS)}")
    metric = LPIPS(net, calibrated=linear_path is not None)
    backbone = _read_state_dict(Path(backbone_path), "backbone")
    wanted = metric.backbone.state_dict()
    _check_keys(backbone, {k: v.shape for k, v in wanted.items()}, Path(backbone_path),
                f"a torchvision {'alexnet' if net == 'alex' else 'vgg16'} state dict (features.N.weight/bias)")
    metric.backbone.load_state_dict({k: backbone[k] for k in wanted})
    if linear_path is not None:
        heads = _read_state_dict(Path(linear_path), "linear")
        wanted = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(TAP_CHANNELS[net])}
        _check_keys(heads, wanted, Path(linear_path), f"the lpips package's v0.1 {net}.pth (lin0..lin4.model.1.weight)")
        metric.lins.load_state_dict({f"{k}.model.1.weight": heads[key] for k, key in enumerate(wanted)})
    for p in metric.parameters():
        p.requires_grad_(False)
    return metric.eval()


def _read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PerceptualError(f"{path}: LPIPS {what} file not found (evaluate.lpips.{what}); "
                              "LPIPS never downloads weights, see documentation/diffusion.md")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a state dict
        raise PerceptualError(f"{path}: not a readable PyTorch state dict ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PerceptualError(f"{path}: expected a state dict (parameter name -> tensor)")
    return state


def _check_keys(found: dict[str, torch.Tensor], wanted: dict[str, tuple], path: Path, expected: str) -> None:
    """Every key of ``wanted`` is in ``found`` with that shape; else an error naming the first bad key."""
    for key, shape in wanted.items():
        if key not in found:
            raise PerceptualError(f"{path}: missing key {key!r}; expected {expected}")
        if tuple(found[key].shape) != tuple(shape):
            raise PerceptualError(f"{path}: key {key!r} has shape {tuple(found[key].shape)}, "
                                  f"expected {tuple(shape)} for {expected}")


def lpips_from_config(cfg) -> LPIPS | None:
    """The metric ``evaluate.lpips`` names (``LpipsConfig``), or None when ``backbone`` is null."""
    if cfg.backbone is None:
        return None
    return load_lpips(cfg.backbone, cfg.linear, cfg.net)


def lpips_status(cfg) -> str:
    """One line for the MLflow tag and metrics.json: what LPIPS was computed with, or why not."""
    if cfg.backbone is None:
        return "unavailable (evaluate.lpips.backbone is null)"
    heads = Path(cfg.linear).name if cfg.linear else "none (uncalibrated)"
    return f"{cfg.net}: backbone {Path(cfg.backbone).name}, linear heads {heads}"


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float (1, 3, H, W) in [0, 1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def lpips_distance(metric: LPIPS, output: np.ndarray, reference: np.ndarray) -> float:
    """LPIPS of two uint8 HxWx3 images of the same size (lower is closer); see ``lpips_distances``."""
    return lpips_distances(metric, [output], reference)[0]


@torch.no_grad()
def lpips_distances(metric: LPIPS, outputs: list[np.ndarray], reference: np.ndarray) -> list[float]:
    """LPIPS of each uint8 HxWx3 image in ``outputs`` against ``reference`` (its features computed once).

    Rule for large images: a side above ``TILE_SIDE`` is cut into equal tiles of at most that
    side and the result is the area-weighted mean of the tiles' LPIPS. LPIPS is itself a spatial
    mean, so this equals the whole-image value up to the backbone's padding at tile borders.
    Images smaller than the network's ``MIN_SIDE`` are reflect-padded (both alike) up to it.
    """
    for output in outputs:
        if output.shape != reference.shape:
            raise ValueError(f"image sizes differ: {output.shape} vs {reference.shape}")
    device = next(metric.parameters()).device
    side = MIN_SIDE[metric.net_name]
    ref = to_tensor(reference).to(device)
    outs = [to_tensor(o).to(device) for o in outputs]
    height, width = ref.shape[-2:]
    rows, cols = _cuts(height, TILE_SIDE), _cuts(width, TILE_SIDE)
    totals = [0.0] * len(outs)
    for y0, y1 in zip(rows[:-1], rows[1:]):
        for x0, x1 in zip(cols[:-1], cols[1:]):
            ref_taps = metric.taps(_pad_to(ref[..., y0:y1, x0:x1], side))
            for i, out in enumerate(outs):
                d = metric.distance(metric.taps(_pad_to(out[..., y0:y1, x0:x1], side)), ref_taps)
                totals[i] += float(d[0]) * (y1 - y0) * (x1 - x0)
    return [t / (height * width) for t in totals]


def _cuts(length: int, tile: int) -> list[int]:
    pieces = max(1, math.ceil(length / tile))
    return [round(i * length / pieces) for i in range(pieces + 1)]


def _pad_to(x: torch.Tensor, side: int) -> torch.Tensor:
    pad_h, pad_w = max(0, side - x.shape[-2]), max(0, side - x.shape[-1])
    if not pad_h and not pad_w:
        return x
    mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
    return nn.functional.pad(x, (0, pad_w, 0, pad_h), mode=mode)


class PerceptualLoss(nn.Module):
    """Mean LPIPS of a batch as a training loss: differentiable in ``prediction``, weights frozen.

    Inputs are (N, 3, H, W) in [0, 1]; build it with ``PerceptualLoss.from_files`` or from a metric.
    The frozen weights follow the loss's ``.to(device)``; they never enter an optimiser because
    they do not require gradients.
    """

    def __init__(self, metric: LPIPS) -> None:
        super().__init__()
        self.metric = metric
        for p in self.metric.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_files(cls, backbone_path: str | Path, linear_path: str | Path | None, net: str) -> "PerceptualLoss":
        return cls(load_lpips(backbone_path, linear_path, net))

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        side = MIN_SIDE[self.metric.net_name]
        return self.metric(_pad_to(prediction, side), _pad_to(target, side)).mean()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)
