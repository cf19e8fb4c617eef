#!/usr/bin/env bash
# Shrink the pre-training photo folder to what a device call can carry (scripts/gpu_pretrain.sh):
# each photo downscaled with the ingest's own deblur.data.ingest.downscale to MAX_SIDE (512, the
# ingest.folder.max_side of configs/pretrain-cpu.yaml and pretrain-gpu.yaml) and saved as JPEG
# (quality QUALITY, 4:4:4 chroma: no chroma blur in the sharp targets). A JPEG original that needs no
# downscale is copied byte for byte (same pixels, same name, so the same hash split).
#   usage: scripts/gpu_carry_photos.sh [SRC (data/pretrain_photos)] [DEST (data/pretrain_photos_512)]
#   env:   QUALITY (92), MAX_SIDE (512), PYTHON (.venv/bin/python)
# Lossy on purpose: the 26 MB of originals are mostly PNGs already at most 512 px (144 dead-leaves
# images of 256², 19 MB, with a film grain that no lossless codec shrinks: lossless WebP 15 MB), so
# downscaling alone saves ~1 MB, and a device call carries at most 64 MiB with the tracked files and
# wheels (scripts/gpu_pretrain.sh header). Measured 2026-12-02, quality 92: 9.6 MB (95: 12.3 MB,
# 90: 8.7 MB); against the originals' ingest output, PSNR median 35.3 dB (min 32.9) for the dead
# leaves, whose grain loses most, 41.6 dB (min 36.7) for the photos, 6 JPEGs unchanged. File names
# end in .jpg, and ingest's hash split is keyed by the file name: val is 7 images here, not the 16
# of the originals (2 in common). Fine for a separate GPU run; held-out evaluation is
# bench/bench_quality_speed.py's, on other photos.
set -euo pipefail
src=${1:-data/pretrain_photos}
dest=${2:-data/pretrain_photos_512}
py=${PYTHON:-.venv/bin/python}
root=$(cd "$(dirname "$0")/.." && pwd)
[[ -d $src ]] || { echo "$src: no such folder (scripts/fetch_pretrain_photos.sh $src makes it)" >&2; exit 1; }
tmp="$dest.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
PYTHONPATH=$root/src "$py" - "$src" "$tmp" "${QUALITY:-92}" "${MAX_SIDE:-512}" "$dest" <<'PY'
import shutil
import sys
from pathlib import Path

from PIL import Image

from deblur.data.ingest import _hidden, _is_image, downscale
from deblur.core.imageio import decode_image

src, dest, quality, max_side = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
files = sorted(p for p in src.rglob("*") if _is_image(p) and not _hidden(p.relative_to(src)))
seen = set()
for path in files:
    rel = path.relative_to(src).with_suffix(".jpg")
    if rel in seen:
        raise SystemExit(f"{path}: clashes with another photo as {rel}")
    seen.add(rel)
    out = dest / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    decoded = decode_image(path)
    rgb = downscale(decoded.rgb, max_side)
    if decoded.format == "JPEG" and rgb is decoded.rgb and path.suffix.lower() == ".jpg":
        shutil.copyfile(path, out)      # no downscale: the original bytes, the same pixels at ingest
    else:
        Image.fromarray(rgb).save(out, "JPEG", quality=quality, subsampling=0)
total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
print(f"{len(files)} photos -> {sys.argv[5]}: {total / 1e6:.1f} MB (JPEG quality {quality}, max side {max_side})")
PY
rm -rf "$dest"; mv "$tmp" "$dest"
du -sb "$dest"
