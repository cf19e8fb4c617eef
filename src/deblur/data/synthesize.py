"""Stage synthesize: blurred/sharp pairs from the ingest manifest (layout: ``deblur.data.pairs``).

Each sharp image gets ``synthesize.pairs_per_image`` synthetic blurs (``test_pairs_per_image``
in the test split), pair ``<name>_<k>`` drawn from a generator fixed by (seed, pair id), so the
output does not depend on processing order. Train and val blur types are drawn by
``blur_mix``; test pairs take the blur types with a non-zero share in turn, from an offset
fixed by (seed, image name), so every blur type is tested on every few images. GoPro rows already hold a real blurred partner: they pass through as blur type ``real``
(hard-linked when possible, else copied) with no kernel. Like ingest, the output folder appears
complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deblur.core.config import DEGRADATION_TYPES, Params
from deblur.core.files import atomic_directory
from deblur.data.blur import blur_pair, kernel_image
from deblur.data.ingest import IngestError, ManifestRow, derive_rng, read_manifest
from deblur.data.pairs import INDEX_NAME, SPLITS, read_pairs
from deblur.core.imageio import decode_image, read_rgb, write_png
from deblur.core.progress import progress
from deblur.core.viz import contact_sheet

REAL_BLUR = "real"
log = logging.getLogger(__name__)


@dataclass
class SynthesisSummary:
    """Counts per split and per blur type, and the mean PSNR of blurred vs sharp per blur type."""

    pairs_per_split: dict[str, int] = field(default_factory=dict)
    pairs_per_blur_type: dict[str, int] = field(default_factory=dict)
    input_psnr: dict[str, float] = field(default_factory=dict)


def run_synthesize(params: Params, manifest_path: Path, out_dir: Path) -> SynthesisSummary:
    """Write pairs for every manifest row into ``out_dir/<split>/``; every split folder is created."""
    rows = read_manifest(manifest_path)
    out_dir = Path(out_dir)
    entries: dict[str, list[dict]] = defaultdict(list)
    psnrs: dict[str, list[float]] = defaultdict(list)
    with atomic_directory(out_dir) as staging:
        for split in SPLITS:
            for sub in ("clear_images", "blur_images", "kernels"):
                (staging / split / sub).mkdir(parents=True)
        for row in progress(rows, desc="synthesize", unit="image"):
            split_dir = staging / row.split
            if row.blur_path:
                entries[row.split].append(_pass_through(row, split_dir))
                continue
            for entry, psnr in _synthetic_pairs(row, params, split_dir):
                entries[row.split].append(entry)
                psnrs[entry["blur_type"]].append(psnr)
        for split in SPLITS:
            lines = [json.dumps(e, sort_keys=True) for e in sorted(entries[split], key=lambda e: e["id"])]
            (staging / split / INDEX_NAME).write_text("".join(f"{line}\n" for line in lines))
    types = Counter(e["blur_type"] for split in SPLITS for e in entries[split])
    summary = SynthesisSummary(
        pairs_per_split={split: len(entries[split]) for split in SPLITS},
        pairs_per_blur_type={t: types.get(t, 0) for t in (*DEGRADATION_TYPES, REAL_BLUR)},
        input_psnr={t: float(np.mean(v)) for t, v in sorted(psnrs.items())},
    )
    log.info("synthesized %s pairs, blur types %s", summary.pairs_per_split, dict(types))
    return summary


def _synthetic_pairs(row: ManifestRow, params: Params, split_dir: Path):
    """Yield (index entry, PSNR of blurred vs sharp) for each synthetic pair of ``row``."""
    sharp = _read_checked(row)
    cfg = params.synthesize
    if row.split == "test":
        types = [t for t in DEGRADATION_TYPES if cfg.blur_mix.get(t, 0) > 0]
        offset = int(derive_rng(params.seed, "test-blur-types", row.name).integers(len(types)))
        chosen = [types[(offset + k) % len(types)] for k in range(cfg.test_pairs_per_image)]
    else:
        chosen = [None] * cfg.pairs_per_image
    for k, blur_type in enumerate(chosen):
        pair_id = f"{row.name}_{k}"
        blurred, spec = blur_pair(sharp, derive_rng(params.seed, "synthesize", pair_id), cfg, blur_type)
        clear_file, blur_file, kernel_file = (f"clear_images/{pair_id}.png", f"blur_images/{pair_id}.png",
                                              f"kernels/{pair_id}.npy")
        place_png(Path(row.path), split_dir / clear_file)
        write_png(split_dir / blur_file, blurred)
        np.save(split_dir / kernel_file, spec.kernel)
        kernel = {**spec.params, "file": kernel_file, "shape": list(spec.kernel.shape)}
        noise_sigma = kernel.pop("noise_sigma")
        entry = {"id": pair_id, "name": row.name, "source": row.source, "clear_image": clear_file,
                 "blur_image": blur_file, "blur_type": spec.blur_type, "kernel": kernel, "noise_sigma": noise_sigma}
        yield entry, psnr_uint8(blurred, sharp)


def _read_checked(row: ManifestRow) -> np.ndarray:
    """The sharp image of ``row``, which must be unchanged since ingest and a PNG."""
    path = Path(row.path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise IngestError(f"{path}: listed in the manifest but missing; run the ingest stage again") from err
    if hashlib.sha256(data).hexdigest() != row.sha256:
        raise IngestError(f"{path}: changed since ingest (sha256 differs from the manifest); run ingest again")
    if path.suffix.lower() != ".png":
        raise IngestError(f"{path}: ingest writes sharp images as PNG; run the ingest stage again")
    return decode_image(data, name=str(path)).rgb


def _pass_through(row: ManifestRow, split_dir: Path) -> dict:
    """A real (GoPro) pair, linked into the split with its manifest name as id."""
    clear_file, blur_file = f"clear_images/{row.name}.png", f"blur_images/{row.name}.png"
    for source, target in ((row.path, clear_file), (row.blur_path, blur_file)):
        if not Path(source).is_file():
            raise IngestError(f"{source}: listed in the manifest but missing; run the ingest stage again")
        place_png(Path(source), split_dir / target)
    return {"id": row.name, "name": row.name, "source": row.source, "clear_image": clear_file,
            "blur_image": blur_file, "blur_type": REAL_BLUR, "kernel": None, "noise_sigma": None}


def place_png(source: Path, target: Path) -> None:
    """Put PNG ``source`` at ``target`` by hard link (no extra space) or copy; other formats are converted."""
    if source.suffix.lower() != ".png":
        write_png(target, read_rgb(source))
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def preview_sheet(pairs_dir: Path, per_type: int = 2, height: int = 128) -> np.ndarray:
    """Contact sheet of up to ``per_type`` pairs of each blur type: blurred, sharp and kernel."""
    chosen: dict[str, list] = defaultdict(list)
    for split in SPLITS:
        for record in read_pairs(pairs_dir, split):
            if len(chosen[record.blur_type]) < per_type:
                chosen[record.blur_type].append(record)
    lines, labels = [], []
    for blur_type in sorted(chosen):
        for record in chosen[blur_type]:
            images = [read_rgb(record.blur_path), read_rgb(record.clear_path)]
            names = [blur_type, record.id]
            if record.kernel_path is not None:
                images.append(kernel_image(np.load(record.kernel_path), height))
                names.append("kernel")
            lines.append(images)
            labels.append(names)
    return contact_sheet(lines, labels, height=height)
