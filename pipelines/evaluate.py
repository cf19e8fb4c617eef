"""DVC stage `evaluate`: whole-image test metrics (model, blurred input, classical baseline).

    python pipelines/evaluate.py --params params.yaml --run-info reports/train_run.json --pairs data/pairs \
        --metrics reports/metrics.json --per-image reports/per_image.csv --per-blur reports/psnr_per_blur.csv \
        --sharp-in reports/sharp_in.csv --triptychs reports/triptychs
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads: waiting OpenMP threads sleep (documentation/serving.md)

try:
    from deblur.cli import fail_cleanly
except ModuleNotFoundError as err:  # stage commands run `python` from PATH
    sys.exit(f"error: {sys.executable} cannot import the deblur package ({err}); activate the project venv "
             "(source .venv/bin/activate) or run `make repro`")


def main(argv: list[str] | None = None) -> int:
    from deblur.stages.evaluate import run_evaluate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--run-info", type=Path, required=True, help="train stage's run info JSON")
    parser.add_argument("--pairs", type=Path, required=True, help="synthesize stage output folder")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON (DVC metrics)")
    parser.add_argument("--per-image", type=Path, required=True, help="per-image CSV")
    parser.add_argument("--per-blur", type=Path, required=True, help="PSNR per blur type CSV (DVC plot)")
    parser.add_argument("--sharp-in", type=Path, required=True, help="sharp-in PSNR per photo CSV")
    parser.add_argument("--triptychs", type=Path, required=True, help="folder for blurred/deblurred/sharp PNGs")
    args = parser.parse_args(argv)
    return fail_cleanly(run_evaluate, args.params, args.run_info, args.pairs, args.metrics, args.per_image,
                        args.per_blur, args.sharp_in, args.triptychs)


if __name__ == "__main__":
    sys.exit(main())
