"""Print what a pipeline run produced: PSNR before/after per blur type, registry state, where to look.

    python -m deblur.cli.summary [--reports reports]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deblur.evaluation.gate import gate_lines


def format_summary(metrics: dict, decision: dict) -> str:
    lines = ["", "Test PSNR / SSIM (whole images; blurred input and classical deconvolution with the true PSF as references)",
             f"  {'blur type':<10} {'n':>3}  {'input':>13}  {'model':>13}  {'gain':>7}  {'classical':>9}"]
    rows = [("all", metrics["overall"] | {"n": metrics["n_images"]}), *metrics["per_blur_type"].items()]
    for name, s in rows:
        classical = f"{s['baseline_psnr']:9.2f}" if "baseline_psnr" in s else f"{'-':>9}"
        lines.append(f"  {name:<10} {s['n']:>3}  {s['input_psnr']:6.2f}/{s['input_ssim']:.3f}  "
                     f"{s['model_psnr']:6.2f}/{s['model_ssim']:.3f}  {s['model_psnr'] - s['input_psnr']:+7.2f}  {classical}")
    if "sharp_in" in metrics:
        lines.append(f"  sharp-in check: unblurred photos come out at {metrics['sharp_in']['psnr']:.2f} dB "
                     f"(worst {metrics['sharp_in']['min_psnr']:.2f} dB) against themselves")
    lines += shake_lines(metrics)
    lines += ["", *gate_lines(decision)]
    uri = decision.get("tracking_uri", "sqlite:///mlflow.db")
    ui = (f"  open {uri}   (the shared tracking server's UI)" if uri.startswith(("http://", "https://"))
          else f"  mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000")
    serve = ("  make serve   (HTTP service with the champion on http://127.0.0.1:7071)" if decision.get("champion_uri")
             else "  make serve   answers 503 until a model passes the gate (see above)")
    lines += ["", "Where to look:", ui,
              "  dvc metrics show ; dvc plots show   (reports/ holds metrics, per-image CSV and triptychs)", serve, ""]
    return "\n".join(lines)


def shake_lines(metrics: dict) -> list[str]:
    """Camera shake per kernel size: the served model, the thorough mode, the true-PSF ceiling, kernel NCC."""
    buckets = metrics.get("per_kernel_bucket", {}).get("motion", {})
    rows = [(label, b) for label, b in buckets.items() if b.get("n") and "thorough_psnr" in b]
    if not rows:
        return []
    lines = ["", "Camera shake per kernel size (input / served model / thorough mode / true-PSF ceiling, kernel NCC)"]
    for label, b in rows:
        lines.append(f"  {label:<6} n={b['n']:<3} {b['input_psnr']:6.2f}  {b['model_psnr']:6.2f}  "
                     f"{b['thorough_psnr']:6.2f}  {b['nonblind_psnr']:6.2f}  NCC {b.get('kernel_ncc', float('nan')):.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    metrics = json.loads((args.reports / "metrics.json").read_text())
    decision = json.loads((args.reports / "registered_model.json").read_text())
    print(format_summary(metrics, decision))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
