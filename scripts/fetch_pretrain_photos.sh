#!/usr/bin/env bash
# Assemble the photo folder the shipped checkpoint was trained on (configs/pretrain-cpu.yaml):
#   - natural photos from Debian's opencv-doc sample data (OpenCV licence; see
#     /usr/share/doc/opencv-doc/copyright inside the package), fetched with apt-get download;
#   - scikit-learn's two sample photos (china, flower; CC-BY, see sklearn/datasets/images/README.txt);
#   - the train/val images of the embedded source (scikit-image photos minus the test
#     photos, and dead leaves with depth of field), exported by an embedded ingest.
# Nothing from Debian's wallpaper packages: those are reserved for independent evaluation.
#   usage: scripts/fetch_pretrain_photos.sh OUT_DIR   (needs apt-get, and scikit-learn: pip install scikit-learn)
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download opencv-doc >/dev/null && dpkg-deb -x opencv-doc_*.deb x)
data="$tmp/x/usr/share/doc/opencv-doc/examples/data"
for name in butterfly.jpg orange.jpg apple.jpg aero1.jpg aero3.jpg squirrel_cls.jpg messi5.jpg building.jpg \
            fruits.jpg board.jpg basketball1.png baboon.jpg ela_original.jpg leuvenA.jpg aloeL.jpg \
            rubberwhale1.png chicky_512.png graf1.png box_in_scene.png home.jpg; do
  cp "$data/$name" "$out/opencv_$name"
done
"$py" - "$out" <<'PY'
import sys
from pathlib import Path
from PIL import Image
from sklearn.datasets import load_sample_images
out = Path(sys.argv[1])
bunch = load_sample_images()
for name, img in zip(bunch.filenames, bunch.images):
    Image.fromarray(img).save(out / f"sklearn_{Path(name).stem}.png")
PY
"$py" - "$out" <<'PY'
import json, shutil, sys, tempfile
from pathlib import Path
from deblur.core.config import load_params
from deblur.data.ingest import run_ingest
out = Path(sys.argv[1])
params = load_params("params.yaml", overrides={"ingest.source": "embedded", "ingest.embedded.dead_leaves.count": 160})
with tempfile.TemporaryDirectory() as tmp:
    manifest = run_ingest(params, Path(tmp) / "ingested")
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        if row["split"] != "test":
            shutil.copy(row["path"], out / f"embedded_{Path(row['path']).name}")
PY
ls "$out" | wc -l
