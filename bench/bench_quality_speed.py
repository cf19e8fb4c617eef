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
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from deblur import viz
from deblur.checkpoints import load_checkpoint, model_from_checkpoint
from deblur.config import ModelConfig, load_params
from deblur.data.blur import apply_blur, sample_blur
from deblur.data.ingest import downscale
from deblur.evaluation import classical_deconvolution
from deblur.imageio import write_png
from deblur.metrics import psnr, ssim
from deblur.models import build_model, configure_inference, count_parameters
from deblur.tiling import deblur_array

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
IMG = ROOT / "documentation" / "img"
HELD_OUT = ("astronaut", "chelsea", "coffee", "retina")
BLUR_TYPES = ("motion", "gaussian", "defocus", "lens")


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--checkpoint", action="append", default=[], help="trained checkpoint (repeatable)")
    parser.add_argument("--speed-only", nargs="*", default=[], help="untrained sizes timed for the curve")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--tile-sweep", nargs="*", type=int, default=[], help="tile sizes to time the first checkpoint at")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
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
