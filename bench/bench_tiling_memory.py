"""Peak memory of tiled inference on large images: one weight tile per tile position vs a cache.

BEFORE is the implementation of ``deblur.inference.tiling.tiled_inference`` before issue #10 item 5,
kept below as ``tiled_inference_before``, a self-contained copy (it shares only the public grid
functions and the ramp formula of ``deblur.core.tile_grid``): it built one 2-D weight tile per tile
position.
AFTER is the package's ``tiled_inference``, which builds each distinct weight tile once
(``BlendWeights``, at most nine) and divides by the summed weight a strip of rows at a
time (BEFORE formed it full-size for the division). Each (image, implementation) runs in
a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own, with the server's
allocator settings (``deblur.service.MALLOC_ENV``), on a random uint8 image, through a
near-identity 1x1 convolution on a 16-pixel grid so the model adds little compute or
memory. Tiling is params.yaml's: tile 288, overlap 32, batch 1. Outputs of BEFORE and
AFTER are compared by SHA-256.

    nice python bench/bench_tiling_memory.py [--sizes 4096x4096 7744x5164] [--threads 2]

Writes bench/results/tiling_memory.json and bench/results/tiling_memory.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deblur.core.tile_grid import TileGrid, check_tiling_args, feather_ramp, round_up, tile_starts
from deblur.inference import tiling

RESULTS = Path(__file__).resolve().parent / "results"
TILE_SIZE, OVERLAP, BATCH_SIZE = 288, 32, 1


# --- BASELINE: the old implementation, a self-contained copy (only the public grid functions and the
# --- ramp formula of deblur.core.tile_grid are shared, so that both give the same pixels) -----------

@dataclass(frozen=True)
class Tile:
    image: int   # index in the batch of images
    y: int
    x: int
    row: int     # index into the row (y) starts
    col: int     # index into the column (x) starts


def _model_device_dtype_before(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for param in model.parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return torch.device("cpu"), torch.float32


def _cut_tile_before(image: torch.Tensor, index: int, y: int, x: int, tile_h: int, tile_w: int) -> torch.Tensor:
    """``image[index]`` at (y, x), reflect-padded at the bottom/right where the tile passes the border."""
    crop = image[index, :, y:y + tile_h, x:x + tile_w]
    pad_h, pad_w = tile_h - crop.shape[-2], tile_w - crop.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return crop
    mode = "reflect" if pad_h < crop.shape[-2] and pad_w < crop.shape[-1] else "replicate"
    return F.pad(crop.float().unsqueeze(0), (0, pad_w, 0, pad_h), mode=mode)[0].to(crop.dtype)


def _axis_weights_before(length: int, starts: list[int], tile_len: int,
                         overlap: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-tile ramps along one axis and their sum."""
    ramps = [
        torch.from_numpy(feather_ramp(tile_len, overlap, ramp_start=i > 0, ramp_end=i < len(starts) - 1))
        for i in range(len(starts))
    ]
    total = torch.zeros(length, dtype=torch.float32)
    for start, ramp in zip(starts, ramps):
        total[start:start + tile_len] += ramp
    return ramps, total


def tiled_inference_before(model: torch.nn.Module, image: torch.Tensor, tile_size: int, overlap: int,
                           batch_size: int, align: int | None = None) -> torch.Tensor:
    """``blend`` holds one 2-D weight tile per tile position; the summed weight is formed full-size."""
    check_tiling_args(tuple(image.shape), tile_size, overlap, batch_size)
    align = align or int(getattr(model, "size_multiple", 1))
    tile_size = max(align, tile_size // align * align)
    n, _, height, width = image.shape
    device, dtype = _model_device_dtype_before(model)
    padded_h, padded_w = round_up(height, align), round_up(width, align)
    tile_h, tile_w = min(tile_size, padded_h), min(tile_size, padded_w)
    ys, xs = tile_starts(padded_h, tile_size, overlap, align), tile_starts(padded_w, tile_size, overlap, align)
    ramps_y, total_y = _axis_weights_before(padded_h, ys, tile_h, overlap)
    ramps_x, total_x = _axis_weights_before(padded_w, xs, tile_w, overlap)
    blend = [[(ry[:, None] * rx[None, :]).to(device) for rx in ramps_x] for ry in ramps_y]
    tiles = [Tile(b, y, x, r, c) for b in range(n) for r, y in enumerate(ys) for c, x in enumerate(xs)]

    output = torch.zeros((n, 3, height, width), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for first in range(0, len(tiles), batch_size):
            batch = tiles[first:first + batch_size]
            crops = [_cut_tile_before(image, t.image, t.y, t.x, tile_h, tile_w) for t in batch]
            inputs = torch.stack(crops).to(device)
            inputs = inputs.to(dtype).div_(255.0) if inputs.dtype == torch.uint8 else inputs.to(dtype)
            preds = model(inputs)
            if preds.shape != inputs.shape:
                raise RuntimeError(f"model returned shape {tuple(preds.shape)} for tiles of shape "
                                   f"{tuple(inputs.shape)}")
            for t, pred in zip(batch, preds.float()):
                valid_h, valid_w = min(tile_h, height - t.y), min(tile_w, width - t.x)
                weights = blend[t.row][t.col][:valid_h, :valid_w]
                output[t.image, :, t.y:t.y + valid_h, t.x:t.x + valid_w] += pred[:, :valid_h, :valid_w] * weights
        output /= (total_y[:height, None] * total_x[None, :width]).to(device)
        output.clamp_(0.0, 1.0)
    return output


# --- the measurement -------------------------------------------------------------------------------

class PointwiseModel(nn.Module):
    """A near-identity 1x1 convolution on the U-Nets' 16-pixel grid: tiling cost, not model cost."""

    size_multiple = 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_((0.9 * torch.eye(3) + 0.03).view(3, 3, 1, 1))
            self.conv.bias.fill_(0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def rss_mb() -> float:
    """Current resident set of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def grid(height: int, width: int, align: int) -> tuple[int, int, int, int]:
    """Tile rows, columns and tile height, width of the tiling used here."""
    tiles = TileGrid.plan(height, width, TILE_SIZE, OVERLAP, align)
    return tiles.rows, tiles.cols, tiles.tile_h, tiles.tile_w


def measure(implementation: str, height: int, width: int, threads: int) -> dict:
    """One run in this (fresh) process: peak RSS, time, weight-tile bytes and an output digest."""
    torch.set_num_threads(threads)
    model = PointwiseModel().eval()
    held: list[tiling.BlendWeights] = []

    class RecordedBlendWeights(tiling.BlendWeights):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            held.append(self)

    tiling.BlendWeights = RecordedBlendWeights
    run = tiled_inference_before if implementation == "before" else tiling.tiled_inference
    run(model, torch.zeros((1, 3, 64, 64), dtype=torch.uint8), TILE_SIZE, OVERLAP, BATCH_SIZE)
    held.clear()
    image = torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rss_before = rss_mb()
    started = time.perf_counter()
    output = run(model, image, TILE_SIZE, OVERLAP, BATCH_SIZE)
    seconds = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows, cols, tile_h, tile_w = grid(height, width, model.size_multiple)
    if implementation == "before":
        weight_tiles, weight_bytes = rows * cols, rows * cols * tile_h * tile_w * 4
        total_weight_rows = height
    else:
        (blend,) = held
        weight_tiles = len(blend.cache)
        weight_bytes = sum(weights.nbytes for weights in blend.cache.values())
        total_weight_rows = blend.strip_rows
    return {
        "implementation": implementation, "image": f"{width}x{height}", "megapixels": round(width * height / 1e6, 1),
        "tiles": rows * cols, "grid": f"{rows}x{cols}", "seconds": round(seconds, 2),
        "rss_before_inference_mb": round(rss_before, 1), "peak_rss_mb": round(peak_rss, 1),
        "input_mb": round(image.nbytes / 2**20, 1), "output_buffer_mb": round(output.nbytes / 2**20, 1),
        "weight_tiles": weight_tiles, "weight_tile_mb": round(weight_bytes / 2**20, 1),
        "summed_weight_mb": round(total_weight_rows * width * 4 / 2**20, 1),
        "overhead_mb": round(peak_rss - rss_before - output.nbytes / 2**20, 1),
        "output_sha256": hashlib.sha256(output.numpy()).hexdigest(),
    }


def run_in_subprocess(implementation: str, height: int, width: int, threads: int) -> dict:
    from deblur.service.server import MALLOC_ENV

    command = [sys.executable, __file__, "--worker", implementation, "--sizes", f"{width}x{height}",
               "--threads", str(threads)]
    done = subprocess.run(command, env={**MALLOC_ENV, **os.environ}, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Tiled inference memory", "",
             "Written by bench/bench_tiling_memory.py. Tile 288, overlap 32, batch 1, uint8 input, a 1x1 "
             "convolution on a 16-pixel grid as the model; each run in a fresh process. Before: one weight "
             "tile per tile position (the old implementation, kept in the bench). After: `BlendWeights`, "
             "each distinct weight tile built once, and the summed weight formed a strip of rows at a time "
             "(no larger than one weight tile) for the final division (before: one full-size H x W temporary). "
             "Overhead: peak RSS minus RSS "
             "before inference minus the output buffer. MB = 2^20 bytes.", "",
             f"{m['cpus']} CPUs, {m['threads']} torch threads, torch {m['torch']}, load average at start "
             f"{m['load_avg_at_start']}, {result['when']}.", "",
             "| image | tiles | input MB | output buffer MB | weight tiles before / after "
             "| summed-weight temporary MB before / after | peak RSS before / after MB | overhead before / after MB "
             "| saved MB | seconds before / after | outputs identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        before, after = row["before"], row["after"]
        lines.append(
            f"| {before['image']} ({before['megapixels']} MP) | {before['tiles']} ({before['grid']}) "
            f"| {before['input_mb']} | {before['output_buffer_mb']} "
            f"| {before['weight_tiles']}: {before['weight_tile_mb']} MB / {after['weight_tiles']}: "
            f"{after['weight_tile_mb']} MB | {before['summed_weight_mb']} / {after['summed_weight_mb']} "
            f"| {before['peak_rss_mb']} / {after['peak_rss_mb']} | {before['overhead_mb']} / {after['overhead_mb']} "
            f"| {round(before['peak_rss_mb'] - after['peak_rss_mb'], 1)} | {before['seconds']} / {after['seconds']} "
            f"| {'yes' if row['identical'] else 'NO'} |")
    lines += ["", "RSS before inference (image and model loaded), before / after: "
              + "; ".join(f"{r['before']['image']} {r['before']['rss_before_inference_mb']} / "
                          f"{r['after']['rss_before_inference_mb']} MB" for r in result["rows"]) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Peak RSS of tiled inference, per-tile weights vs cached.")
    parser.add_argument("--sizes", nargs="+", default=["4096x4096", "7744x5164"], help="WIDTHxHEIGHT")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (params.yaml serving)")
    parser.add_argument("--worker", choices=["before", "after"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "tiling_memory.json")
    args = parser.parse_args(argv)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes]
    if args.worker:
        (width, height), = sizes
        print(json.dumps(measure(args.worker, height, width, args.threads)), flush=True)
        return 0
    result = {
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tiling": {"tile_size": TILE_SIZE, "overlap": OVERLAP, "batch_size": BATCH_SIZE},
        "rows": [],
    }
    for width, height in sizes:
        before = run_in_subprocess("before", height, width, args.threads)
        after = run_in_subprocess("after", height, width, args.threads)
        identical = before.pop("output_sha256") == after.pop("output_sha256")
        result["rows"].append({"before": before, "after": after, "identical": identical})
        print(json.dumps(result["rows"][-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0 if all(row["identical"] for row in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
