"""DVC stage `register`: register the trained model, promote it to `champion` if it passes the gate.

    python pipelines/register.py --params params.yaml --run-info reports/train_run.json \
        --metrics reports/metrics.json --pairs data/pairs \
        --decision reports/registered_model.json --serving-dir function_app/model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deblur.cli import fail_cleanly
from deblur.stages import run_register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--run-info", type=Path, required=True, help="train stage's run info JSON")
    parser.add_argument("--metrics", type=Path, required=True, help="evaluate stage's metrics JSON")
    parser.add_argument("--pairs", type=Path, required=True, help="synthesize stage output (test split re-scores the champion)")
    parser.add_argument("--decision", type=Path, required=True, help="JSON: version, alias decision, scores, model URI")
    parser.add_argument("--serving-dir", type=Path, required=True, help="where the champion's serving artifact goes")
    args = parser.parse_args(argv)
    return fail_cleanly(run_register, args.params, args.run_info, args.metrics, args.pairs, args.decision,
                        args.serving_dir)


if __name__ == "__main__":
    sys.exit(main())
