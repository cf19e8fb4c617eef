"""Stage ingest: a manifest of sharp images (and GoPro's real blurred partners), logged to MLflow."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from deblur.tracking import runs as tracking
from deblur.core.config import load_params
from deblur.data.ingest import SKIPPED_NAME, preview_sheet, read_manifest, run_ingest
from deblur.data.pairs import SPLITS
from deblur.core.stage_spec import STAGES


def run_ingest_stage(params_path: Path, out_dir: Path) -> dict[str, float]:
    params = load_params(params_path)
    tags = {"source": params.ingest.source}
    with tracking.stage_run("ingest", params, sections=STAGES["ingest"].params, tags=tags):
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
    if skipped:
        print(f"warning: skipped {skipped} unreadable file(s), listed in {out_dir / SKIPPED_NAME}", file=sys.stderr)
    return metrics
