"""Make the shipped checkpoints' training runs visible in your MLflow store.

    python -m deblur.import_pretrained [--experiment deblur-pretraining]

Each ``checkpoints/pretrained/<name>.run.json`` (params, tags, full metric histories exported
from the store it was trained in) becomes a run of the experiment, with the checkpoint as an
artifact. Idempotent: a run already imported is left alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deblur import tracking

PRETRAINED_DIR = Path(__file__).resolve().parents[2] / "checkpoints" / "pretrained"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="deblur-pretraining")
    parser.add_argument("--dir", type=Path, default=PRETRAINED_DIR)
    args = parser.parse_args(argv)
    for record in sorted(args.dir.glob("*.run.json")):
        checkpoint = record.with_name(record.name.replace(".run.json", ".pt"))
        run_id = tracking.import_run(record, args.experiment, [checkpoint] if checkpoint.exists() else [])
        print(f"{record.name}: run {run_id} in experiment {args.experiment!r} ({tracking.tracking_uri()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
