"""The shrink toward the input (``kernel_aware.input_shrink``): how much of thorough mode's change to a photo is kept,
max(0, 1 - c / blur rms), chosen on training photos and reported once on held-out ones.

    python bench/bench_input_shrink.py --cache DIR                        # calibration: every c
    python bench/bench_input_shrink.py --cache DIR --heldout --seed 1234  # held-out: off / shipped only

Step 1 (slow, cases already in ``DIR`` are reused): every thorough-mode candidate per case, saved by
``bench_kernel_hedge.save_candidates``: ``DIR/calibration`` (``bench_kernel_aware.py --calibrate``'s set: training
photos, seeds 4321 and 4322), ``DIR/soft_<seed>`` (the same training photos made soft, gaussian sigma 1.5 px as
depth of field leaves them, then camera shake of the <=21 and 23-41 px buckets: the nearly sharp photos the first
set lacks) and ``DIR/heldout_<seed>``.
Step 2: per case the unshrunk result (the chosen candidate; the kernel result hedged by ``kernel_weight``) and the
shipped ``deblur.psf.restore.blur_rms``; per c the gain over the input. Chosen: the fewest photos more than 0.5 dB
below their input among the c whose mean gain is not below the unshrunk one (ties: the higher mean).

Writes ``bench/results/input_shrink_calibration.{json,md}`` or ``input_shrink_heldout_<seed>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel_aware import CALIBRATION_SEED, calibration_set, training_photos  # noqa: E402
from bench_kernel_hedge import markdown, save_candidates, summarise  # noqa: E402
from bench_quality_speed import HELD_OUT_DIR, bucket_photos, network_latent_fn, shake_bucket_set  # noqa: E402

from deblur.core.config import load_params  # noqa: E402
from deblur.evaluation.metrics import psnr  # noqa: E402
from deblur.psf.restore import HEDGE_REFERENCE, blend, blur_rms, shrink_weight  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SOFT_SIGMA = 1.5
SOFT_BUCKETS = ("<=21", "23-41")
LEVELS = (0.0, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0)


def soft_set(params, seed: int) -> dict:
    photos = {f"soft_{n}": cv2.GaussianBlur(rgb, (0, 0), SOFT_SIGMA) for n, rgb in training_photos(params, 1024, 512).items()}
    return {k: v for k, v in calibration_set(photos, params, [seed]).items() if k[1] in SOFT_BUCKETS}


def unshrunk_cases(cache: Path, cfg) -> list[dict]:
    """Per saved case: input, unshrunk result, sharp image, input PSNR and blur rms."""
    out = []
    for key, case in json.loads((cache / "cases.json").read_text()).items():
        images = dict(np.load(cache / f"{case['i']:03d}.npz"))
        chosen = case["chosen"]
        result = (blend(images["kernel"], images[HEDGE_REFERENCE], cfg.kernel_weight) if chosen == "kernel"
                  else images[chosen])
        out.append({"key": f"{cache.name}/{key}", "bucket": key.split("|")[1], "input": images["input"],
                    "result": result, "sharp": images["sharp"], "input_psnr": case["psnr"]["input"],
                    "blur_rms": blur_rms(images["input"], images["est"])})
    return out


def gains(cases: list[dict], levels: float) -> np.ndarray:
    return np.array([psnr(blend(c["result"], c["input"], shrink_weight(c["blur_rms"], levels)), c["sharp"])
                     - c["input_psnr"] for c in cases])


def summary(g: np.ndarray, cases: list[dict]) -> dict:
    return summarise([(c["key"], c["bucket"], float(x)) for x, c in zip(g, cases)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "pretrained" / "nafnet16.pt"))
    parser.add_argument("--cache", required=True, help="folder for the saved candidates (reused when there)")
    parser.add_argument("--heldout", action="store_true", help="the held-out photos instead of the calibration sets")
    parser.add_argument("--seed", type=int, default=1234, help="--heldout: kernels and noise")
    args = parser.parse_args()
    params = load_params(Path(args.params))
    cfg = params.kernel_aware
    cache = Path(args.cache)
    seeds = [CALIBRATION_SEED, CALIBRATION_SEED + 1]
    if args.heldout:
        sets = {f"heldout_{args.seed}": lambda: shake_bucket_set(bucket_photos(HELD_OUT_DIR, 1024, 512), params, args.seed)}
    else:
        sets = {"calibration": lambda: calibration_set(training_photos(params, 1024, 512), params, seeds),
                **{f"soft_{s}": (lambda s=s: soft_set(params, s)) for s in seeds}}
    network = None
    cases = []
    for name, make in sets.items():
        data = make()
        index = cache / name / "cases.json"
        done = json.loads(index.read_text()) if index.is_file() else {}
        if any(f"{n}|{lb}" not in done for n, lb in data):
            network = network or network_latent_fn(args.checkpoint)
            save_candidates(data, network, cfg, cache / name)
        cases += unshrunk_cases(cache / name, cfg)
    levels = (0.0, cfg.input_shrink) if args.heldout else LEVELS
    soft = np.array([c["key"].startswith("soft_") for c in cases])
    table = {}
    for level in levels:
        g = gains(cases, level)
        table[f"{level:g}"] = summary(g, cases)
        if soft.any():
            table[f"{level:g}"]["soft_mean"] = round(float(g[soft].mean()), 3)
    for c, row in table.items():
        print(f"input_shrink {c}: {row}", flush=True)
    lines = [f"Shrink toward the input on {'the held-out photos, seed ' + str(args.seed) + ' (not used to choose)' if args.heldout else 'the calibration sets (training photos; soft ones included)'}: "
             f"{len(cases)} cases, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Gain over the blurred input, dB; "
             "0 = off (the unshrunk choice).", ""]
    if not args.heldout:
        base = table["0"]["mean"]
        eligible = [c for c in table if table[c]["mean"] >= base]
        best = min(eligible, key=lambda c: (table[c]["below_0_5db"], -table[c]["mean"]))
        lines += [f"Chosen: input_shrink {best} (fewest photos below -0.5 dB with a mean not below the unshrunk {base:+.2f} dB). "
                  f"params.yaml has {cfg.input_shrink:g}.", ""]
    stem = f"input_shrink_heldout_{args.seed}" if args.heldout else "input_shrink_calibration"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"cases": len(cases), "levels": table}, indent=1) + "\n")
    text = markdown("\n".join(lines).rstrip("\n"), table, "input_shrink")
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
