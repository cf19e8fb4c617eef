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
import time
from pathlib import Path

from deblur import tracking
from deblur.config import ConfigError, load_params
from deblur.data.ingest import IngestError
from deblur.data.pairs import INDEX_NAME, PairsError
from deblur.data.synthesize import preview_sheet, run_synthesize
from deblur.imageio import ImageError


def synthesize_stage(params_path: Path, manifest: Path, out_dir: Path) -> None:
    params = load_params(params_path)
    if not manifest.is_file():
        raise IngestError(f"{manifest}: manifest not found; run the ingest stage first")
    tags = {"manifest_hash": tracking.files_digest(manifest)}
    with tracking.stage_run("synthesize", params, sections=("synthesize",), tags=tags):
        start = time.perf_counter()
        summary = run_synthesize(params, manifest, out_dir)
        indexes = sorted(out_dir.glob(f"*/{INDEX_NAME}"))
        metrics = {f"pairs_{split}": n for split, n in summary.pairs_per_split.items()}
        metrics.update({f"pairs_{blur_type}": n for blur_type, n in summary.pairs_per_blur_type.items()})
        metrics.update({f"input_psnr_{blur_type}": v for blur_type, v in summary.input_psnr.items()})
        metrics.update(pairs_total=sum(summary.pairs_per_split.values()), seconds=time.perf_counter() - start)
        tracking.log_metrics(metrics)
        tracking.set_tags({"data_hash": tracking.files_digest(indexes)})
        for index in indexes:
            tracking.log_artifact(index, f"data/{index.parent.name}")
        tracking.log_image(preview_sheet(out_dir), "data/synthesize_samples.png")
    for split, n in summary.pairs_per_split.items():
        if not n:
            print(f"warning: the {split} split is empty", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.jsonl written by the ingest stage")
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced as a whole)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[synthesize] %(message)s")
    try:
        synthesize_stage(args.params, args.manifest, args.out)
    except (ConfigError, ImageError, IngestError, PairsError) as err:
        print("error: " + "; ".join(line.strip() for line in str(err).splitlines()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
