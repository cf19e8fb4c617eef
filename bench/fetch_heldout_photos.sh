#!/usr/bin/env bash
# Held-out real photos for bench/bench_quality_speed.py --shake-buckets (camera shake per kernel size).
# None of them is in the shipped checkpoint's training folder (scripts/fetch_pretrain_photos.sh) nor
# in the embedded source's train/val photos; near-duplicates of training photos (aloeR, leuvenB,
# graf3, basketball2, rubberwhale2, ela_modified, the second butterfly and home) are left out.
#   - Debian opencv-doc sample photos not used for training (OpenCV licence, BSD-3-Clause / Apache-2.0;
#     /usr/share/doc/opencv-doc/copyright inside the package): 4 photos, 6 scene-text street photos,
#     3 photos of the hfs sample;
#   - Debian palapeli-data's puzzle collection, 5 photos (public domain or GNU FDL, author and licence
#     in each photo's .desktop file, copied beside it as <name>.desktop).
# The bench adds scikit-image's held-out photos (astronaut, chelsea, coffee, retina) itself.
# Not Debian's wallpaper packages: those stay reserved for independent evaluation.
#   usage: bench/fetch_heldout_photos.sh [OUT_DIR]   (default data/heldout_photos; needs apt-get, dpkg-deb)
set -euo pipefail
out=${1:-data/heldout_photos}
mkdir -p "$out"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download opencv-doc palapeli-data >/dev/null && for deb in *.deb; do dpkg-deb -x "$deb" x; done)
ex="$tmp/x/usr/share/doc/opencv-doc/examples"
for path in alphamat/input_images/plant.jpg data/stuff.jpg data/smarties.png data/left.jpg \
            text/scenetext01.jpg text/scenetext02.jpg text/scenetext03.jpg text/scenetext04.jpg \
            text/scenetext05.jpg text/scenetext06.jpg hfs/data/000.jpg hfs/data/001.jpg hfs/data/002.jpg; do
  name=$(basename "$path"); [[ $path == hfs/* ]] && name="hfs_$name"
  cp "$ex/$path" "$out/opencv_$name"
done
cp "$tmp/x/usr/share/doc/opencv-doc/copyright" "$out/opencv-doc.copyright"
for name in castle-maintenon cincinnati-bridge citrus-fruits european-honey-bee panther-chameleon-female; do
  cp "$tmp/x/usr/share/palapeli/collection/$name.jpg" "$out/palapeli_$name.jpg"
  cp "$tmp/x/usr/share/palapeli/collection/$name.desktop" "$out/palapeli_$name.desktop"
done
ls "$out"/*.jpg "$out"/*.png | wc -l
