"""The kernel result's hedge (``kernel_aware.kernel_weight``): blends of the blind deconvolution with another
candidate, compared offline on every thorough-mode candidate saved per case.

    python bench/bench_kernel_hedge.py --cache DIR                       # calibration set: every rule
    python bench/bench_kernel_hedge.py --cache DIR --heldout --seed 1234 # held-out: before / shipped / oracle only

Step 1 (slow: about 15 min per 66-78 cases on 2 cores; cases already in ``DIR`` are reused): every candidate of
``deblur.psf.restore.restore_thorough(..., all_candidates=True)`` with ``kernel_weight`` 1.0 (the
deconvolution alone) is saved as ``DIR/NNN.npz`` with the sharp image, and the choice and evidence in
``DIR/cases.json``. The calibration set is ``bench_kernel_aware.py --calibrate``'s (training photos, seeds
4321 and 4322); the held-out set is ``bench_kernel_aware.py``'s for ``--seed``.
Step 2: for each rule, the gain over the blurred input per case; a rule changes only the images of cases whose
choice was the kernel. The rule is chosen on the calibration set; the held-out sets only report the chosen one
(``params.yaml``'s ``kernel_weight``) beside the deconvolution alone and the oracle.

Writes ``bench/results/kernel_hedge_calibration.{json,md}`` or ``kernel_hedge_heldout_<seed>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel_aware import CALIBRATION_SEED, calibration_set, training_photos  # noqa: E402
from bench_quality_speed import HELD_OUT_DIR, bucket_photos, network_latent_fn, shake_bucket_set  # noqa: E402

from deblur.core.config import load_params  # noqa: E402
from deblur.evaluation.metrics import psnr  # noqa: E402
from deblur.psf.metrics import kernel_ncc  # noqa: E402
from deblur.psf.restore import blend, network_scale_for, restore_thorough  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BUCKETS = ("<=21", "23-41", ">=43")
REFERENCES = ("input", "network", "network_half", "network_quarter", "scale")   # scale: the network at the blur's scale
WEIGHTS = (0.5, 0.6, 0.7, 0.8, 0.9)


def save_candidates(data: dict, network, cfg, cache: Path) -> dict:
    """Every candidate per case into ``cache`` (reusing cases already there); returns cases.json's content."""
    cache.mkdir(parents=True, exist_ok=True)
    index_path = cache / "cases.json"
    cases = json.loads(index_path.read_text()) if index_path.is_file() else {}
    alone = cfg.model_copy(update={"kernel_weight": 1.0})
    start = time.perf_counter()
    for i, ((name, label), (blurred, sharp, kernel)) in enumerate(data.items()):
        key = f"{name}|{label}"
        if key in cases and (cache / f"{cases[key]['i']:03d}.npz").is_file():
            continue
        result, made = restore_thorough(blurred, network, alone, all_candidates=True)
        np.savez_compressed(cache / f"{i:03d}.npz", sharp=sharp, true=kernel, est=result.psf, **made)
        cases[key] = {"i": i, "true_size": int(kernel.shape[-1]), "chosen": result.chosen,
                      "evidence": result.evidence, "ncc": float(kernel_ncc(result.psf, kernel)),
                      "psnr": {n: psnr(img, sharp) for n, img in made.items()}}
        index_path.write_text(json.dumps(cases, indent=1))
        print(f"[{i + 1}/{len(data)}] {key}: {result.chosen} ({time.perf_counter() - start:.0f} s)", flush=True)
    return cases


def hedge_rule(weight: float, reference: str, cfg):
    def rule(case: dict, images: dict) -> np.ndarray:
        if case["chosen"] != "kernel":
            return images[case["chosen"]]
        ref = network_scale_for(case["evidence"]["support_px"], cfg) if reference == "scale" else reference
        return blend(images["kernel"], images[ref], weight)
    return rule


def score(rule, cases: dict, cache: Path) -> dict:
    """Gains over the input of ``rule`` per case, summarised: mean, per bucket, count and depth below -0.5 dB."""
    rows = []
    for key, case in cases.items():
        images = dict(np.load(cache / f"{case['i']:03d}.npz"))
        gain = psnr(rule(case, images), images["sharp"]) - case["psnr"]["input"]
        rows.append((key, key.split("|")[1], gain))
    return summarise(rows)


def summarise(rows: list[tuple[str, str, float]]) -> dict:
    """(case key, bucket, gain over the input) rows: mean, per bucket, count and depth below -0.5 dB, worst 3."""
    gains = np.array([g for _, _, g in rows])
    worst = sorted(rows, key=lambda r: r[2])[:3]
    return {"mean": round(float(gains.mean()), 3),
            "buckets": {b: round(float(np.mean([g for _, lb, g in rows if lb == b])), 3) for b in BUCKETS
                        if any(lb == b for _, lb, _ in rows)},
            "below_0_5db": int((gains < -0.5).sum()), "shortfall_db": round(float(np.maximum(0, -0.5 - gains).sum()), 3),
            "worst": [[k, round(float(g), 2)] for k, _, g in worst]}


def markdown(title: str, table: dict, first_column: str = "rule") -> str:
    lines = [title, "", f"| {first_column} | mean gain dB | " + " | ".join(BUCKETS) + " | photos < -0.5 dB | sum of dB below -0.5 | worst 3 |",
             "|---|---|" + "---|" * len(BUCKETS) + "---|---|---|"]
    for name, s in table.items():
        worst = ", ".join(f"{k.replace('|', ' ')} {g:+.2f}" for k, g in s["worst"])
        lines.append(f"| {name} | {s['mean']:+.2f} | " + " | ".join(f"{s['buckets'].get(b, float('nan')):+.2f}" for b in BUCKETS)
                     + f" | {s['below_0_5db']} | {s['shortfall_db']:.2f} | {worst} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "pretrained" / "nafnet16.pt"))
    parser.add_argument("--cache", required=True, help="folder for the saved candidates (reused when there)")
    parser.add_argument("--heldout", action="store_true", help="the held-out photos instead of the calibration set")
    parser.add_argument("--seed", type=int, default=1234, help="--heldout: kernels and noise")
    parser.add_argument("--heldout-dir", default=str(HELD_OUT_DIR))
    args = parser.parse_args()
    params = load_params(Path(args.params))
    cfg = params.kernel_aware
    if args.heldout:
        data = shake_bucket_set(bucket_photos(Path(args.heldout_dir), 1024, 512), params, args.seed)
        name, what = f"kernel_hedge_heldout_{args.seed}", f"held-out photos, seed {args.seed} (not used to choose)"
    else:
        seeds = [CALIBRATION_SEED, CALIBRATION_SEED + 1]
        data = calibration_set(training_photos(params, 1024, 512), params, seeds)
        name, what = "kernel_hedge_calibration", f"calibration set: training photos, seeds {seeds}"
    network = network_latent_fn(args.checkpoint)
    cases = save_candidates(data, network, cfg, Path(args.cache))
    cases = {k: v for k, v in cases.items() if tuple(k.split("|")) in data}

    def oracle(case, images):
        return images[max(case["psnr"], key=case["psnr"].get)]

    rules = {"deconvolution alone (kernel_weight 1.0)": hedge_rule(1.0, "input", cfg)}
    if args.heldout:
        rules[f"shipped: {cfg.kernel_weight} deconvolution + network_half"] = hedge_rule(cfg.kernel_weight, "network_half", cfg)
    else:
        for weight in WEIGHTS:
            for reference in REFERENCES:
                rules[f"{weight} deconvolution + {reference}"] = hedge_rule(weight, reference, cfg)
    rules["oracle (best candidate, needs the sharp image)"] = oracle
    table = {}
    for rule_name, rule in rules.items():
        table[rule_name] = score(rule, cases, Path(args.cache))
        print(f"{rule_name}: {table[rule_name]}", flush=True)
    title = (f"Hedging the kernel result on the {what}: {len(cases)} cases, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Gain over the blurred input, dB. "
             "A rule changes only cases whose choice was the kernel.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"cases": len(cases), "rules": table}, indent=1) + "\n")
    text = markdown(title, table)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
