"""DVC stage `train`: fit the model in params.yaml on the synthesize stage's pairs.

    python pipelines/train.py --params params.yaml --pairs data/pairs \
        --checkpoints checkpoints --curve reports/train_curve.csv --val-curve reports/val_curve.csv \
        --run-info reports/train_run.json

An unfinished <checkpoints>/last.pt of the same params, data and code is resumed; anything
else starts fresh and says why. Run under ``torchrun --nproc_per_node N`` for DDP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from deblur.cli import fail_cleanly
except ModuleNotFoundError as err:  # stage commands run `python` from PATH
    sys.exit(f"error: {sys.executable} cannot import the deblur package ({err}); activate the project venv "
             "(source .venv/bin/activate) or run `make repro`")


def main(argv: list[str] | None = None) -> int:
    from deblur.stages.train import run_train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--pairs", type=Path, required=True, help="synthesize stage output folder")
    parser.add_argument("--checkpoints", type=Path, required=True, help="folder for last.pt and best.pt")
    parser.add_argument("--curve", type=Path, required=True,
                        help="training curve CSV, one row per logged step (DVC plot)")
    parser.add_argument("--val-curve", type=Path, default=None,
                        help="validation curve CSV, one row per validation (DVC plot); default: val_curve.csv "
                             "beside --curve")
    parser.add_argument("--run-info", type=Path, required=True, help="JSON with the MLflow run id and checkpoint")
    parser.add_argument("--resume-from", type=Path, default=None,
                        help="continue this unfinished checkpoint even though the code changed "
                             "(params and data must match); for long runs across code updates")
    args = parser.parse_args(argv)
    return fail_cleanly(run_train, args.params, args.pairs, args.checkpoints, args.curve, args.run_info,
                        args.resume_from, args.val_curve)


if __name__ == "__main__":
    sys.exit(main())
