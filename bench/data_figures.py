"""Figures for documentation/data.md: example kernels of every blur type, dead leaves with depth of field.

    python bench/data_figures.py --params params.yaml --out documentation/img

Deterministic (fixed seeds); rerun after changing the blur or dead-leaves code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from deblur.core.config import BLUR_TYPES, load_params
from deblur.data.blur import apply_blur, kernel_image, sample_blur
from deblur.data.deadleaves import dead_leaves, default_palette
from deblur.core.imageio import write_png
from deblur.core.viz import contact_sheet

KERNELS_PER_TYPE = 6


def kernel_gallery(params) -> np.ndarray:
    """One line per blur type: example kernels, each scaled to the same box (not to scale)."""
    rng = np.random.default_rng(2025)
    lines, labels = [], []
    for blur_type in BLUR_TYPES:
        specs = [sample_blur(rng, params.synthesize, blur_type) for _ in range(KERNELS_PER_TYPE)]
        lines.append([kernel_image(s.kernel, 96) for s in specs])
        labels.append([f"{blur_type} {s.kernel.shape[-1]}px" for s in specs])
    return contact_sheet(lines, labels, height=96)


def dead_leaves_gallery(params) -> np.ndarray:
    """Dead leaves at soft_fraction 0, 0.5 and 1 (same shapes), and each blur type applied to one."""
    cfg = params.ingest.embedded.dead_leaves
    palette = default_palette(np.random.default_rng(0))
    images, names = [], []
    for soft in (0.0, 0.5, 1.0):
        images.append(dead_leaves(np.random.default_rng(11), cfg.model_copy(update={"soft_fraction": soft}), palette))
        names.append(f"soft_fraction {soft}")
    sharp = images[1]
    rng = np.random.default_rng(3)
    blurred = [apply_blur(sharp, sample_blur(rng, params.synthesize, t), params.synthesize, rng) for t in BLUR_TYPES]
    return contact_sheet([images, blurred], [names, [f"{t} (of soft_fraction 0.5)" for t in BLUR_TYPES]], height=176)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    write_png(args.out / "blur_kernels.png", kernel_gallery(params))
    write_png(args.out / "dead_leaves.png", dead_leaves_gallery(params))


if __name__ == "__main__":
    main()
