"""Digests of the data stages' outputs, printed as JSON: run in a subprocess under different CPU
feature limits (NPY_DISABLE_CPU_FEATURES, OPENCV_CPU_DISABLE) by test_cpu_independence.py.

    python tests/cpu_features_probe.py OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from conftest import ROOT, TINY_OVERRIDES

from deblur.core.config import DEGRADATION_TYPES, load_params
from deblur.data.blur import blur_pair
from deblur.data.deadleaves import dead_leaves
from deblur.data.ingest import derive_rng, run_ingest
from deblur.data.synthesize import run_synthesize
from deblur.tracking.runs import files_digest


def blur_digest(params) -> str:
    """Every degradation type, several draws each, on a seeded random image."""
    image = np.random.default_rng(7).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    h = hashlib.sha256()
    for blur_type in DEGRADATION_TYPES:
        for k in range(6):
            blurred, spec = blur_pair(image, derive_rng(0, "probe", f"{blur_type}_{k}"), params.synthesize, blur_type)
            h.update(spec.kernel.tobytes())
            h.update(blurred.tobytes())
    return h.hexdigest()


def main(out: Path) -> None:
    params = load_params(ROOT / "params.yaml", overrides=dict(TINY_OVERRIDES))
    ingested = out / "ingested"
    manifest = run_ingest(params, ingested)
    run_synthesize(params, manifest, out / "pairs")
    leaves = dead_leaves(np.random.default_rng(3), params.ingest.embedded.dead_leaves, size=96)
    print(json.dumps({"ingested": files_digest(ingested), "pairs": files_digest(out / "pairs"),
                      "blur": blur_digest(params), "dead_leaves": hashlib.sha256(leaves.tobytes()).hexdigest()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
