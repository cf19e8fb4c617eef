"""DVC stage `synthesize`: blurred/sharp training pairs from the ingest manifest.

    python pipelines/synthesize.py --params params.yaml --manifest data/ingested/manifest.jsonl --out data/pairs

Writes <out>/{train,val,test}/{clear_images,blur_images,kernels,blur_types.json}.
Logs an MLflow run (stage=synthesize): synthesize params, pair counts per split and blur type,
mean input PSNR per blur type, a contact sheet, tags data_hash and manifest_hash.
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
    from deblur.stages.synthesize import run_synthesize_stage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.jsonl written by the ingest stage")
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced as a whole)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[synthesize] %(message)s")
    return fail_cleanly(run_synthesize_stage, args.params, args.manifest, args.out)


if __name__ == "__main__":
    sys.exit(main())
