"""Where the tiles of a tiled inference go, and their blend weights: pure Python and numpy, no torch.

Shared by both serving runtimes: deblur.inference.tiling (torch) takes the tile grid from here, and
deblur.artifact.onnx_model (ONNX Runtime, no torch installed) takes the grid and the weights. The
semantics are described in deblur.inference.tiling's module docstring.
"""

from __future__ import annotations

import math

import numpy as np

RampKind = tuple[bool, bool]  # (ramps at the start, ramps at the end) of a tile along one axis


def tile_starts(length: int, tile_size: int, overlap: int, align: int = 1) -> list[int]:
    """Starts of tiles covering ``[0, length)``: multiples of ``align``, evenly spread, sharing at
    least ``overlap`` pixels; ``length`` and ``tile_size`` must be multiples of ``align``."""
    if length <= tile_size:
        return [0]
    max_stride = (tile_size - overlap) // align * align
    if max_stride <= 0:
        raise ValueError(f"tile_size {tile_size} minus overlap {overlap} leaves no stride on a grid of {align}")
    span = length - tile_size
    count = math.ceil(span / max_stride) + 1
    return [round(i * span / (count - 1) / align) * align for i in range(count)]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def ramp_kind(index: int, count: int) -> RampKind:
    """Sides of tile ``index`` of ``count`` along an axis that face a neighbour."""
    return index > 0, index < count - 1


def check_tiling_args(shape: tuple[int, ...], tile_size: int, overlap: int, batch_size: int) -> None:
    """``shape`` is (N, 3, H, W); raises ValueError naming the bad value."""
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"expected an image tensor of shape (N, 3, H, W), got {tuple(shape)}")
    if tile_size < 1 or batch_size < 1 or overlap < 0:
        raise ValueError(f"tile_size and batch_size must be >= 1 and overlap >= 0 "
                         f"(got {tile_size}, {batch_size}, {overlap})")
    if 2 * overlap >= tile_size:
        raise ValueError(f"overlap {overlap} must be less than half of tile_size {tile_size}")


def feather_ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """1-D float32 blend weights of one tile: raised cosine over ``overlap`` pixels on the chosen
    sides (numpy twin of deblur.inference.tiling.feather_ramp, equal to it within one float32 ulp)."""
    weights = np.ones(length, dtype=np.float32)
    ramp_len = min(overlap, length // 2)
    if ramp_len == 0:
        return weights
    steps = (np.arange(ramp_len, dtype=np.float32) + np.float32(0.5)) / np.float32(ramp_len)
    ramp = np.float32(0.5) - np.float32(0.5) * np.cos(np.float32(math.pi) * steps)
    if ramp_start:
        weights[:ramp_len] = ramp
    if ramp_end:
        weights[length - ramp_len:] = ramp[::-1]
    return weights


def axis_total(length: int, starts: list[int], tile_len: int, overlap: int) -> np.ndarray:
    """Sum of the tiles' ramps over the whole axis (float32)."""
    total = np.zeros(length, dtype=np.float32)
    for i, start in enumerate(starts):
        total[start:start + tile_len] += feather_ramp(tile_len, overlap, *ramp_kind(i, len(starts)))
    return total
