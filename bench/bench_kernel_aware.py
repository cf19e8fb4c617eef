"""Thorough mode (estimate the PSF, deconvolve, check) against fast mode, per camera-shake kernel bucket.

Held-out photos as ``bench_quality_speed.py --shake-buckets`` (scikit-image's held-out photos plus
``bench/fetch_heldout_photos.sh``), each with one seeded camera-shake kernel per bucket. Every case
computes all candidates of ``deblur.psf.restore`` so the table shows what the selector chose beside
what each candidate gives, the oracle (best candidate per photo, needs the sharp image), and the
non-blind ceiling (deconvolution with the TRUE PSF). Kernel NCC and Levin's error ratio compare the
estimated PSF with the true one. Seconds per 1280x720 frame: fast and thorough, in the same run.

    python bench/bench_kernel_aware.py [--checkpoint checkpoints/pretrained/nafnet16.pt] [--limit N]
    python bench/bench_kernel_aware.py --calibrate      # training photos: the selector's thresholds

Writes bench/results/kernel_aware.{json,md} (or kernel_selector_calibration.{json,md}) and
documentation/img/kernel_aware_kernels.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality_speed import HELD_OUT_DIR, bucket_photos, centre_crop, network_latent_fn, shake_bucket_set  # noqa: E402

from deblur.core.config import load_params  # noqa: E402
from deblur.data.ingest import EMBEDDED_PHOTOS, downscale  # noqa: E402
from deblur.evaluation.scoring import kernel_buckets  # noqa: E402
from deblur.evaluation.metrics import psnr  # noqa: E402
from deblur.psf.deconvolve import deconvolve  # noqa: E402
from deblur.psf.metrics import error_ratio, kernel_ncc  # noqa: E402
from deblur.psf.restore import CANDIDATES, choose, restore_thorough  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
IMG = ROOT / "documentation" / "img"
CALIBRATION_SEED = 4321


def training_photos(params, max_side: int, crop: int) -> dict[str, np.ndarray]:
    """The embedded source's train/val photos (never the held-out ones) and scikit-learn's two sample
    photos (in no held-out set): for calibrating the selector."""
    from sklearn.datasets import load_sample_image

    names = [n for n in params.ingest.embedded.photos if n not in params.ingest.embedded.test_photos]
    photos = {name: EMBEDDED_PHOTOS[name]() for name in names}
    photos.update({f"sklearn_{n}": load_sample_image(f"{n}.jpg") for n in ("china", "flower")})
    return {name: centre_crop(downscale(rgb, max_side), crop) for name, rgb in photos.items()}


def calibration_set(photos, params, seeds) -> dict:
    """``shake_bucket_set`` once per seed (other kernels and noise on the same photos), keys ``name@seed``."""
    data = {}
    for seed in seeds:
        data.update(shake_bucket_set({f"{n}@{seed}": rgb for n, rgb in photos.items()}, params, seed))
    return data


def run_cases(data, network, cfg, gamma, with_error_ratio: bool = False) -> list[dict]:
    rows = []
    for i, ((name, label), (blurred, sharp, kernel)) in enumerate(data.items()):
        result, made = restore_thorough(blurred, network, cfg, gamma, all_candidates=True)
        scores = {c: round(psnr(img, sharp), 3) for c, img in made.items()}
        ceiling = deconvolve(blurred, kernel, gamma=gamma)
        est = result.estimate
        row = {"photo": name, "bucket": label, "true_size": int(kernel.shape[-1]), "chosen": result.chosen,
               "psnr": scores, "unshrunk": scores[result.chosen], "thorough": round(psnr(result.image, sharp), 3),
               "true_psf": round(psnr(ceiling, sharp), 3),
               "evidence": result.evidence, "seconds": {k: round(v, 2) for k, v in result.seconds.items()}}
        if est is not None:
            row["ncc"] = round(kernel_ncc(est.kernel, kernel), 4)
            if with_error_ratio:   # two more deconvolutions per case
                row["error_ratio"] = round(error_ratio(sharp, blurred, est.kernel, kernel,
                                                       lambda b, k: deconvolve(b, k, gamma=gamma)), 3)
            row["kernel"] = est.kernel.tolist()
            row["true_kernel"] = kernel.tolist()
        rows.append(row)
        print(f"[{i + 1}/{len(data)}] {name} {label}: input {scores['input']:.2f} network {scores['network']:.2f} "
              f"kernel {scores['kernel']:.2f} -> {result.chosen} {row['thorough']:.2f} | true PSF {row['true_psf']:.2f} "
              f"| NCC {row.get('ncc', float('nan')):.2f} conf {result.evidence.get('confidence', 0):.2f}", flush=True)
    return rows


def bucket_table(rows: list[dict]) -> dict:
    out = {}
    for label, _, _ in kernel_buckets():
        sel = [r for r in rows if r["bucket"] == label]
        if not sel:
            continue
        gain = lambda key: [(r.get(key, r["thorough"]) if key in ("thorough", "unshrunk", "true_psf")  # noqa: E731
                             else r["psnr"].get(key, np.nan))
                            - r["psnr"]["input"] for r in sel]
        oracle = [max(r["psnr"].values()) - r["psnr"]["input"] for r in sel]
        out[label] = {
            "n": len(sel),
            "input_psnr": round(float(np.mean([r["psnr"]["input"] for r in sel])), 3),
            **{f"{c}_gain": round(float(np.nanmean(gain(c))), 3) for c in (*CANDIDATES, "deconvolved") if c != "input"},
            "unshrunk_gain": round(float(np.mean(gain("unshrunk"))), 3),
            "thorough_gain": round(float(np.mean(gain("thorough"))), 3),
            "thorough_worst": round(float(np.min(gain("thorough"))), 3),
            "thorough_below_input_0_5db": int(np.sum(np.array(gain("thorough")) < -0.5)),
            "oracle_gain": round(float(np.mean(oracle)), 3),
            "true_psf_gain": round(float(np.mean(gain("true_psf"))), 3),
            "ncc_median": round(float(np.median([r["ncc"] for r in sel if "ncc" in r])), 3),
            "ncc_share_0_8": round(float(np.mean([r["ncc"] >= 0.8 for r in sel if "ncc" in r])), 3),
            "error_ratio_median": (round(float(np.median([r["error_ratio"] for r in sel if "error_ratio" in r])), 3)
                                   if any("error_ratio" in r for r in sel) else None),
            "chosen": {c: sum(r["chosen"] == c for r in sel) for c in CANDIDATES},
        }
    return out


def calibrate(rows: list[dict], cfg) -> list[dict]:
    """Mean / worst gain over the input of the selector for each (min_confidence, max_overshoot,
    min_network_agreement); the rows must carry every candidate's PSNR and the checks (``run_cases``)."""
    from deblur.psf.estimate import KernelEstimate

    table = []
    for threshold in (0.5, 0.6, 0.7):
        for overshoot in (0.05, 1.0):
            for agreement in (None, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5):
                trial = cfg.model_copy(update={"min_confidence": threshold, "max_overshoot": overshoot,
                                               "min_network_agreement": agreement})
                gains = []
                for r in rows:
                    ev = r["evidence"]
                    if "support_px" not in ev:
                        gains.append(r["psnr"]["network"] - r["psnr"]["input"])
                        continue
                    est = KernelEstimate(kernel=np.zeros((1, 1)), support=ev["support_px"], crop_kernels=(),
                                         crop_boxes=(), crop_agreement=ev["crop_agreement"],
                                         reblur_residual=ev["reblur_residual"], confidence=ev["confidence"],
                                         seconds=0.0)
                    chosen, _ = choose(est, trial, ev.get("overshoot"), ev.get("checks"))
                    gains.append(r["psnr"].get(chosen, r["psnr"]["network"]) - r["psnr"]["input"])
                table.append({"min_confidence": threshold, "max_overshoot": overshoot,
                              "min_network_agreement": agreement,
                              "mean_gain": round(float(np.mean(gains)), 3),
                              "worst_gain": round(float(np.min(gains)), 3),
                              "below_0_5db": int(np.sum(np.array(gains) < -0.5))})
    return table


def calibration_markdown(thresholds: list[dict]) -> str:
    return ("\nSelector thresholds on these calibration cases (gain over the input, all cases; "
            "min_network_agreement '-' = check off):\n\n"
            "| min_confidence | max_overshoot | min_network_agreement | mean gain | worst gain | cases < -0.5 dB |\n"
            "|---|---|---|---|---|---|\n") + "".join(
        f"| {t['min_confidence']:.2f} | {t['max_overshoot']:.2f} | "
        f"{'-' if t.get('min_network_agreement') is None else format(t['min_network_agreement'], '.2f')} | "
        f"{t['mean_gain']:+.3f} | {t['worst_gain']:+.2f} | {t['below_0_5db']} |\n" for t in thresholds)


def seconds_per_frame(network, cfg, gamma, repeats: int = 2) -> dict:
    import skimage.data
    import cv2

    frame = cv2.resize(skimage.data.astronaut(), (1280, 720), interpolation=cv2.INTER_AREA)
    network(frame[:128, :128])   # warm-up
    times = {"fast": [], "thorough": []}
    for _ in range(repeats):
        for mode in ("fast", "thorough"):
            start = time.perf_counter()
            if mode == "fast":
                network(frame)
            else:
                restore_thorough(frame, network, cfg.model_copy(update={"min_confidence": 0.0}), gamma)
            times[mode].append(time.perf_counter() - start)
    return {m: round(float(np.median(v)), 2) for m, v in times.items()}


def kernel_picture(rows: list[dict], path: Path, count: int = 12) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = [r for r in rows if "kernel" in r][:: max(1, len([r for r in rows if "kernel" in r]) // count)][:count]
    fig, axes = plt.subplots(2, len(picked), figsize=(1.3 * len(picked), 3.0))
    for j, r in enumerate(picked):
        for i, (key, title) in enumerate((("true_kernel", f"true {r['true_size']}px"),
                                          ("kernel", f"est. NCC {r['ncc']:.2f}"))):
            ax = axes[i, j]
            ax.imshow(np.sqrt(np.array(r[key])), cmap="gray")
            ax.set_title(title, fontsize=6)
            ax.axis("off")
    fig.suptitle("Camera-shake PSFs: true (top) vs estimated blind (bottom), held-out photos", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def markdown(meta: dict, table: dict, speed: dict | None) -> str:
    lines = [f"Thorough mode vs fast mode per camera-shake bucket ({meta['photos']} photos, {meta['when']}, "
             f"checkpoint {meta['checkpoint']}). Gains in dB over the blurred input (mean); oracle = best "
             "candidate per photo (needs the sharp image); true PSF = non-blind ceiling; deconvolution = with the "
             "blindly estimated PSF alone; kernel result = that deconvolution blended with the network at 1/2 scale "
             f"(kernel_weight {meta['settings'].get('kernel_weight', 1.0)}); unshrunk choice = the selector's candidate; "
             f"thorough = that choice shrunk toward the input (input_shrink {meta['settings'].get('input_shrink', 0.0)}): "
             f"what is served. Kernels and noise: seed {meta['seed']}.", "",
             "| bucket | n | input dB | fast (network) | net 1/2 | net 1/4 | deconvolution (blind) | kernel result | "
             "unshrunk choice | **thorough** | worst | < -0.5 dB | oracle | true PSF | NCC median | NCC >= 0.8 | error ratio median | chosen |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, t in table.items():
        chosen = ", ".join(f"{k} {v}" for k, v in t["chosen"].items() if v)
        lines.append(f"| {label} | {t['n']} | {t['input_psnr']:.2f} | {t['network_gain']:+.2f} | "
                     f"{t['network_half_gain']:+.2f} | {t['network_quarter_gain']:+.2f} | "
                     f"{t.get('deconvolved_gain', t['kernel_gain']):+.2f} | {t['kernel_gain']:+.2f} | "
                     f"{t.get('unshrunk_gain', t['thorough_gain']):+.2f} | **{t['thorough_gain']:+.2f}** | {t['thorough_worst']:+.2f} | {t['thorough_below_input_0_5db']} | "
                     f"{t['oracle_gain']:+.2f} | {t['true_psf_gain']:+.2f} | {t['ncc_median']:.2f} | "
                     f"{t['ncc_share_0_8']:.0%} | {t['error_ratio_median'] if t['error_ratio_median'] is not None else '-'} | "
                     f"{chosen} |")
    if speed:
        lines += ["", f"Seconds per 1280x720 frame, 2 threads, same run: fast {speed['fast']} s, "
                      f"thorough {speed['thorough']} s (load average before: {speed.get('load_average_before', '?')})."]
    return "\n".join(lines) + "\n"


def reselect(path: Path, cfg) -> int:
    """The selector of ``cfg`` applied to the candidates' scores a previous run stored (every candidate of
    every case was computed, so changing a threshold needs no new restoration). The shrink toward the input
    needs the images: "thorough" is then the unshrunk choice (``bench_input_shrink.py`` scores the shrink)."""
    from deblur.psf.estimate import KernelEstimate

    out = json.loads(path.read_text())
    for r in out["rows"]:
        ev = r["evidence"]
        if "support_px" not in ev:
            continue
        est = KernelEstimate(kernel=np.zeros((1, 1)), support=ev["support_px"], crop_kernels=(), crop_boxes=(),
                             crop_agreement=ev["crop_agreement"], reblur_residual=ev["reblur_residual"],
                             confidence=ev["confidence"], seconds=0.0)
        r["chosen"], new_evidence = choose(est, cfg, ev.get("overshoot"), ev.get("checks"))
        r["evidence"] = {**new_evidence, "overshoot": ev.get("overshoot")}
        r["thorough"] = r["unshrunk"] = r["psnr"].get(r["chosen"], r["psnr"]["network"])
    out["buckets"] = bucket_table(out["rows"])
    out["meta"]["settings"] = cfg.model_dump()
    out["meta"]["reselected"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if "thresholds" in out:
        out["thresholds"] = calibrate(out["rows"], cfg)
    path.write_text(json.dumps(out, indent=1) + "\n")
    text = markdown(out["meta"], out["buckets"], out.get("seconds_per_720p"))
    if "thresholds" in out:
        text += calibration_markdown(out["thresholds"])
    path.with_suffix(".md").write_text(text)
    print(text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "pretrained" / "nafnet16.pt"))
    parser.add_argument("--heldout-dir", default=str(HELD_OUT_DIR))
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="only the first N photos (a quick look)")
    parser.add_argument("--calibrate", action="store_true", help="training photos; writes the threshold table")
    parser.add_argument("--calibration-seeds", type=int, default=2,
                        help="--calibrate: kernels per photo and bucket (seeds from %d)" % CALIBRATION_SEED)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="re-time fast vs thorough on a 720p frame only")
    parser.add_argument("--reselect", action="store_true",
                        help="re-apply the selector of params.yaml to the rows of the last results (no restoration)")
    parser.add_argument("--error-ratio", action="store_true", help="also Levin's error ratio (2 more deconvolutions "
                        "per case; bench_kernel_estimation.py reports it)")
    args = parser.parse_args()
    params = load_params(Path(args.params))
    cfg, gamma = params.kernel_aware, params.synthesize.gamma
    if args.speed_only:
        network = network_latent_fn(args.checkpoint, threads=args.threads, tiling=(
            params.tiling.tile_size, params.tiling.overlap, params.tiling.batch_size))
        load = round(os.getloadavg()[0], 2)
        speed = seconds_per_frame(network, cfg, gamma, repeats=3)
        out = json.loads((RESULTS / "kernel_aware.json").read_text())
        out["seconds_per_720p"] = {**speed, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "load_average_before": load}
        (RESULTS / "kernel_aware.json").write_text(json.dumps(out, indent=1) + "\n")
        text = markdown(out["meta"], out["buckets"], out["seconds_per_720p"])
        (RESULTS / "kernel_aware.md").write_text(text)
        print(text)
        return 0
    if args.reselect:
        return reselect(RESULTS / ("kernel_selector_calibration.json" if args.calibrate else "kernel_aware.json"), cfg)
    network = network_latent_fn(args.checkpoint, threads=args.threads,
                                tiling=(params.tiling.tile_size, params.tiling.overlap, params.tiling.batch_size))
    if args.calibrate:
        photos = training_photos(params, args.max_side, args.crop)
        seed = [CALIBRATION_SEED + i for i in range(args.calibration_seeds)]
    else:
        photos = bucket_photos(Path(args.heldout_dir), args.max_side, args.crop)
        seed = args.seed
    if args.limit:
        photos = dict(list(photos.items())[: args.limit])
    data = calibration_set(photos, params, seed) if args.calibrate else shake_bucket_set(photos, params, seed)
    rows = run_cases(data, network, cfg, gamma, args.error_ratio)
    table = bucket_table(rows)
    meta = {"photos": len(photos), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "checkpoint": Path(args.checkpoint).name, "seed": seed, "crop": args.crop, "settings": cfg.model_dump()}
    # another seed (fresh kernels on the same photos) goes to its own file beside the default's
    name = "kernel_selector_calibration" if args.calibrate else \
        "kernel_aware" if args.seed == parser.get_default("seed") else f"kernel_aware_seed{args.seed}"
    out = {"meta": meta, "buckets": table, "rows": [{k: v for k, v in r.items() if "kernel" not in k} for r in rows]}
    if args.calibrate:
        out["thresholds"] = calibrate(rows, cfg)
    speed = None if (args.no_speed or args.calibrate) else seconds_per_frame(network, cfg, gamma)
    out["seconds_per_720p"] = speed
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    text = markdown(meta, table, speed)
    if args.calibrate:
        text += calibration_markdown(out["thresholds"])
    elif name == "kernel_aware":
        kernel_picture(rows, IMG / "kernel_aware_kernels.png")
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
