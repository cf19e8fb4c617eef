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
product of two 1-D sums, formed a strip of rows at a time for the division (a strip no larger
than one weight tile), so no full-size weight buffer is held. Along an axis a tile is the only one, the first, a
middle or the last, so there are at most 3 x 3 distinct 2-D weight tiles:
``BlendWeights`` builds each once, on first use, and reuses it. Tiles go through the
model ``batch_size`` at a time under ``torch.inference_mode``: peak memory is the output
buffer plus one tile batch, at most nine weight tiles and one strip of summed weight,
whatever the image size.

The grid, the tile cutter, the blend and the batch loop are deblur.core.tile_grid's (torch-free),
shared with the ONNX runtime (deblur.artifact.onnx_model), the admission cost model and the
diffusion refiner; this module supplies the torch parts: the model call, and the numpy weights
turned into tensors on the model's device once (``torch.from_numpy``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from deblur.core.config import TilingConfig
from deblur.core.tile_grid import BatchCallback, BlendWeights, TileGrid, check_tiling_args, run_tiles
from deblur.core.tile_grid import axis_total as _numpy_axis_total
from deblur.core.tile_grid import feather_ramp as _numpy_feather_ramp


def feather_ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """deblur.core.tile_grid.feather_ramp as a torch tensor: 1-D raised-cosine blend weights of one tile."""
    return torch.from_numpy(_numpy_feather_ramp(length, overlap, ramp_start, ramp_end))


def axis_total(length: int, starts: list[int], tile_len: int, overlap: int) -> torch.Tensor:
    """deblur.core.tile_grid.axis_total as a torch tensor: the sum of the tiles' ramps over one axis."""
    return torch.from_numpy(_numpy_axis_total(length, starts, tile_len, overlap))


def pad_tensor(crop: torch.Tensor, pad_h: int, pad_w: int, reflect: bool) -> torch.Tensor:
    """deblur.core.tile_grid.pad_numpy for a (C, h, w) tensor of any dtype."""
    mode = "reflect" if reflect else "replicate"
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
    check_tiling_args(tuple(image.shape), tile_size, overlap, batch_size)
    if getattr(model, "tiles_itself", False):
        return model.restore(image, tile_size, overlap, batch_size, **(sampling or {}))
    if sampling:
        raise ValueError(f"sampling settings {sorted(sampling)} apply to diffusion models only, "
                         f"not to a {type(model).__name__}")
    align = align or int(getattr(model, "size_multiple", 1))
    n, _, height, width = image.shape
    device, dtype = _model_device_dtype(model)
    grid = TileGrid.plan(height, width, tile_size, overlap, align)
    blend = BlendWeights(grid, lambda weights: torch.from_numpy(weights).to(device))

    def predict(crops: list[torch.Tensor]) -> torch.Tensor:
        return model(_as_float(torch.stack(crops).to(device), dtype)).float()

    output = torch.zeros((n, 3, height, width), dtype=torch.float32, device=device)
    with torch.inference_mode():
        run_tiles(grid, image, output, blend, batch_size, predict, on_batch, pad_tensor)
        blend.normalise(output)
        output.clamp_(0.0, 1.0)
    return output


def naive_tiled_inference(model: torch.nn.Module, image: torch.Tensor, tile_size: int, overlap: int) -> torch.Tensor:
    """Benchmark baseline only: one tile at a time, overlaps averaged uniformly, full weight buffer."""
    check_tiling_args(tuple(image.shape), tile_size, overlap, 1)
    n, _, height, width = image.shape
    device, dtype = _model_device_dtype(model)
    grid = TileGrid.plan(height, width, tile_size, overlap)
    tile_h, tile_w = grid.tile_h, grid.tile_w
    output = torch.zeros((n, 3, height, width), dtype=torch.float32, device=device)
    weight = torch.zeros((1, 1, height, width), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for b in range(n):
            for y in grid.y.starts:
                for x in grid.x.starts:
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
