"""Reading the synthesize stage's output: one ``PairRecord`` per blurred/sharp pair.

Layout of a pairs folder (written by ``deblur.data.synthesize``)::

    <pairs>/<split>/clear_images/<id>.png
    <pairs>/<split>/blur_images/<id>.png
    <pairs>/<split>/kernels/<id>.npy        (synthetic blur only)
    <pairs>/<split>/blur_types.json         (one JSON object a line, paths relative to <split>/)

Each line's ``kernel`` object holds the drawn parameters, ``size`` (the side of the PSF's
support in pixels, odd; for camera shake the drawn ``canvas`` cropped to its non-zero taps)
and ``shape``; ``kernel`` is null for real (GoPro) pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from deblur.core.errors import DeblurError

SPLITS = ("train", "val", "test")
INDEX_NAME = "blur_types.json"


class PairsError(DeblurError, ValueError):
    """A pairs folder or split is missing or inconsistent; the message names the file."""


@dataclass(frozen=True)
class PairRecord:
    id: str
    clear_path: Path
    blur_path: Path
    blur_type: str               # motion | gaussian | defocus | lens | real
    kernel_path: Path | None     # float32 PSF (k, k) or (3, k, k); None for real blur
    source: str                  # manifest source: gopro | folder | skimage | dead_leaves
    name: str                    # manifest name of the sharp image (shared by its pairs)
    kernel_size: int | None = None   # side of the PSF's support in px (odd); None for real blur

    @property
    def is_synthetic_scene(self) -> bool:
        """True for procedurally generated images (dead leaves), False for photos."""
        return self.source == "dead_leaves"


def read_pairs(pairs_dir: str | Path, split: str) -> list[PairRecord]:
    """The pairs of ``split``, in file order; every referenced file must exist."""
    if split not in SPLITS:
        raise PairsError(f"unknown split {split!r}; known: {list(SPLITS)}")
    split_dir = Path(pairs_dir) / split
    index = split_dir / INDEX_NAME
    if not index.is_file():
        raise PairsError(f"{index}: split {split!r} not found; run the synthesize stage to create {pairs_dir}")
    return [_record(line, split_dir, index, number)
            for number, line in enumerate(index.read_text().splitlines(), start=1) if line.strip()]


def _record(line: str, split_dir: Path, index: Path, number: int) -> PairRecord:
    try:
        entry = json.loads(line)
        kernel = entry["kernel"]
        record = PairRecord(
            id=entry["id"], clear_path=split_dir / entry["clear_image"], blur_path=split_dir / entry["blur_image"],
            blur_type=entry["blur_type"], kernel_path=split_dir / kernel["file"] if kernel else None,
            source=entry["source"], name=entry["name"],
            kernel_size=int(kernel.get("size", kernel["shape"][-1])) if kernel else None)
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise PairsError(f"{index}:{number}: not a pair record ({type(err).__name__}: {err})") from err
    for path in (record.clear_path, record.blur_path, record.kernel_path):
        if path is not None and not path.is_file():
            raise PairsError(f"{index}:{number}: {path} does not exist")
    return record
