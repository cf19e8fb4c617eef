"""Tiled inference in one place: where the tiles go, how they are cut and how their predictions blend.

Pure Python and numpy, no torch. ``TileGrid.plan`` describes the grid once (padded size, tile size
and tile starts per axis, each axis' raised-cosine ramps and their sum); ``BlendWeights`` gives the
2-D weights of a tile position and adds a prediction into the output, then divides by the summed
weight; ``TileGrid.cut`` cuts a tile and ``run_tiles`` is the batch loop. They work on numpy arrays
and torch tensors alike (slicing, ``+=``, ``/=``; an edge tile is padded by ``pad_numpy`` or its
torch twin, the one library call that differs), so both runners share them:
deblur.inference.tiling (torch; it converts the numpy weights once with ``torch.from_numpy``) and
deblur.artifact.onnx_model (ONNX Runtime, no torch installed). The admission cost model
(deblur.inference.cost_model) plans with the same grid, and the diffusion refiner tiles its UNet
calls on it. The semantics are described in deblur.inference.tiling's module docstring.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from deblur.core.config import check_overlap   # the overlap rule lives with TilingConfig

RampKind = tuple[bool, bool]  # (ramps at the start, ramps at the end) of a tile along one axis
BatchCallback = Callable[[int, int, float], None]   # (tiles in the batch, pixels per tile, seconds)
PadTile = Callable[[Any, int, int, bool], Any]   # (crop (..., h, w), rows, columns to add at the end, reflect)


def check_tiling_args(shape: tuple[int, ...], tile_size: int, overlap: int, batch_size: int) -> None:
    """``shape`` is (N, 3, H, W); raises ValueError naming the bad value."""
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"expected an image tensor of shape (N, 3, H, W), got {tuple(shape)}")
    if tile_size < 1 or batch_size < 1 or overlap < 0:
        raise ValueError(f"tile_size and batch_size must be >= 1 and overlap >= 0 "
                         f"(got {tile_size}, {batch_size}, {overlap})")
    check_overlap(tile_size, overlap)


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


def feather_ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """1-D float32 blend weights of one tile: raised cosine over ``overlap`` pixels on the chosen sides."""
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


def axis_total(length: int, starts: Sequence[int], tile_len: int, overlap: int) -> np.ndarray:
    """Sum of the tiles' ramps over the whole axis (float32)."""
    total = np.zeros(length, dtype=np.float32)
    for i, start in enumerate(starts):
        total[start:start + tile_len] += feather_ramp(tile_len, overlap, *ramp_kind(i, len(starts)))
    return total


def pad_numpy(crop: np.ndarray, pad_h: int, pad_w: int, reflect: bool) -> np.ndarray:
    """``crop`` padded by ``pad_h`` rows at the bottom and ``pad_w`` columns at the right: mirrored without
    repeating the edge (``reflect``), else the edge repeated (``TileGrid.cut`` chooses)."""
    widths = [(0, 0)] * (crop.ndim - 2) + [(0, pad_h), (0, pad_w)]
    return np.pad(crop, widths, mode="reflect" if reflect else "edge")


@dataclass(frozen=True)
class TileAxis:
    """The tiles along one axis of an image."""

    length: int               # image pixels
    padded: int               # ``length`` rounded up to the grid: edge tiles are padded past the image
    tile: int                 # tile length: the tile size, or the padded length when that is shorter
    overlap: int
    starts: tuple[int, ...]   # on the grid; the last tile ends at ``padded``

    @classmethod
    def plan(cls, length: int, tile_size: int, overlap: int, align: int) -> "TileAxis":
        """``tile_size`` must be a multiple of ``align``."""
        padded = round_up(length, align)
        starts = tuple(tile_starts(padded, tile_size, overlap, align))
        return cls(length, padded, min(tile_size, padded), overlap, starts)

    def ramp(self, index: int) -> np.ndarray:
        """Blend weights of tile ``index`` along this axis (one array per ramp kind, shared)."""
        return self._ramps[ramp_kind(index, len(self.starts))]

    @cached_property
    def _ramps(self) -> dict[RampKind, np.ndarray]:
        kinds = {ramp_kind(i, len(self.starts)) for i in range(len(self.starts))}
        return {kind: feather_ramp(self.tile, self.overlap, *kind) for kind in kinds}

    @cached_property
    def total(self) -> np.ndarray:
        """Summed weight over the padded axis (float32)."""
        return axis_total(self.padded, self.starts, self.tile, self.overlap)

    def valid(self, start: int) -> int:
        """Pixels of the tile at ``start`` that lie inside the image."""
        return min(self.tile, self.length - start)


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one ``height`` x ``width`` image: a Cartesian product of two ``TileAxis``."""

    y: TileAxis
    x: TileAxis

    @classmethod
    def plan(cls, height: int, width: int, tile_size: int, overlap: int, align: int = 1) -> "TileGrid":
        """``tile_size`` is rounded down to a multiple of ``align`` (at least ``align``)."""
        tile_size = max(align, tile_size // align * align)
        return cls(TileAxis.plan(height, tile_size, overlap, align), TileAxis.plan(width, tile_size, overlap, align))

    @property
    def tile_h(self) -> int:
        return self.y.tile

    @property
    def tile_w(self) -> int:
        return self.x.tile

    @property
    def rows(self) -> int:
        return len(self.y.starts)

    @property
    def cols(self) -> int:
        return len(self.x.starts)

    @property
    def count(self) -> int:
        """Tiles per image."""
        return self.rows * self.cols

    def cut(self, image: Any, row: int, col: int, pad: PadTile | None = None) -> Any:
        """Tile (``row``, ``col``) of ``image`` (..., H, W): a view of the image, except for an edge tile that
        passes its bottom/right border, which ``pad`` (``pad_numpy``, or the torch runner's twin) pads there
        as the models pad themselves: reflect, or replicate where the image is too short to mirror."""
        y, x = self.y.starts[row], self.x.starts[col]
        crop = image[..., y:y + self.tile_h, x:x + self.tile_w]
        crop_h, crop_w = crop.shape[-2:]
        pad_h, pad_w = self.tile_h - crop_h, self.tile_w - crop_w
        if pad_h == 0 and pad_w == 0:
            return crop
        return (pad or pad_numpy)(crop, pad_h, pad_w, pad_h < crop_h and pad_w < crop_w)


class BlendWeights:
    """Feathered blending on a tile grid: 2-D weights built once per (row ramp kind, column ramp kind).

    ``cache`` holds at most 3 x 3 weight tiles, whatever the number of tiles, made from the grid's
    per-axis ramps and handed to ``to_array`` (e.g. ``torch.from_numpy`` and a move to the device);
    the summed weight is the outer product of the per-axis sums, formed a strip of rows at a time,
    each strip no larger than a weight tile (so it fits where the tile loop's temporaries were).
    """

    def __init__(self, grid: TileGrid, to_array: Callable[[np.ndarray], Any] = np.asarray) -> None:
        self.grid, self.to_array = grid, to_array
        self.tile_h, self.tile_w = grid.tile_h, grid.tile_w
        self.cache: dict[tuple[RampKind, RampKind], Any] = {}

    def tile(self, row: int, col: int) -> Any:
        """Weights of the tile at grid position (``row``, ``col``), shape (tile_h, tile_w)."""
        key = ramp_kind(row, self.grid.rows), ramp_kind(col, self.grid.cols)
        if key not in self.cache:
            self.cache[key] = self.to_array(self.grid.y.ramp(row)[:, None] * self.grid.x.ramp(col)[None, :])
        return self.cache[key]

    def add(self, output: Any, pred: Any, row: int, col: int) -> None:
        """``output`` (..., H, W) += ``pred`` (..., tile_h, tile_w) times its weights, inside the image."""
        y, x = self.grid.y.starts[row], self.grid.x.starts[col]
        valid_h, valid_w = self.grid.y.valid(y), self.grid.x.valid(x)
        weights = self.tile(row, col)[:valid_h, :valid_w]
        output[..., y:y + valid_h, x:x + valid_w] += pred[..., :valid_h, :valid_w] * weights

    @property
    def strip_rows(self) -> int:
        """Rows of the summed weight that ``normalise`` forms at a time: a strip no larger than a weight tile."""
        return max(1, self.tile_h * self.tile_w // self.grid.x.length)

    def normalise(self, output: Any) -> None:
        """``output`` (..., H, W) /= the summed weight, in place, ``strip_rows`` rows of it at a time."""
        height, width = self.grid.y.length, self.grid.x.length
        total_y, total_x = self.to_array(self.grid.y.total), self.to_array(self.grid.x.total[None, :width])
        for top in range(0, height, self.strip_rows):
            bottom = min(top + self.strip_rows, height)
            output[..., top:bottom, :] /= total_y[top:bottom, None] * total_x


def run_tiles(grid: TileGrid, images: Any, output: Any, blend: BlendWeights, batch_size: int,
              predict: Callable[[list], Any], on_batch: BatchCallback | None = None,
              pad: PadTile | None = None) -> None:
    """The tile loop of both runners: cut the tiles of ``images`` (N, C, H, W), ``batch_size`` at a time
    (edge tiles padded by ``pad``: see ``TileGrid.cut``), ``predict`` each batch (a list of (C, tile_h,
    tile_w) tiles to float32 predictions of the same shape) and add them into ``output`` (N, C, H, W)
    with their weights; ``on_batch(tiles, tile_pixels, seconds)`` after each batch may raise to stop.
    ``blend.normalise(output)`` finishes."""
    tiles = [(b, row, col) for b in range(len(images)) for row in range(grid.rows) for col in range(grid.cols)]
    for first in range(0, len(tiles), batch_size):
        batch = tiles[first:first + batch_size]
        mark = time.perf_counter()
        crops = [grid.cut(images[b], row, col, pad) for b, row, col in batch]
        preds = predict(crops)
        shape = (len(crops), *crops[0].shape)
        if tuple(preds.shape) != shape:
            raise RuntimeError(f"model returned shape {tuple(preds.shape)} for tiles of shape {shape}")
        for (b, row, col), pred in zip(batch, preds):
            blend.add(output[b], pred, row, col)
        if on_batch is not None:
            on_batch(len(batch), grid.tile_h * grid.tile_w, time.perf_counter() - mark)
