"""DVC stage `train`: fit the model in params.yaml on the synthesize stage's pairs.

    python pipelines/train.py --params params.yaml --pairs data/pairs \
        --checkpoints checkpoints --curve reports/train_curve.csv --run-info reports/train_run.json

Run under ``torchrun --nproc_per_node N`` for DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deblur.cli import fail_cleanly
from deblur.stages import run_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--pairs", type=Path, required=True, help="synthesize stage output folder")
    parser.add_argument("--checkpoints", type=Path, required=True, help="folder for last.pt and best.pt")
    parser.add_argument("--curve", type=Path, required=True, help="training curve CSV (DVC plot)")
    parser.add_argument("--run-info", type=Path, required=True, help="JSON with the MLflow run id and model URI")
    args = parser.parse_args(argv)
    return fail_cleanly(run_train, args.params, args.pairs, args.checkpoints, args.curve, args.run_info)


if __name__ == "__main__":
    sys.exit(main())
