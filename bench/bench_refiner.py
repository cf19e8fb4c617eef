"""CPU cost of the diffusion refiner: seconds per megapixel by sampling steps and unshuffle factor.

Times ``deblur.inference.tiling.deblur_array`` (the path of evaluate and the HTTP service: the predictor
tiled, then whole-image sampling with the UNet tiled inside each step) on one photo-like
image, for each unshuffle factor and step count, beside the predictor alone in the same run.
The UNet is params.yaml's ``model.diffusion_refiner`` with random weights (speed does not
depend on them); the predictor is its ``predictor`` checkpoint (the shipped NAFNet-16).
Each cell is the best of ``--repeats`` runs in CPU seconds of this process (``time.process_time``):
on one thread that is the single-core cost, which other jobs on a shared machine barely change
(wall time there measures the scheduler's share instead).

    nice python bench/bench_refiner.py [--size 512] [--steps 1 2 4 8] [--unshuffle 1 2 4] [--threads 1]

Writes bench/results/refiner_speed.json and bench/results/refiner_speed.md.

With ``--figure CHECKPOINT --pairs DIR`` it instead draws documentation/img/refiner_crops.png
from a trained refiner: for the first test pair of each blur type, a centre crop of blurred /
predictor alone / refiner / sharp, each with its whole-image PSNR; and it prints how far tiled
sampling (tiling from params) is from whole-image sampling on those images, in dB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from deblur.core.config import load_params
from deblur.models.build import build_model
from deblur.inference.tiling import deblur_array

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def photo_like(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([x, y, 0.5 + 0.5 * np.sin(20 * (x + y))], axis=2) + 0.05 * rng.standard_normal((size, size, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def best_seconds(fn, repeats: int) -> float:
    """Fewest CPU seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def figure(checkpoint: Path, pairs: Path, params_path: Path, out: Path, crop: int = 128) -> dict:
    """Crops of blurred / predictor / refiner / sharp for one test pair per blur type, and tiled-vs-whole dB."""
    from deblur.models.build import model_from_checkpoint
    from deblur.data.pairs import read_pairs
    from deblur.core.imageio import read_rgb, write_png
    from deblur.evaluation.metrics import psnr
    from deblur.core.viz import hstack, vstack

    params = load_params(params_path)
    model = model_from_checkpoint(checkpoint)
    first = {}
    for rec in read_pairs(pairs, "test"):
        first.setdefault(rec.blur_type, rec)
    rows, report = [], {}
    for blur_type, rec in sorted(first.items()):
        blurred, sharp = read_rgb(rec.blur_path), read_rgb(rec.clear_path)
        alone = deblur_array(model.predictor, blurred, params.tiling)
        refined = deblur_array(model, blurred, params.tiling)
        whole = deblur_array(model, blurred, (max(blurred.shape[:2]) + 64, 0, 1))   # one tile: no tiling at all
        report[blur_type] = {"id": rec.id, "input_psnr": psnr(blurred, sharp), "predictor_psnr": psnr(alone, sharp),
                             "refiner_psnr": psnr(refined, sharp), "tiled_vs_whole_psnr": psnr(refined, whole)}
        h, w = sharp.shape[:2]
        y0, x0 = (h - crop) // 2, (w - crop) // 2
        cut = lambda im: im[y0:y0 + crop, x0:x0 + crop]
        r = report[blur_type]
        rows.append(hstack([cut(blurred), cut(alone), cut(refined), cut(sharp)], 192,
                           [f"{blur_type}: blurred {r['input_psnr']:.1f}", f"predictor {r['predictor_psnr']:.1f}",
                            f"refiner {r['refiner_psnr']:.1f}", "sharp"]))
    write_png(out, vstack(rows))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--size", type=int, default=512, help="square test image side in px")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--unshuffle", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "refiner_speed")
    parser.add_argument("--figure", type=Path, default=None, help="a trained refiner checkpoint: draw the crops figure")
    parser.add_argument("--pairs", type=Path, default=ROOT / "data" / "pairs", help="synthesize output (with --figure)")
    parser.add_argument("--figure-png", type=Path, default=ROOT / "documentation" / "img" / "refiner_crops.png")
    args = parser.parse_args(argv)
    if args.figure is not None:
        torch.set_num_threads(args.threads)
        report = figure(args.figure, args.pairs, args.params, args.figure_png)
        print(json.dumps(report, indent=2))
        return 0

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    tiling = params.tiling
    image = photo_like(args.size)
    megapixels = args.size * args.size / 1e6
    rows = []
    for factor in args.unshuffle:
        cfg = params.model.model_copy(update={"name": "diffusion_refiner", "diffusion_refiner":
                                              params.model.diffusion_refiner.model_copy(update={"unshuffle": factor})})
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        if not rows:
            predictor_s = best_seconds(lambda: deblur_array(model.predictor, image, tiling), args.repeats)
            rows.append({"model": "predictor alone", "unshuffle": None, "steps": 0, "seconds": predictor_s,
                         "s_per_mp": predictor_s / megapixels})
            print(f"predictor alone: {predictor_s:.2f} s ({predictor_s / megapixels:.1f} s/MP)", flush=True)
        for steps in args.steps:
            seconds = best_seconds(lambda: deblur_array(model, image, tiling, sampling={"steps": steps}), args.repeats)
            rows.append({"model": "refiner", "unshuffle": factor, "steps": steps, "seconds": seconds,
                         "s_per_mp": seconds / megapixels, "over_predictor_s_per_mp": (seconds - predictor_s) / megapixels})
            print(f"unshuffle {factor}, {steps} steps: {seconds:.2f} s ({seconds / megapixels:.1f} s/MP)", flush=True)

    unet = params.model.diffusion_refiner
    meta = {"image": f"{args.size}x{args.size}", "threads": args.threads, "repeats": args.repeats,
            "tiling": tiling.model_dump(), "unet": {"block_out_channels": list(unet.block_out_channels),
                                                    "layers_per_block": unet.layers_per_block},
            "predictor": unet.predictor, "sampler": unet.sampler, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "load_average": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Diffusion refiner: CPU seconds per megapixel ({meta['image']}, {args.threads} thread(s), "
             f"best of {args.repeats}, process CPU time)", "",
             f"UNet {meta['unet']['block_out_channels']} x {meta['unet']['layers_per_block']} layer(s), "
             f"sampler {meta['sampler']}, tiling {tiling.tile_size}/{tiling.overlap}; predictor {meta['predictor']}. "
             f"Load average at the end: {', '.join(f'{v:.1f}' for v in meta['load_average'])} "
             "(a shared machine: compare rows of this run only).", "",
             "| model | unshuffle | steps | CPU s per image | CPU s/MP | CPU s/MP above the predictor |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        extra = f"{r['over_predictor_s_per_mp']:.1f}" if "over_predictor_s_per_mp" in r else "-"
        lines.append(f"| {r['model']} | {r['unshuffle'] or '-'} | {r['steps'] or '-'} | {r['seconds']:.2f} | "
                     f"{r['s_per_mp']:.1f} | {extra} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
