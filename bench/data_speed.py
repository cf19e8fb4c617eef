"""Speed of the data code on this machine: dead leaves, kernel sampling, blur application, and
on-the-fly training samples per second in one process (one DataLoader worker), the number that
says how many workers a GPU needs (documentation/data.md).

    python bench/data_speed.py --params params.yaml --out bench/results/data_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deblur.core.config import BLUR_TYPES, load_params
from deblur.data.blur import apply_blur, sample_blur
from deblur.data.datasets import OnTheFlyPatches
from deblur.data.deadleaves import dead_leaves
from deblur.core.imageio import write_png


def per_call_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return round(1000 * (time.perf_counter() - start) / repeats, 2)


def on_the_fly_rates(params, rng, samples: int = 40) -> dict[str, float]:
    """Training samples (crop + fresh blur + augment) per second, one process, one thread, per patch size."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(4):
            paths.append(Path(tmp) / f"sharp{i}.png")
            write_png(paths[-1], dead_leaves(rng, params.ingest.embedded.dead_leaves, size=512))
        rates = {}
        for patch in (128, 256):
            data = OnTheFlyPatches(paths, params.synthesize, patch, seed=0, length=samples + 4)
            data[0]  # decode and cache the images first
            start = time.perf_counter()
            for i in range(1, samples + 1):
                data[i]
            rates[str(patch)] = round(samples / (time.perf_counter() - start), 1)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    rng = np.random.default_rng(0)
    leaves = params.ingest.embedded.dead_leaves
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "dead_leaves_ms": {str(s): per_call_ms(lambda s=s: dead_leaves(rng, leaves, size=s), 5)
                                  for s in (256, 512)}}
    frame = dead_leaves(rng, leaves, size=256)
    frame_720p = np.tile(frame, (3, 5, 1))[:720, :1280]
    for blur_type in BLUR_TYPES:
        spec = sample_blur(rng, params.synthesize, blur_type)
        cfg = params.synthesize
        results[f"{blur_type}_sample_kernel_ms"] = per_call_ms(lambda t=blur_type: sample_blur(rng, cfg, t), 20)
        results[f"{blur_type}_apply_720p_ms"] = per_call_ms(lambda s=spec: apply_blur(frame_720p, s, cfg, rng), 3)
        results[f"{blur_type}_kernel_side"] = int(spec.kernel.shape[-1])
    results["on_the_fly_samples_per_s"] = on_the_fly_rates(params, rng)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
