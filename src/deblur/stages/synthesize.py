"""Stage synthesize: blurred/sharp pairs from the ingest manifest, logged to MLflow."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from deblur.tracking import runs as tracking
from deblur.core.config import load_params
from deblur.data.ingest import IngestError
from deblur.data.pairs import INDEX_NAME
from deblur.data.synthesize import SynthesisSummary, preview_sheet, run_synthesize
from deblur.core.stage_spec import STAGES


def run_synthesize_stage(params_path: Path, manifest: Path, out_dir: Path) -> SynthesisSummary:
    params = load_params(params_path)
    if not manifest.is_file():
        raise IngestError(f"{manifest}: manifest not found; run the ingest stage first")
    tags = {"manifest_hash": tracking.files_digest(manifest)}
    with tracking.stage_run("synthesize", params, sections=STAGES["synthesize"].params, tags=tags):
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
    return summary
