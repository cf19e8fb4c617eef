"""DVC stage `ingest`: gather sharp images (and GoPro's real blurred partners) into a manifest.

    python pipelines/ingest.py --params params.yaml --out data/ingested

Writes <out>/manifest.jsonl, <out>/skipped.jsonl and (folder, embedded sources) <out>/images/.
Logs an MLflow run (stage=ingest): ingest params, image counts, a contact sheet, tag data_hash.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    from deblur.cli import fail_cleanly
except ModuleNotFoundError as err:  # stage commands run `python` from PATH
    sys.exit(f"error: {sys.executable} cannot import the deblur package ({err}); activate the project venv "
             "(source .venv/bin/activate) or run `make repro`")


def main(argv: list[str] | None = None) -> int:
    from deblur.stages.ingest import run_ingest_stage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced as a whole)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[ingest] %(message)s")
    return fail_cleanly(run_ingest_stage, args.params, args.out)


if __name__ == "__main__":
    sys.exit(main())
