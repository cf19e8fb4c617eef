"""Tiled inference: run a model over an image of any size in overlapping tiles.

U-shaped models downsample by 2 several times, which is not shift-equivariant: a tile
whose corner is not on the model's ``size_multiple`` grid sees other sampling positions
than whole-image inference does. So tiles sit on that grid: each axis is virtually
padded at the end to a multiple of ``size_multiple`` (reflect, as the models pad
themselves), tile starts are spread evenly and rounded to the grid so that neighbours
overlap by at least ``overlap`` pixels, and the last tile ends at the padded border. Only
edge tiles are padded, by less than ``size_multiple`` pixels, and the padding is cropped
off. An axis shorter than a tile gets one tile of the (padded) axis length.

Each tile's prediction is weighted by a separable raised-cosine ramp over ``overlap``
pixels on every side that faces a neighbour (weight 1 on sides at the image border, never
exactly 0), accumulated into one preallocated output buffer and divided by the summed
weight. Because the tile grid is a Cartesian product, the summed weight is the outer
product of two 1-D sums, formed one strip of tile rows at a time for the division, so no
full-size weight buffer is held. Along an axis a tile is the only one, the first, a
middle or the last, so there are at most 3 x 3 distinct 2-D weight tiles:
``BlendWeights`` builds each once, on first use, and reuses it. Tiles go through the
model ``batch_size`` at a time under ``torch.inference_mode``: peak memory is the output
buffer plus one tile batch, at most nine weight tiles and one strip of summed weight,
whatever the image size. The grid itself comes from deblur.core.tile_grid (torch-free), which the
ONNX runtime (deblur.artifact.onnx_model) shares.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deblur.core.config import TilingConfig
from deblur.core.tile_grid import RampKind, check_tiling_args, ramp_kind, tile_starts
from deblur.core.tile_grid import round_up as _round_up


@dataclass(frozen=True)
class Tile:
    image: int   # index in the batch of images
    y: int
    x: int
    row: int     # index into the row (y) starts
    col: int     # index into the column (x) starts


def feather_ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D blend weights of one tile: raised cosine over ``overlap`` pixels on the chosen sides."""
    weights = torch.ones(length, dtype=torch.float32)
    ramp_len = min(overlap, length // 2)
    if ramp_len == 0:
        return weights
    ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(ramp_len, dtype=torch.float32) + 0.5) / ramp_len)
    if ramp_start:
        weights[:ramp_len] = ramp
    if ramp_end:
        weights[length - ramp_len:] = ramp.flip(0)
    return weights


BatchCallback = Callable[[int, int, float], None]   # (tiles in the batch, pixels per tile, seconds)


def _axis_total(length: int, starts: list[int], tile_len: int, overlap: int) -> torch.Tensor:
    """Sum of the tiles' ramps over the whole axis."""
    total = torch.zeros(length, dtype=torch.float32)
    for i, start in enumerate(starts):
        ramp_start, ramp_end = ramp_kind(i, len(starts))
        total[start:start + tile_len] += feather_ramp(tile_len, overlap, ramp_start, ramp_end)
    return total


class BlendWeights:
    """2-D blend weights of a tile grid, built once per (row ramp kind, column ramp kind).

    ``cache`` holds at most 3 x 3 tensors of one tile each, whatever the number of tiles.
    """

    def __init__(self, tile_h: int, tile_w: int, rows: int, cols: int, overlap: int,
                 device: torch.device) -> None:
        self.tile_h, self.tile_w, self.rows, self.cols = tile_h, tile_w, rows, cols
        self.overlap, self.device = overlap, device
        self.cache: dict[tuple[RampKind, RampKind], torch.Tensor] = {}

    def tile(self, row: int, col: int) -> torch.Tensor:
        """Weights of the tile at grid position (``row``, ``col``), shape (tile_h, tile_w)."""
        key = ramp_kind(row, self.rows), ramp_kind(col, self.cols)
        if key not in self.cache:
            ramp_y = feather_ramp(self.tile_h, self.overlap, *key[0])
            ramp_x = feather_ramp(self.tile_w, self.overlap, *key[1])
            self.cache[key] = (ramp_y[:, None] * ramp_x[None, :]).to(self.device)
        return self.cache[key]


def _divide_by_total(output: torch.Tensor, total_y: torch.Tensor, total_x: torch.Tensor, strip_rows: int) -> None:
    """``output /= total_y[:, None] * total_x[None, :]`` in place, ``strip_rows`` rows of the product at a time."""
    height, width = output.shape[-2:]
    total_x = total_x[None, :width].to(output.device)
    for top in range(0, height, strip_rows):
        bottom = min(top + strip_rows, height)
        output[..., top:bottom, :] /= total_y[top:bottom, None].to(output.device) * total_x


def _batches(tiles: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
    for i in range(0, len(tiles), batch_size):
        yield tiles[i:i + batch_size]


def _cut_tile(image: torch.Tensor, index: int, y: int, x: int, tile_h: int, tile_w: int) -> torch.Tensor:
    """``image[index]`` at (y, x), reflect-padded at the bottom/right where the tile passes the border."""
    crop = image[index, :, y:y + tile_h, x:x + tile_w]
    pad_h, pad_w = tile_h - crop.shape[-2], tile_w - crop.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return crop
    mode = "reflect" if pad_h < crop.shape[-2] and pad_w < crop.shape[-1] else "replicate"
    return F.pad(crop.float().unsqueeze(0), (0, pad_w, 0, pad_h), mode=mode)[0].to(crop.dtype)


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for param in model.parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return torch.device("cpu"), torch.float32


def _as_float(tile: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tile.dtype == torch.uint8:
        return tile.to(dtype).div_(255.0)
    return tile.to(dtype)


def _check_args(image: torch.Tensor, tile_size: int, overlap: int, batch_size: int) -> None:
    check_tiling_args(tuple(image.shape), tile_size, overlap, batch_size)


def tiled_inference(
    model: torch.nn.Module,
    image: torch.Tensor,
    tile_size: int,
    overlap: int,
    batch_size: int,
    align: int | None = None,
    sampling: dict | None = None,
    on_batch: BatchCallback | None = None,
) -> torch.Tensor:
    """Deblur ``image`` (N,3,H,W; float in [0, 1] or uint8) tile by tile; returns float32 in [0, 1].

    ``align`` (default: the model's ``size_multiple``, else 1) is the grid tiles sit on;
    ``tile_size`` is rounded down to a multiple of it. The output lives on the model's
    device; tiles are cut from ``image`` where it lies and moved one batch at a time.
    A model with ``tiles_itself`` (the diffusion refiner: one noise tensor over the whole
    image) gets the whole image and the tile settings through its ``restore``, with the
    per-call ``sampling`` settings (seed, steps); other models refuse ``sampling``.
    ``on_batch(tiles, tile_pixels, seconds)`` is called after each tile batch (not for a
    model that tiles itself); it may raise to stop the work (a cancelled request).
    """
    _check_args(image, tile_size, overlap, batch_size)
    if getattr(model, "tiles_itself", False):
        return model.restore(image, tile_size, overlap, batch_size, **(sampling or {}))
    if sampling:
        raise ValueError(f"sampling settings {sorted(sampling)} apply to diffusion models only, "
                         f"not to a {type(model).__name__}")
    align = align or int(getattr(model, "size_multiple", 1))
    tile_size = max(align, tile_size // align * align)
    n, _, height, width = image.shape
    device, dtype = _model_device_dtype(model)
    padded_h, padded_w = _round_up(height, align), _round_up(width, align)
    tile_h, tile_w = min(tile_size, padded_h), min(tile_size, padded_w)
    ys, xs = tile_starts(padded_h, tile_size, overlap, align), tile_starts(padded_w, tile_size, overlap, align)
    total_y, total_x = _axis_total(padded_h, ys, tile_h, overlap), _axis_total(padded_w, xs, tile_w, overlap)
    blend = BlendWeights(tile_h, tile_w, len(ys), len(xs), overlap, device)
    tiles = [Tile(b, y, x, r, c) for b in range(n) for r, y in enumerate(ys) for c, x in enumerate(xs)]

    output = torch.zeros((n, 3, height, width), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for batch in _batches(tiles, batch_size):
            mark = time.perf_counter()
            crops = [_cut_tile(image, t.image, t.y, t.x, tile_h, tile_w) for t in batch]
            inputs = _as_float(torch.stack(crops).to(device), dtype)
            preds = model(inputs)
            if preds.shape != inputs.shape:
                raise RuntimeError(f"model returned shape {tuple(preds.shape)} for tiles of shape "
                                   f"{tuple(inputs.shape)}")
            for t, pred in zip(batch, preds.float()):
                valid_h, valid_w = min(tile_h, height - t.y), min(tile_w, width - t.x)
                weights = blend.tile(t.row, t.col)[:valid_h, :valid_w]
                output[t.image, :, t.y:t.y + valid_h, t.x:t.x + valid_w] += pred[:, :valid_h, :valid_w] * weights
            if on_batch is not None:
                on_batch(len(batch), tile_h * tile_w, time.perf_counter() - mark)
        _divide_by_total(output, total_y, total_x, tile_h)
        output.clamp_(0.0, 1.0)
    return output


def naive_tiled_inference(model: torch.nn.Module, image: torch.Tensor, tile_size: int, overlap: int) -> torch.Tensor:
    """Benchmark baseline only: one tile at a time, overlaps averaged uniformly, full weight buffer."""
    _check_args(image, tile_size, overlap, 1)
    n, _, height, width = image.shape
    device, dtype = _model_device_dtype(model)
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    output = torch.zeros((n, 3, height, width), dtype=torch.float32, device=device)
    weight = torch.zeros((1, 1, height, width), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for b in range(n):
            for y in tile_starts(height, tile_size, overlap):
                for x in tile_starts(width, tile_size, overlap):
                    crop = _as_float(image[b:b + 1, :, y:y + tile_h, x:x + tile_w].to(device), dtype)
                    output[b:b + 1, :, y:y + tile_h, x:x + tile_w] += model(crop).float()
                    weight[:, :, y:y + tile_h, x:x + tile_w] += 1.0
        output /= weight
        output.clamp_(0.0, 1.0)
    return output


def deblur_array(
    model: torch.nn.Module,
    rgb: np.ndarray,
    tiling: TilingConfig | tuple[int, int, int],
    sampling: dict | None = None,
    on_batch: BatchCallback | None = None,
) -> np.ndarray:
    """Deblur one HxWx3 uint8 RGB array; ``tiling`` is a TilingConfig or (tile_size, overlap, batch_size);
    ``sampling`` (seed, steps) goes to a diffusion model; ``on_batch``: see ``tiled_inference``."""
    if isinstance(tiling, TilingConfig):
        tile_size, overlap, batch_size = tiling.tile_size, tiling.overlap, tiling.batch_size
    else:
        tile_size, overlap, batch_size = tiling
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {rgb.dtype} {rgb.shape}")
    with warnings.catch_warnings():  # decoded images are read-only arrays; tiles are only read from them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)
    out = tiled_inference(model, image, tile_size, overlap, batch_size, sampling=sampling, on_batch=on_batch)
    out = out[0].mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).cpu()
    return np.ascontiguousarray(out.numpy())
