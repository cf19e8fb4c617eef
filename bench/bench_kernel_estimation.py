"""Blind kernel estimation on held-out camera-shake photos, per kernel-size bucket.

The (photo, bucket) kernels, noise and blurred images are those of
``bench_quality_speed.py --shake-buckets`` (same seed, same draws; the photos are centre-cropped
to ``--crop`` px, smaller than there, to keep the run short). For each case
``deblur.psf.estimate.estimate_kernel`` runs without and with the trained network's latent
(``--checkpoint``); scored by kernel NCC to the true kernel and Levin's error ratio with the
non-blind hyper-Laplacian deconvolution (``deblur.psf.deconvolve.deconvolve_linear``) on linear
luminance. Also: seconds per 1280x720 photo.

    python bench/bench_kernel_estimation.py [--crop 384] [--estimator-crop 192] [--checkpoint checkpoints/pretrained/nafnet16.pt]

Writes bench/results/kernel_estimation.{json,md} and documentation/img/kernels_estimated_vs_true.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality_speed import HELD_OUT_DIR, bucket_photos, network_latent_fn, shake_bucket_set  # noqa: E402

from deblur.core.config import load_params  # noqa: E402
from deblur.data.blur import BlurSpec, apply_blur, kernel_image  # noqa: E402
from deblur.evaluation.scoring import kernel_buckets  # noqa: E402
from deblur.psf.deconvolve import deconvolve_linear  # noqa: E402
from deblur.psf.estimate import LUMA, EstimatorSettings, decode_srgb, estimate_kernel  # noqa: E402
from deblur.psf.metrics import error_ratio, kernel_ncc, support_size  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
IMG = ROOT / "documentation" / "img"
NCC_SUCCESS, RATIO_SUCCESS = 0.8, 3.0
MAX_SHIFT = 10


def luminance(rgb: np.ndarray, gamma: float) -> np.ndarray:
    return decode_srgb(rgb, gamma) @ LUMA


def score_case(blurred, sharp, truth, estimate, gamma) -> dict:
    """NCC to the true kernel and Levin's error ratio (linear luminance, hyper-Laplacian deconvolution)."""
    def deconvolve(image, kernel):
        return deconvolve_linear(image, kernel, workers=1)

    ratio = error_ratio(luminance(sharp, gamma), luminance(blurred, gamma), estimate.kernel, truth, deconvolve,
                        max_shift=MAX_SHIFT)
    return {"ncc": round(kernel_ncc(estimate.kernel, truth), 4), "error_ratio": round(ratio, 3),
            "support": estimate.support, "true_support": support_size(truth),
            "confidence": round(estimate.confidence, 4), "agreement": round(estimate.crop_agreement, 4),
            "reblur_residual": round(estimate.reblur_residual, 4), "seconds": round(estimate.seconds, 2)}


def summarise(cases: list[dict]) -> dict:
    ncc = np.array([c["ncc"] for c in cases])
    ratio = np.array([c["error_ratio"] for c in cases])
    confidence = np.array([c["confidence"] for c in cases])
    return {"n": len(cases),
            "ncc": _quartiles(ncc), "ncc_success": round(float(np.mean(ncc >= NCC_SUCCESS)), 3),
            "error_ratio": _quartiles(ratio), "ratio_success": round(float(np.mean(ratio <= RATIO_SUCCESS)), 3),
            "seconds_mean": round(float(np.mean([c["seconds"] for c in cases])), 2),
            "confidence_ncc_spearman": round(_spearman(confidence, ncc), 3) if len(cases) > 2 else None}


def _quartiles(values: np.ndarray) -> dict:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"q1": round(float(q1), 3), "median": round(float(median), 3), "q3": round(float(q3), 3)}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def seconds_720p(photo: np.ndarray, kernel: np.ndarray, params, settings, latent_fn) -> float:
    """Seconds for one estimate on a 1280x720 blurred photo (``photo`` tiled up to that size)."""
    reps = (720 // photo.shape[0] + 1, 1280 // photo.shape[1] + 1, 1)
    frame = np.ascontiguousarray(np.tile(photo, reps)[:720, :1280])
    spec = BlurSpec("motion", kernel, {"noise_sigma": 0.005})
    blurred = apply_blur(frame, spec, params.synthesize, np.random.default_rng(0))
    start = time.perf_counter()
    estimate_kernel(blurred, settings.max_kernel_size, latent_fn=latent_fn, settings=settings)
    return round(time.perf_counter() - start, 2)


def write_markdown(result: dict) -> None:
    meta = result["meta"]
    lines = [f"Blind kernel estimation on {meta['photos']} held-out photos (downscaled to {meta['bucket_max_side']} px, "
             f"centre-cropped to {meta['crop']}² px), one seeded camera-shake kernel per photo and bucket as in "
             f"shake_buckets.md (seed {meta['seed']}), estimator crops {meta['estimator_crop']} px, largest kernel "
             f"{meta['max_kernel_size']} px, {meta['when']}. NCC: kernel similarity to the true kernel (max over "
             f"shifts); error ratio: Levin's SSD ratio, hyper-Laplacian deconvolution on linear luminance. "
             f"Median [q1, q3]; success = NCC >= {NCC_SUCCESS} / ratio <= {RATIO_SUCCESS}.", "",
             "| latent | bucket | n | NCC median [q1, q3] | NCC >= 0.8 | error ratio median [q1, q3] | ratio <= 3 | "
             "s / case | Spearman(confidence, NCC) |", "|---|---|---|---|---|---|---|---|---|"]
    for variant, buckets in result["summary"].items():
        for label, s in buckets.items():
            n, r = s["ncc"], s["error_ratio"]
            lines.append(f"| {variant} | {label} | {s['n']} | {n['median']:.2f} [{n['q1']:.2f}, {n['q3']:.2f}] | "
                         f"{s['ncc_success']:.0%} | {r['median']:.2f} [{r['q1']:.2f}, {r['q3']:.2f}] | "
                         f"{s['ratio_success']:.0%} | {s['seconds_mean']} | {s['confidence_ncc_spearman']} |")
    lines += ["", "Seconds per 1280x720 photo (2 threads): " +
              ", ".join(f"{k}: {v}" for k, v in result["seconds_720p"].items())]
    (RESULTS / "kernel_estimation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_kernels(picked: list[tuple[str, np.ndarray, dict[str, tuple[np.ndarray, float]]]]) -> None:
    """Rows of (true kernel, each variant's estimate), one panel per case, NCC in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = (len(picked) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 1.7 * rows + 0.4))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, (name, truth, estimates) in zip(np.ravel(axes), picked):
        canvas = max([truth.shape[0]] + [k.shape[0] for k, _ in estimates.values()])
        panels = [kernel_image(_pad_to(k, canvas), 72) for k in [truth] + [k for k, _ in estimates.values()]]
        gap = np.full((72, 4, 3), 80, np.uint8)
        ax.imshow(np.hstack([p for panel in panels for p in (panel, gap)][:-1]))
        ax.set_title(f"{name}\ntrue | " + " | ".join(f"{v} {ncc:.2f}" for v, (_, ncc) in estimates.items()),
                     fontsize=7)
    fig.suptitle("True kernel vs blind estimates (kernel NCC); each case on one common canvas", fontsize=9)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "kernels_estimated_vs_true.png", dpi=110)


def _pad_to(kernel: np.ndarray, side: int) -> np.ndarray:
    out = np.zeros((side, side), np.float32)
    top = (side - kernel.shape[0]) // 2
    out[top:top + kernel.shape[0], top:top + kernel.shape[1]] = kernel
    return out


def picked_case(index: int) -> bool:
    """Every fifth case goes into the picture (12 at most)."""
    return index % 5 == 0 and index // 5 < 12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--heldout-dir", default=str(HELD_OUT_DIR))
    parser.add_argument("--bucket-max-side", type=int, default=1024)
    parser.add_argument("--crop", type=int, default=384, help="centre crop of each photo (shake_buckets uses 512)")
    parser.add_argument("--estimator-crop", type=int, default=192, help="EstimatorSettings.crop_size")
    parser.add_argument("--max-kernel-size", type=int, default=61)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "pretrained" / "nafnet16.pt"),
                        help="network for the latent ('' to skip that variant)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="first N photos only (a quick look)")
    parser.add_argument("--picture-only", action="store_true",
                        help="estimate the pictured cases only and redraw the picture (results files untouched)")
    args = parser.parse_args()
    params = load_params(args.params)
    gamma = params.synthesize.gamma
    photos = bucket_photos(Path(args.heldout_dir), args.bucket_max_side, args.crop)
    if args.limit:
        photos = dict(list(photos.items())[:args.limit])
    data = shake_bucket_set(photos, params, args.seed)
    settings = EstimatorSettings(max_kernel_size=args.max_kernel_size, crop_size=args.estimator_crop)
    variants = {"L0 only": None}
    if args.checkpoint:
        variants["network + L0"] = network_latent_fn(args.checkpoint, threads=args.threads)

    per_case, picked = {}, []
    for index, ((name, label), (blurred, sharp, truth)) in enumerate(sorted(data.items())):
        if args.picture_only and not picked_case(index):
            continue
        estimates = {}
        for variant, latent_fn in variants.items():
            estimate = estimate_kernel(blurred, args.max_kernel_size, latent_fn=latent_fn, settings=settings)
            per_case[f"{variant}|{name}|{label}"] = score_case(blurred, sharp, truth, estimate, gamma)
            estimates[variant] = (estimate.kernel, per_case[f"{variant}|{name}|{label}"]["ncc"])
        print(name, label, {v: per_case[f"{v}|{name}|{label}"] for v in variants}, flush=True)
        if picked_case(index):
            picked.append((f"{name[:22]} {label} px", truth, estimates))
    if args.picture_only:
        plot_kernels(picked)
        return 0

    summary = {variant: {label: summarise([c for key, c in per_case.items()
                                           if key.startswith(f"{variant}|") and key.endswith(f"|{label}")])
                         for label, _, _ in kernel_buckets()} for variant in variants}
    for variant in variants:
        summary[variant]["all"] = summarise([c for key, c in per_case.items() if key.startswith(f"{variant}|")])
    sample_photo, sample_kernel = next(iter(photos.values())), data[next(iter(data))][2]
    speed = {variant: seconds_720p(sample_photo, sample_kernel, params, EstimatorSettings(
        max_kernel_size=args.max_kernel_size), latent_fn) for variant, latent_fn in variants.items()}
    meta = {"photos": len(photos), "bucket_max_side": args.bucket_max_side, "crop": args.crop,
            "estimator_crop": args.estimator_crop, "max_kernel_size": args.max_kernel_size, "seed": args.seed,
            "checkpoint": args.checkpoint, "threads": args.threads, "settings": settings.__dict__,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result = {"meta": meta, "summary": summary, "seconds_720p": speed, "per_case": per_case}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernel_estimation.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    write_markdown(result)
    plot_kernels(picked)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
