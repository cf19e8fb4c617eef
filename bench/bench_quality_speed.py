"""Quality vs CPU speed of serving candidates, with the blurred input and Richardson-Lucy as references.

Quality: held-out real photos (scikit-image photos never used in training) blurred with
each blur type (fixed seed), restored with the same tiled inference as the HTTP service;
PSNR/SSIM per blur type, plus the sharp-in check (unblurred photos through the model).
Speed: seconds per 1280x720 frame on CPU with ``--threads`` threads, tiled.

    python bench/bench_quality_speed.py --checkpoint checkpoints/pretrained/nafnet16.pt [--checkpoint ...]
        [--speed-only nafnet:width=16 unet ...] [--threads 2] [--tile-sweep 256 288 384 512]

``--tile-sweep`` times the first checkpoint at other tile sizes (batch 1 and the configured
batch), with its camera-shake PSNR at each, to choose the serving tiling.

Writes bench/results/quality_speed.{json,md}, documentation/img/quality_speed.png and
triptychs documentation/img/results_*.png.

``--shake-buckets`` instead scores camera shake per kernel-size bucket (``<=21``, ``23-41``,
``>=43`` px: ``deblur.evaluation.scoring.KERNEL_BUCKET_EDGES``) on the 4 scikit-image held-out photos
plus the photos fetched once by ``bench/fetch_heldout_photos.sh`` (``--heldout-dir``), each
downscaled to ``--bucket-max-side`` and centre-cropped to at most ``--crop`` px square. Every
(photo, bucket) pair gets its own seeded camera-shake kernel whose support lies in the bucket,
so each bucket has as many kernels as photos (drawn as the synthesize stage draws camera shake,
kept when the support falls in the bucket). Rows: blurred input, Richardson-Lucy and the
hyper-Laplacian engine (``deblur.psf.deconvolve``) with the true kernel, each ``--checkpoint``.
Writes bench/results/shake_buckets.{json,md}:

    python bench/bench_quality_speed.py --shake-buckets [--reuse-references] --checkpoint a.pt [--checkpoint b.pt ...]
    python bench/bench_quality_speed.py --shake-buckets --references-only   # new reference rows, checkpoint rows kept
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from deblur.core import viz
from deblur.models.checkpoint_file import load_checkpoint
from deblur.models.build import model_from_checkpoint
from deblur.core.config import ModelConfig, load_params
from deblur.data.blur import BlurSpec, apply_blur, motion_kernel, sample_blur
from deblur.data.ingest import downscale
from deblur.evaluation.scoring import classical_deconvolution, kernel_bucket, kernel_buckets
from deblur.core.imageio import read_rgb, write_png
from deblur.evaluation.metrics import psnr, ssim
from deblur.models.build import build_model, configure_inference, count_parameters
from deblur.psf.deconvolve import deconvolve
from deblur.inference.tiling import deblur_array

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
IMG = ROOT / "documentation" / "img"
HELD_OUT = ("astronaut", "chelsea", "coffee", "retina")
BLUR_TYPES = ("motion", "gaussian", "defocus", "lens")
HELD_OUT_DIR = ROOT / "data" / "heldout_photos"    # bench/fetch_heldout_photos.sh
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
MIN_BUCKET_PHOTOS = 20
HYPER_LAPLACIAN = "hyper-Laplacian (true kernel)"


def network_latent_fn(checkpoint_path: str | Path, threads: int = 2,
                      tiling: tuple[int, int, int] = (288, 32, 1)) -> Callable[[np.ndarray], np.ndarray]:
    """A ``latent_fn`` running a trained checkpoint (e.g. checkpoints/pretrained/nafnet16.pt) with the
    service's tiled inference."""
    torch.set_num_threads(threads)
    model = model_from_checkpoint(load_checkpoint(checkpoint_path))

    def latent(rgb: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return deblur_array(model, np.ascontiguousarray(rgb), tiling)

    return latent


def held_out_photos(max_side: int) -> dict[str, np.ndarray]:
    import skimage.data

    return {name: downscale(getattr(skimage.data, name)()[..., :3], max_side) for name in HELD_OUT}


def blurred_set(photos, params, seed: int = 1234):
    """(photo, blur type) -> (blurred, sharp, kernel), reproducible."""
    out = {}
    for i, (name, sharp) in enumerate(photos.items()):
        for j, blur_type in enumerate(BLUR_TYPES):
            rng = np.random.default_rng([seed, i, j])
            spec = sample_blur(rng, params.synthesize, blur_type=blur_type)
            out[name, blur_type] = (apply_blur(sharp, spec, params.synthesize, rng), sharp, spec.kernel)
    return out


def seconds_per_frame(model, tiling, repeats: int = 3) -> float:
    frame = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    deblur_array(model, frame[:256, :256], tiling)   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        deblur_array(model, frame, tiling)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def score(restore, data) -> dict:
    per_type = {t: {"psnr": [], "ssim": []} for t in BLUR_TYPES}
    for (name, blur_type), (blurred, sharp, kernel) in data.items():
        out = restore(blurred, kernel)
        per_type[blur_type]["psnr"].append(psnr(out, sharp))
        per_type[blur_type]["ssim"].append(ssim(out, sharp))
    return {t: {k: round(float(np.mean(v)), 3) for k, v in d.items()} for t, d in per_type.items()}


def parse_speed_only(spec: str, base: ModelConfig) -> ModelConfig:
    """``nafnet:width=16,enc_blocks=1-1-1-1`` -> ModelConfig with those overrides."""
    name, _, rest = spec.partition(":")
    arch = getattr(base, name).model_dump()
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        arch[key] = [int(v) for v in value.split("-")] if "-" in value else type(arch[key])(value)
    return ModelConfig.model_validate({**base.model_dump(), "name": name, name: arch})


def bucket_photos(heldout_dir: Path, max_side: int, crop: int) -> dict[str, np.ndarray]:
    """scikit-image's held-out photos plus those in ``heldout_dir``: downscaled, then centre-cropped to <= crop²."""
    import skimage.data

    if not heldout_dir.is_dir():
        raise SystemExit(f"{heldout_dir}: no held-out photos; run bench/fetch_heldout_photos.sh {heldout_dir}")
    photos = {name: getattr(skimage.data, name)()[..., :3] for name in HELD_OUT}
    photos.update({p.stem: read_rgb(p) for p in sorted(heldout_dir.iterdir()) if p.suffix.lower() in PHOTO_SUFFIXES})
    if len(photos) < MIN_BUCKET_PHOTOS:
        raise SystemExit(f"only {len(photos)} held-out photos, need {MIN_BUCKET_PHOTOS}; "
                         f"run bench/fetch_heldout_photos.sh {heldout_dir}")
    return {name: centre_crop(downscale(rgb, max_side), crop) for name, rgb in photos.items()}


def centre_crop(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return np.ascontiguousarray(rgb[top:top + side, left:left + side])


def bucket_kernel(rng: np.random.Generator, motion, low: int, high: int | None, tries: int = 2000) -> np.ndarray:
    """A camera-shake kernel drawn as the synthesize stage draws them (``synthesize.motion``), redrawn
    until its support side lies in [low, high]: the synthetic distribution, conditioned on the bucket."""
    for _ in range(tries):
        kernel, _ = motion_kernel(rng, motion)
        if low <= kernel.shape[-1] and (high is None or kernel.shape[-1] <= high):
            return kernel
    raise RuntimeError(f"no camera-shake kernel with support in [{low}, {high}] px after {tries} draws")


def shake_bucket_set(photos, params, seed: int):
    """(photo, bucket label) -> (blurred, sharp, kernel): one seeded kernel per photo and bucket."""
    cfg = params.synthesize
    out = {}
    for name, sharp in photos.items():
        for b, (label, low, high) in enumerate(kernel_buckets()):
            rng = np.random.default_rng([seed, zlib.crc32(name.encode()), b])
            kernel = bucket_kernel(rng, cfg.motion, low, high)
            spec = BlurSpec("motion", kernel, {"size": int(kernel.shape[-1]),
                                               "noise_sigma": float(rng.uniform(0.0, cfg.noise_sigma_max))})
            out[name, label] = (apply_blur(sharp, spec, cfg, rng), sharp, kernel)
    return out


def score_buckets(restore, data) -> tuple[dict, dict]:
    """Per bucket: n, mean PSNR/SSIM; and per (photo, bucket) PSNR/SSIM."""
    per_image = {}
    for (name, label), (blurred, sharp, kernel) in data.items():
        out = restore(blurred, kernel)
        per_image[f"{name}|{label}"] = {"psnr": round(psnr(out, sharp), 3), "ssim": round(ssim(out, sharp), 4)}
    per_bucket = {}
    for label, _, _ in kernel_buckets():
        scores = [v for k, v in per_image.items() if k.endswith(f"|{label}")]
        per_bucket[label] = ({"n": len(scores), "psnr": round(float(np.mean([s["psnr"] for s in scores])), 3),
                              "ssim": round(float(np.mean([s["ssim"] for s in scores])), 4)} if scores else {"n": 0})
    return per_bucket, per_image


def run_shake_buckets(args, params) -> int:
    """Camera shake per kernel-size bucket: blurred input, RL with the true kernel, each checkpoint."""
    tiling = params.tiling
    photos = bucket_photos(Path(args.heldout_dir), args.bucket_max_side, args.crop)
    data = shake_bucket_set(photos, params, args.seed)
    assert all(kernel_bucket(k.shape[-1]) == label for (_, label), (_, _, k) in data.items())

    def richardson_lucy(blurred, kernel):
        return classical_deconvolution(blurred, kernel, "richardson_lucy", params.evaluate.rl_iterations,
                                       params.synthesize.gamma)

    def hyper_laplacian(blurred, kernel):
        return deconvolve(blurred, kernel, gamma=params.synthesize.gamma, workers=args.threads)

    kernels = {label: sorted(int(k.shape[-1]) for (_, l), (_, _, k) in data.items() if l == label)
               for label, _, _ in kernel_buckets()}
    meta = {"photos": {name: list(rgb.shape[:2]) for name, rgb in photos.items()}, "seed": args.seed,
            "bucket_max_side": args.bucket_max_side, "crop": args.crop, "kernel_sizes": kernels,
            "noise_sigma_max": params.synthesize.noise_sigma_max, "gamma": params.synthesize.gamma,
            "rl_iterations": params.evaluate.rl_iterations}
    engine = hyper_laplacian_settings()
    references = [("blurred input", lambda b, k: b, None),
                  ("Richardson-Lucy (true kernel)", richardson_lucy, None),
                  (HYPER_LAPLACIAN, hyper_laplacian, engine)]
    previous = previous_rows(meta) if args.reuse_references or args.references_only else []
    reusable = {r["name"]: r for r in previous if r["kind"] == "reference"}
    rows = [reusable[name] for name, _, settings in references
            if name in reusable and reusable[name].get("settings") == settings]
    if rows:
        print("reusing", ", ".join(r["name"] for r in rows), "of", RESULTS / "shake_buckets.json")
    methods = [(name, "reference", restore, settings) for name, restore, settings in references
               if name not in {r["name"] for r in rows}]
    for path in args.checkpoint:
        model = model_from_checkpoint(load_checkpoint(path))
        methods.append((str(path), "trained", lambda b, k, model=model: deblur_array(model, b, tiling), None))
    input_images = rows[0]["per_image"] if rows and rows[0]["name"] == "blurred input" else None
    for name, kind, restore, settings in methods:
        start = time.perf_counter()
        per_bucket, per_image = score_buckets(restore, data)
        input_images = input_images or per_image
        for label, bucket in per_bucket.items():
            if bucket["n"]:
                gains = [per_image[k]["psnr"] - v["psnr"] for k, v in input_images.items() if k.endswith(f"|{label}")]
                bucket.update(gain_db=round(float(np.mean(gains)), 3),
                              better_than_input=int(np.sum(np.array(gains) > 0)))
        row = {"name": name, "kind": kind, "per_bucket": per_bucket, "per_image": per_image,
               "seconds": round(time.perf_counter() - start, 1)}
        rows.append({**row, "settings": settings} if settings else row)
        print(name, per_bucket, flush=True)
    order = {name: i for i, (name, _, _) in enumerate(references)}
    rows.sort(key=lambda r: order.get(r["name"], len(order)))   # references first, in their order
    if args.references_only:   # the last run's checkpoint rows stay: they scored the same set
        rows += [r for r in previous if r["kind"] != "reference"]

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta.update(threads=args.threads, tiling=tiling.model_dump(), torch=torch.__version__,
                when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    (RESULTS / "shake_buckets.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_bucket_markdown(rows, meta)
    return 0


def reused_references(meta: dict) -> list[dict]:
    """The reference rows (blurred input, Richardson-Lucy, hyper-Laplacian) of the last --shake-buckets run when
    it scored the same set (photos, seed, crop, kernel sides, noise, gamma, RL iterations); else []."""
    return [r for r in previous_rows(meta) if r["kind"] == "reference"]


def previous_rows(meta: dict) -> list[dict]:
    """Every row of the last --shake-buckets run when it scored the same set; else []."""
    path = RESULTS / "shake_buckets.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    if any(old["meta"].get(key) != value for key, value in meta.items()):
        print(f"{path}: another held-out set or settings; recomputing the references")
        return []
    return old["rows"]


def hyper_laplacian_settings() -> dict:
    """What the hyper-Laplacian row depends on: the engine's settings and its lambda mapping."""
    from deblur.psf import deconvolve as engine

    return {**dataclasses.asdict(engine.Settings()), "lambda_at_reference": engine.LAMBDA_AT_REFERENCE[2 / 3],
            "reference_sigma": engine.REFERENCE_SIGMA, "reference_area": engine.REFERENCE_AREA,
            "noise_exponent": engine.NOISE_EXPONENT, "area_exponent": engine.AREA_EXPONENT}


def write_bucket_markdown(rows, meta) -> None:
    labels = [label for label, _, _ in kernel_buckets()]
    kernels = meta["kernel_sizes"]
    n = len(meta["photos"])
    lines = [f"Camera shake per kernel-size bucket (support side in px): {n} held-out photos, each downscaled to a "
             f"longer side of at most {meta['bucket_max_side']} px and centre-cropped to at most {meta['crop']}² px, "
             f"one seeded kernel per photo and bucket (seed {meta['seed']}; kernel sides "
             + "; ".join(f"{label}: {min(kernels[label])}-{max(kernels[label])}" for label in labels if kernels[label])
             + f"), sensor noise up to {meta['noise_sigma_max']}, Richardson-Lucy {meta['rl_iterations']} iterations "
             f"and hyper-Laplacian deconvolution (documentation/kernel_aware.md) in linear light, "
             f"tile {meta['tiling']['tile_size']} overlap {meta['tiling']['overlap']}, "
             f"{meta['threads']} CPU threads, {meta['when']}.", "",
             "PSNR / SSIM, (mean gain over the blurred input in dB, photos better than the input).", "",
             "| method | " + " | ".join(f"{label} px (n={kernels_n})" for label, kernels_n in
                                      ((label, len(kernels[label])) for label in labels)) + " |",
             "|---|" + "---|" * len(labels)]
    for r in rows:
        cells = []
        for label in labels:
            b = r["per_bucket"][label]
            if not b["n"]:
                cells.append("-")
            elif r["kind"] == "reference" and r["name"] == "blurred input":
                cells.append(f"{b['psnr']:.2f} / {b['ssim']:.3f}")
            else:
                cells.append(f"{b['psnr']:.2f} / {b['ssim']:.3f} "
                             f"({b['gain_db']:+.2f}, {b['better_than_input']}/{b['n']})")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    (RESULTS / "shake_buckets.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--checkpoint", action="append", default=[], help="trained checkpoint (repeatable)")
    parser.add_argument("--speed-only", nargs="*", default=[], help="untrained sizes timed for the curve")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--tile-sweep", nargs="*", type=int, default=[], help="tile sizes to time the first checkpoint at")
    parser.add_argument("--shake-buckets", action="store_true",
                        help="camera shake per kernel-size bucket on >= 20 held-out photos (no speed, no other blur)")
    parser.add_argument("--heldout-dir", default=str(HELD_OUT_DIR), help="photos from bench/fetch_heldout_photos.sh")
    parser.add_argument("--bucket-max-side", type=int, default=1024, help="--shake-buckets: downscale to this longer side")
    parser.add_argument("--crop", type=int, default=512, help="--shake-buckets: then centre-crop to at most this square")
    parser.add_argument("--seed", type=int, default=1234, help="--shake-buckets: kernels and noise")
    parser.add_argument("--reuse-references", action="store_true",
                        help="--shake-buckets: take the reference rows (input, Richardson-Lucy: 7 of the 9 minutes; "
                             "hyper-Laplacian when its settings are unchanged) from the last "
                             "results/shake_buckets.json when it scored the same set")
    parser.add_argument("--references-only", action="store_true",
                        help="--shake-buckets: score only the reference rows missing from the last results (as "
                             "--reuse-references) and keep its checkpoint rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    if args.shake_buckets:
        return run_shake_buckets(args, params)
    tiling = params.tiling
    photos = held_out_photos(args.max_side)
    data = blurred_set(photos, params)

    rows = [{"name": "blurred input", "kind": "reference", "seconds_720p": 0.0,
             "quality": score(lambda b, k: b, data)}]
    def richardson_lucy(blurred, kernel):
        return classical_deconvolution(blurred, kernel, "richardson_lucy", params.evaluate.rl_iterations,
                                       params.synthesize.gamma)

    frame = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    start = time.perf_counter()
    richardson_lucy(frame, data[HELD_OUT[0], "motion"][2])
    rows.append({"name": "Richardson-Lucy (true PSF)", "kind": "reference", "quality": score(richardson_lucy, data),
                 "seconds_720p": round(time.perf_counter() - start, 2)})
    triptych_models = {}
    for path in args.checkpoint:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt)
        label = f"{Path(path).stem} ({ckpt['model_config']['name']}, trained)"
        quality = score(lambda b, k: deblur_array(model, b, tiling), data)
        sharp_in = [psnr(deblur_array(model, p, tiling), p) for p in photos.values()]
        rows.append({"name": label, "kind": "trained", "parameters": count_parameters(model), "quality": quality,
                     "sharp_in_psnr": round(float(np.mean(sharp_in)), 2), "sharp_in_min_psnr": round(float(np.min(sharp_in)), 2),
                     "seconds_720p": round(seconds_per_frame(model, tiling), 2)})
        triptych_models[label] = model
        print(rows[-1])
    sweep = []
    if args.tile_sweep and triptych_models:
        label, model = next(iter(triptych_models.items()))
        motion = {k: v for k, v in data.items() if k[1] == "motion"}
        for tile_size in args.tile_sweep:
            for batch in sorted({1, tiling.batch_size}):
                swept = tiling.model_copy(update={"tile_size": tile_size, "batch_size": batch})
                sweep.append({"model": label.split(" (")[0], "tile_size": tile_size, "overlap": tiling.overlap, "batch_size": batch,
                              "seconds_720p": round(seconds_per_frame(model, swept), 2),
                              "motion_psnr": score(lambda b, k: deblur_array(model, b, swept), motion)["motion"]["psnr"]})
                print(sweep[-1])
    for spec in args.speed_only:
        cfg = parse_speed_only(spec, params.model)
        torch.manual_seed(0)
        model = configure_inference(build_model(cfg).eval(), cfg, params.train.patch_size)
        rows.append({"name": spec, "kind": "untrained (speed only)", "parameters": count_parameters(model),
                     "seconds_720p": round(seconds_per_frame(model, tiling, repeats=1), 2)})
        print(rows[-1])

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "tiling": tiling.model_dump(), "photos": list(HELD_OUT), "max_side": args.max_side,
            "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (RESULTS / "quality_speed.json").write_text(json.dumps({"meta": meta, "rows": rows, "tile_sweep": sweep}, indent=2) + "\n")
    write_markdown(rows, meta, sweep)
    plot(rows, sweep)
    write_triptychs(triptych_models, data, photos, tiling, params)
    return 0


def write_markdown(rows, meta, sweep) -> None:
    head = "| model | params | s / 1280x720 | " + " | ".join(f"{t} PSNR/SSIM" for t in BLUR_TYPES) + " | sharp-in PSNR (min) |"
    lines = [f"Held-out photos {meta['photos']} (longer side {meta['max_side']}), {meta['threads']} CPU threads, "
             f"tile {meta['tiling']['tile_size']} overlap {meta['tiling']['overlap']}, {meta['when']}.", "", head,
             "|" + "---|" * (5 + len(BLUR_TYPES))]
    for r in rows:
        q = r.get("quality")
        cells = [f"{q[t]['psnr']:.2f} / {q[t]['ssim']:.3f}" if q else "-" for t in BLUR_TYPES]
        params = f"{r['parameters'] / 1e6:.2f} M" if "parameters" in r else "-"
        sharp = f"{r['sharp_in_psnr']} ({r['sharp_in_min_psnr']})" if "sharp_in_psnr" in r else "-"
        lines.append(f"| {r['name']} | {params} | {r['seconds_720p']} | " + " | ".join(cells) + f" | {sharp} |")
    if sweep:
        lines += ["", f"Tile sizes for {sweep[0]['model']} (overlap {meta['tiling']['overlap']}):", "",
                  "| tile | batch | s / 1280x720 | camera-shake PSNR |", "|---|---|---|---|"]
        lines += [f"| {r['tile_size']} | {r['batch_size']} | {r['seconds_720p']} | {r['motion_psnr']:.2f} |" for r in sweep]
    (RESULTS / "quality_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows, sweep=()) -> None:
    """Camera-shake PSNR against CPU seconds per frame; the first checkpoint's tile sweep as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(r for r in rows if "quality" in r):
        if r["seconds_720p"] <= 0:  # the blurred input: no compute, a line to beat
            y = r["quality"]["motion"]["psnr"]
            ax.axhline(y, linestyle="--", color="tab:blue", linewidth=1)
            ax.text(1.02, y, r["name"], transform=ax.get_yaxis_transform(), fontsize=8, color="tab:blue", va="center")
            continue
        marker = "s" if r["kind"] == "reference" else "o"
        x, y = r["seconds_720p"], r["quality"]["motion"]["psnr"]
        ax.scatter(x, y, marker=marker, s=60, zorder=3)
        ax.annotate(r["name"].split(" (")[0], (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 else -12),
                    fontsize=8)
    if sweep:
        best = min(sweep, key=lambda r: r["seconds_720p"])
        ax.plot([r["seconds_720p"] for r in sweep], [r["motion_psnr"] for r in sweep], ".", color="grey", zorder=2)
        ax.annotate(f"{best['model']}, tile {best['tile_size']} batch {best['batch_size']}",
                    (best["seconds_720p"], best["motion_psnr"]), textcoords="offset points", xytext=(6, 10),
                    fontsize=8, color="green", arrowprops={"arrowstyle": "-", "color": "green"})
    ax.axvline(2.0, linestyle=":", color="grey")
    ax.text(2.1, ax.get_ylim()[0] + 0.05, "2 s target", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set(xlabel="CPU seconds per 1280x720 frame, 2 threads, tiled (log scale)",
           ylabel="PSNR on camera-shake blur (dB)", title="Quality vs CPU speed on held-out photos")
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "quality_speed.png", dpi=110)


def write_triptychs(models, data, photos, tiling, params) -> None:
    import skimage.data

    for label, model in models.items():
        rows = []
        for name in ("astronaut", "coffee"):
            blurred, sharp, _ = data[name, "motion"]
            out = deblur_array(model, blurred, tiling)
            rows.append(viz.triptych(blurred, out, sharp, titles=(f"blurred {psnr(blurred, sharp):.2f} dB",
                                                                 f"deblurred {psnr(out, sharp):.2f} dB", "sharp")))
        write_png(IMG / "results_heldout.png", viz.vstack(rows))
        clock = np.repeat(skimage.data.clock()[..., None], 3, axis=2)
        write_png(IMG / "results_clock.png", viz.hstack([clock, deblur_array(model, clock, tiling)], 300,
                                                        ["real camera shake (skimage clock)", "deblurred"]))
        break  # the first checkpoint is the shipped one


if __name__ == "__main__":
    raise SystemExit(main())
