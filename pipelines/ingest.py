"""DVC stage `ingest`: gather sharp images (and GoPro's real blurred partners) into a manifest.

    python pipelines/ingest.py --params params.yaml --out data/ingested

Writes <out>/manifest.jsonl, <out>/skipped.jsonl and (folder, embedded sources) <out>/images/.
Logs an MLflow run (stage=ingest): ingest params, image counts, a contact sheet, tag data_hash.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from deblur import tracking
from deblur.config import ConfigError, load_params
from deblur.data.ingest import SKIPPED_NAME, IngestError, preview_sheet, read_manifest, run_ingest
from deblur.data.pairs import SPLITS
from deblur.imageio import ImageError


def ingest_stage(params_path: Path, out_dir: Path) -> None:
    params = load_params(params_path)
    tags = {"source": params.ingest.source}
    with tracking.stage_run("ingest", params, sections=("ingest",), tags=tags):
        start = time.perf_counter()
        manifest = run_ingest(params, out_dir)
        rows = read_manifest(manifest)
        skipped = len((out_dir / SKIPPED_NAME).read_text().splitlines())
        metrics = {f"images_{split}": sum(r.split == split for r in rows) for split in SPLITS}
        for source in sorted({r.source for r in rows}):
            metrics[f"images_{source}"] = sum(r.source == source for r in rows)
        metrics.update(images_total=len(rows), skipped_files=skipped, seconds=time.perf_counter() - start)
        tracking.log_metrics(metrics)
        tracking.set_tags({"data_hash": tracking.files_digest(manifest)})
        tracking.log_artifact(manifest, "data")
        tracking.log_artifact(out_dir / SKIPPED_NAME, "data")
        tracking.log_image(preview_sheet(rows), "data/ingest_samples.png")
    for split in SPLITS:
        if not metrics[f"images_{split}"]:
            print(f"warning: the {split} split is empty", file=sys.stderr)
    if skipped:
        print(f"warning: skipped {skipped} unreadable file(s), listed in {out_dir / SKIPPED_NAME}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced as a whole)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[ingest] %(message)s")
    try:
        ingest_stage(args.params, args.out)
    except (ConfigError, ImageError, IngestError) as err:
        print("error: " + "; ".join(line.strip() for line in str(err).splitlines()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
