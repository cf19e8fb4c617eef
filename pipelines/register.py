"""DVC stage `register`: register the trained model, promote it to `champion` if it passes the gate.

    python pipelines/register.py --params params.yaml --run-info reports/train_run.json \
        --per-image reports/per_image.csv --sharp-in reports/sharp_in.csv --pairs data/pairs \
        --decision reports/registered_model.json --serving-dir function_app/model
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
    from deblur.stages.register import run_register

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--run-info", type=Path, required=True, help="train stage's run info JSON")
    parser.add_argument("--per-image", type=Path, required=True, help="evaluate stage's per-image CSV")
    parser.add_argument("--sharp-in", type=Path, required=True, help="evaluate stage's sharp-in CSV")
    parser.add_argument("--pairs", type=Path, required=True, help="synthesize stage output (test split re-scores the champion)")
    parser.add_argument("--decision", type=Path, required=True, help="JSON: version, alias decision, every gate check")
    parser.add_argument("--serving-dir", type=Path, required=True, help="where the champion's serving artifact goes")
    args = parser.parse_args(argv)
    return fail_cleanly(run_register, args.params, args.run_info, args.per_image, args.sharp_in, args.pairs,
                        args.decision, args.serving_dir)


if __name__ == "__main__":
    sys.exit(main())
