"""Whole-image evaluation on the test split, with references beside every number.

For each test pair: the model's output (tiled inference, the same code as the HTTP
service), the blurred input itself, and, where the PSF is known, a classical
non-blind deconvolution (Richardson-Lucy or Wiener from scikit-image, in linear light).
The sharp-in check runs unblurred test photos through the model: a good deblurrer leaves
them almost unchanged.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from skimage import restoration

from deblur.config import EvaluateConfig, TilingConfig
from deblur.data.pairs import PairRecord
from deblur.imageio import read_rgb
from deblur.metrics import psnr, ssim
from deblur.progress import progress
from deblur.tiling import deblur_array

METHODS = ("model", "input", "baseline")
METHOD_LABELS = {"model": "model", "input": "blurred input", "baseline": "classical (true PSF)"}


@dataclass
class ImageResult:
    id: str
    blur_type: str
    scores: dict[str, float]          # e.g. model_psnr, input_ssim, baseline_psnr
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


@dataclass
class EvalResult:
    images: list[ImageResult]
    sharp_in_psnr: list[float]

    def summary(self) -> dict:
        """metrics.json content: overall, per blur type, sharp-in."""
        def mean_scores(rows: list[ImageResult]) -> dict[str, float]:
            keys = sorted({k for r in rows for k in r.scores})
            return {k: round(float(np.mean([r.scores[k] for r in rows if k in r.scores])), 4) for k in keys}

        by_type: dict[str, list[ImageResult]] = defaultdict(list)
        for r in self.images:
            by_type[r.blur_type].append(r)
        overall = mean_scores(self.images)
        overall["gain_over_input_db"] = round(overall["model_psnr"] - overall["input_psnr"], 4)
        out = {
            "n_images": len(self.images),
            "overall": overall,
            "per_blur_type": {t: {"n": len(rows), **mean_scores(rows)} for t, rows in sorted(by_type.items())},
        }
        if self.sharp_in_psnr:
            out["sharp_in"] = {"n": len(self.sharp_in_psnr), "psnr": round(float(np.mean(self.sharp_in_psnr)), 4),
                               "min_psnr": round(float(np.min(self.sharp_in_psnr)), 4)}
        return out


def classical_deconvolution(blurred: np.ndarray, kernel: np.ndarray, method: str, iterations: int,
                            gamma: float) -> np.ndarray:
    """Non-blind deconvolution with the true PSF, in linear light, reflect-padded."""
    linear = (blurred.astype(np.float64) / 255.0) ** gamma
    kernels = kernel if kernel.ndim == 3 else np.stack([kernel] * 3)
    pad = max(kernels.shape[1:]) // 2 + 1
    out = np.empty_like(linear)
    for c in range(3):
        channel = np.pad(linear[..., c], pad, mode="reflect")
        psf = kernels[c] / kernels[c].sum()
        if method == "richardson_lucy":
            restored = restoration.richardson_lucy(channel, psf, num_iter=iterations, clip=True)
        else:
            restored = restoration.wiener(channel, psf, balance=0.01, clip=True)
        out[..., c] = restored[pad:-pad, pad:-pad]
    return np.clip(np.round(np.clip(out, 0, 1) ** (1.0 / gamma) * 255.0), 0, 255).astype(np.uint8)


def evaluate_model(model, records: list[PairRecord], tiling: TilingConfig, cfg: EvaluateConfig, gamma: float,
                   sharp_in_paths: list[Path] = (), with_baseline: bool = True, keep_images: int = 0,
                   desc: str = "evaluate") -> EvalResult:
    """Score ``model`` on test pairs (and sharp-in photos); keeps the first ``keep_images`` images."""
    results = []
    for i, rec in enumerate(progress(records, desc=desc, unit="image")):
        blurred, sharp = read_rgb(rec.blur_path), read_rgb(rec.clear_path)
        if blurred.shape != sharp.shape:
            raise ValueError(f"{rec.blur_path}: size {blurred.shape[:2]} differs from {rec.clear_path} {sharp.shape[:2]}")
        restored = deblur_array(model, blurred, tiling)
        scores = {"model_psnr": psnr(restored, sharp), "model_ssim": ssim(restored, sharp),
                  "input_psnr": psnr(blurred, sharp), "input_ssim": ssim(blurred, sharp)}
        images = {"blurred": blurred, "model": restored, "sharp": sharp} if i < keep_images else {}
        if with_baseline and cfg.classical_baseline != "none" and rec.kernel_path is not None:
            baseline = classical_deconvolution(blurred, np.load(rec.kernel_path), cfg.classical_baseline,
                                               cfg.rl_iterations, gamma)
            scores.update(baseline_psnr=psnr(baseline, sharp), baseline_ssim=ssim(baseline, sharp))
        results.append(ImageResult(rec.id, rec.blur_type, scores, images))
    sharp_in = [psnr(deblur_array(model, img, tiling), img) for img in (read_rgb(p) for p in sharp_in_paths)]
    return EvalResult(results, sharp_in)


def write_per_image_csv(result: EvalResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in result.images for k in r.scores})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "blur_type", *keys])
        for r in result.images:
            writer.writerow([r.id, r.blur_type, *[f"{r.scores[k]:.4f}" if k in r.scores else "" for k in keys]])


def write_per_blur_csv(summary: dict, path: Path) -> None:
    """Long-format PSNR per blur type and method; ``label`` ("motion: model") gives each bar its own row in DVC."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "blur_type", "method", "psnr"])
        for blur_type, scores in [("all", summary["overall"]), *summary["per_blur_type"].items()]:
            for method in METHODS:
                if f"{method}_psnr" in scores:
                    writer.writerow([f"{blur_type}: {METHOD_LABELS[method]}", blur_type, method,
                                     scores[f"{method}_psnr"]])


def per_blur_figure(summary: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["all", *summary["per_blur_type"]]
    table = {"all": summary["overall"], **summary["per_blur_type"]}
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 3.5))
    width = 0.27
    for j, method in enumerate(METHODS):
        values = [table[g].get(f"{method}_psnr", np.nan) for g in groups]
        ax.bar(np.arange(len(groups)) + (j - 1) * width, values, width, label=METHOD_LABELS[method])
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Test PSNR per blur type: model vs blurred input vs classical (true PSF)")
    ax.legend()
    finite = [v for g in groups for m in METHODS if np.isfinite(v := table[g].get(f"{m}_psnr", np.nan))]
    if finite:
        ax.set_ylim(min(finite) - 3, max(finite) + 2)
    fig.tight_layout()
    return fig
