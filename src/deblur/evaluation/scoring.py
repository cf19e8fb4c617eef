"""Whole-image evaluation on the test split, with references beside every number.

For each test pair: the model's output (tiled inference, the same code as the HTTP
service), the blurred input itself, and, where the PSF is known, a classical
non-blind deconvolution (Richardson-Lucy or Wiener from scikit-image, in linear light).
The sharp-in check runs unblurred test photos through the model: a good deblurrer leaves
them almost unchanged. Camera shake is also reported per kernel-size bucket
(``KERNEL_BUCKET_EDGES``; documentation/metrics.md), since its difficulty grows with the kernel.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from skimage import restoration

from deblur.core.config import NOISE, EvaluateConfig, KernelAwareConfig, TilingConfig
from deblur.data.pairs import PairRecord
from deblur.core.imageio import read_rgb
from deblur.evaluation.metrics import psnr, ssim
from deblur.models.perceptual import lpips_distance, lpips_distances
from deblur.core.progress import progress
from deblur.psf.deconvolve import deconvolve
from deblur.psf.metrics import kernel_ncc
from deblur.psf.restore import restore_thorough
from deblur.inference.tiling import deblur_array

METHODS = ("model", "input", "baseline", "predictor", "nonblind", "thorough")
METHOD_LABELS = {"model": "model", "input": "blurred input", "baseline": "classical (true PSF)",
                 "predictor": "predictor alone",   # a diffusion refiner's own predictor, alone
                 "nonblind": "hyper-Laplacian (true PSF)", "thorough": "thorough mode (blind PSF)"}
BUCKETED_BLUR_TYPE = "motion"        # camera shake: the blur type reported per kernel-size bucket
SHAKE_ONLY_SCORES = ("thorough_", "nonblind_", "kernel_")   # camera-shake pairs only: not averaged into "all"
KERNEL_BUCKET_EDGES = (21, 41)       # px, largest kernel side of each bucket but the last: <=21, 23-41, >=43


def kernel_buckets() -> list[tuple[str, int, int | None]]:
    """(label, smallest side, largest side or None) of each kernel-size bucket, smallest first.

    Kernel sides are odd, so the bucket after an edge e starts at e + 2: ``<=21``, ``23-41``, ``>=43``.
    """
    lows = (1, *(edge + 2 for edge in KERNEL_BUCKET_EDGES))
    highs = (*KERNEL_BUCKET_EDGES, None)
    labels = [f"<={highs[0]}", *(f"{lo}-{hi}" for lo, hi in zip(lows[1:-1], highs[1:-1])), f">={lows[-1]}"]
    return list(zip(labels, lows, highs))


def kernel_bucket(size: int) -> str:
    """The bucket label of a kernel side in px (an even side goes with the odd side above it)."""
    for label, _, high in kernel_buckets():
        if high is None or size <= high:
            return label
    raise AssertionError("unreachable: the last bucket has no upper bound")


def bucket_key(label: str) -> str:
    """A bucket label as a metric-name part: ``<=21`` -> ``kle21``, ``23-41`` -> ``k23_41``, ``>=43`` -> ``kge43``."""
    return "k" + label.replace("<=", "le").replace(">=", "ge").replace("-", "_")


@dataclass
class ImageResult:
    id: str
    blur_type: str
    scores: dict[str, float]          # e.g. model_psnr, input_ssim, baseline_psnr, model_lpips
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    kernel_size: int | None = None    # side of the PSF's support in px; None for real blur

    @property
    def kernel_bucket(self) -> str | None:
        """The kernel-size bucket of a camera-shake pair; None for other blur types."""
        if self.blur_type != BUCKETED_BLUR_TYPE or self.kernel_size is None:
            return None
        return kernel_bucket(self.kernel_size)


@dataclass
class EvalResult:
    images: list[ImageResult]
    sharp_in_psnr: list[float]

    def summary(self) -> dict:
        """metrics.json content: overall, per blur type, camera shake per kernel-size bucket, sharp-in.

        Every bucket is listed; one without pairs holds only ``n: 0``.
        """
        by_type: dict[str, list[ImageResult]] = defaultdict(list)
        by_bucket: dict[str, list[ImageResult]] = defaultdict(list)
        for r in self.images:
            by_type[r.blur_type].append(r)
            if r.kernel_bucket is not None:
                by_bucket[r.kernel_bucket].append(r)
        overall = {k: v for k, v in mean_scores(self.images).items() if not k.startswith(SHAKE_ONLY_SCORES)}
        overall["gain_over_input_db"] = round(overall["model_psnr"] - overall["input_psnr"], 4)
        if "predictor_psnr" in overall:   # a refiner: what it adds to its own predictor
            overall["gain_over_predictor_db"] = round(overall["model_psnr"] - overall["predictor_psnr"], 4)
        out = {
            "n_images": len(self.images),
            "overall": overall,
            "per_blur_type": {t: {"n": len(rows), **mean_scores(rows)} for t, rows in sorted(by_type.items())},
            "per_kernel_bucket": {BUCKETED_BLUR_TYPE: {label: bucket_scores(by_bucket[label])
                                                       for label, _, _ in kernel_buckets()}},
        }
        if self.sharp_in_psnr:
            out["sharp_in"] = {"n": len(self.sharp_in_psnr), "psnr": round(float(np.mean(self.sharp_in_psnr)), 4),
                               "min_psnr": round(float(np.min(self.sharp_in_psnr)), 4)}
        return out


def mean_scores(rows: list[ImageResult]) -> dict[str, float]:
    """Mean of each score over the rows that have it, rounded to 4 decimals."""
    keys = sorted({k for r in rows for k in r.scores})
    return {k: round(float(np.mean([r.scores[k] for r in rows if k in r.scores])), 4) for k in keys}


def bucket_scores(rows: list[ImageResult]) -> dict[str, float]:
    """``n``, the mean scores and the model's gain over the input; ``{"n": 0}`` for an empty bucket."""
    if not rows:
        return {"n": 0}
    scores = mean_scores(rows)
    return {"n": len(rows), **scores, "gain_over_input_db": round(scores["model_psnr"] - scores["input_psnr"], 4)}


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
                   desc: str = "evaluate", lpips=None, kernel_aware: KernelAwareConfig | None = None) -> EvalResult:
    """Score ``model`` on test pairs (and sharp-in photos); keeps the first ``keep_images`` images.

    ``kernel_aware``: the served model is ``model`` in that mode (``default_mode: thorough``: blind PSF
    estimate, deconvolution, evidence-based choice); camera-shake pairs also get the thorough result
    (``thorough_psnr``), the estimated PSF's NCC to the true one (``kernel_ncc``) and the non-blind
    ceiling, hyper-Laplacian deconvolution with the true PSF (``nonblind_psnr``).

    ``lpips`` (a ``deblur.models.perceptual.LPIPS``) adds ``<method>_lpips`` for every method scored.
    ``noise`` pairs get no classical reference: their PSF is the identity, and Richardson-Lucy
    with a delta kernel returns its input unchanged (the input column already is that reference).
    """
    results = []
    network = lambda rgb: deblur_array(model, rgb, tiling)   # noqa: E731  (fast mode, the thorough mode's network)
    predictor = getattr(model, "predictor", None)   # a diffusion refiner's predictor: scored alone, same pairs
    for i, rec in enumerate(progress(records, desc=desc, unit="image")):
        blurred, sharp = read_rgb(rec.blur_path), read_rgb(rec.clear_path)
        if blurred.shape != sharp.shape:
            raise ValueError(f"{rec.blur_path}: size {blurred.shape[:2]} differs from {rec.clear_path} {sharp.shape[:2]}")
        shake = kernel_aware is not None and rec.blur_type == BUCKETED_BLUR_TYPE and rec.kernel_path is not None
        thorough = None
        if kernel_aware is not None and (kernel_aware.default_mode == "thorough" or shake):
            thorough, _ = restore_thorough(blurred, network, kernel_aware, gamma)
        restored = thorough.image if thorough is not None and kernel_aware.default_mode == "thorough" \
            else deblur_array(model, blurred, tiling)
        scores = {"model_psnr": psnr(restored, sharp), "model_ssim": ssim(restored, sharp),
                  "input_psnr": psnr(blurred, sharp), "input_ssim": ssim(blurred, sharp)}
        images = {"blurred": blurred, "model": restored, "sharp": sharp} if i < keep_images else {}
        if shake:
            true_kernel = np.load(rec.kernel_path)
            scores.update(thorough_psnr=psnr(thorough.image, sharp), thorough_ssim=ssim(thorough.image, sharp))
            nonblind = deconvolve(blurred, true_kernel, gamma=gamma)
            scores.update(nonblind_psnr=psnr(nonblind, sharp), nonblind_ssim=ssim(nonblind, sharp))
            if thorough.psf is not None:
                scores["kernel_ncc"] = kernel_ncc(thorough.psf, true_kernel)
                if images:
                    images.update(true_psf=true_kernel, estimated_psf=thorough.psf)
        baseline = None
        has_psf = rec.kernel_path is not None and rec.blur_type != NOISE
        if with_baseline and cfg.classical_baseline != "none" and has_psf:
            baseline = classical_deconvolution(blurred, np.load(rec.kernel_path), cfg.classical_baseline,
                                               cfg.rl_iterations, gamma)
            scores.update(baseline_psnr=psnr(baseline, sharp), baseline_ssim=ssim(baseline, sharp))
        if lpips is not None:
            scored = {m: img for m, img in (("model", restored), ("input", blurred), ("baseline", baseline))
                      if img is not None}
            distances = lpips_distances(lpips, list(scored.values()), sharp)
            scores.update({f"{m}_lpips": d for m, d in zip(scored, distances)})
        if predictor is not None:
            alone = deblur_array(predictor, blurred, tiling)
            scores.update(predictor_psnr=psnr(alone, sharp), predictor_ssim=ssim(alone, sharp))
            if lpips is not None:
                scores["predictor_lpips"] = lpips_distance(lpips, alone, sharp)
            if images:
                images["predictor"] = alone
        results.append(ImageResult(rec.id, rec.blur_type, scores, images, rec.kernel_size))
    def serve(rgb: np.ndarray) -> np.ndarray:
        if kernel_aware is not None and kernel_aware.default_mode == "thorough":
            return restore_thorough(rgb, network, kernel_aware, gamma)[0].image
        return deblur_array(model, rgb, tiling)

    sharp_in = [psnr(serve(img), img) for img in (read_rgb(p) for p in sharp_in_paths)]
    return EvalResult(results, sharp_in)


def write_per_image_csv(result: EvalResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in result.images for k in r.scores})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "blur_type", "kernel_size", "kernel_bucket", *keys])
        for r in result.images:
            writer.writerow([r.id, r.blur_type, "" if r.kernel_size is None else r.kernel_size, r.kernel_bucket or "",
                             *[f"{r.scores[k]:.4f}" if k in r.scores else "" for k in keys]])


def write_per_blur_csv(summary: dict, path: Path) -> None:
    """Long-format PSNR (and LPIPS, empty when not computed) per blur type and method;
    ``label`` ("motion: model") gives each bar its own row in DVC."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "blur_type", "method", "psnr", "lpips"])
        for blur_type, scores in [("all", summary["overall"]), *summary["per_blur_type"].items()]:
            for method in METHODS:
                if f"{method}_psnr" in scores:
                    writer.writerow([f"{blur_type}: {METHOD_LABELS[method]}", blur_type, method,
                                     scores[f"{method}_psnr"], scores.get(f"{method}_lpips", "")])


def per_blur_figure(summary: dict):
    import matplotlib  # only here, for the figure: the backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["all", *summary["per_blur_type"]]
    table = {"all": summary["overall"], **summary["per_blur_type"]}
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 3.5))
    shown = [m for m in METHODS if any(f"{m}_psnr" in table[g] for g in groups)]
    width = 0.8 / len(shown)
    for j, method in enumerate(shown):
        values = [table[g].get(f"{method}_psnr", np.nan) for g in groups]
        ax.bar(np.arange(len(groups)) + (j - (len(shown) - 1) / 2) * width, values, width,
               label=METHOD_LABELS[method])
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Test PSNR per blur type: model vs blurred input vs references (true PSF)")
    ax.legend()
    finite = [v for g in groups for m in METHODS if np.isfinite(v := table[g].get(f"{m}_psnr", np.nan))]
    if finite:
        ax.set_ylim(min(finite) - 3, max(finite) + 2)
    fig.tight_layout()
    return fig
