"""Stage ingest: gather sharp images (and GoPro's real blurred partners) into a manifest.

``run_ingest`` writes ``manifest.jsonl`` (one ``ManifestRow`` per line), ``skipped.jsonl``
(unreadable files passed over when ``ingest.skip_bad_files`` is true) and, for the ``folder``
and ``embedded`` sources, the converted PNGs under ``images/<split>/``. The folder appears
complete or not at all: everything is written to a temporary sibling that is renamed at the end.
Sources, split rules and conversion rules: documentation/data.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage import data as skimage_data

from deblur.core.errors import DeblurError
from deblur.core.config import EmbeddedConfig, FolderConfig, GoproConfig, Params
from deblur.core.files import atomic_directory, sha256_file
from deblur.data.deadleaves import dead_leaves, palette_from_photos
from deblur.data.pairs import SPLITS
from deblur.core.imageio import IMAGE_SUFFIXES, ImageError, decode_image, read_rgb, write_png
from deblur.core.progress import progress
from deblur.core.viz import contact_sheet

MANIFEST_NAME = "manifest.jsonl"
SKIPPED_NAME = "skipped.jsonl"

log = logging.getLogger(__name__)


class IngestError(DeblurError, ValueError):
    """The source data cannot be ingested; the message names the file, folder or params key."""


@dataclass(frozen=True)
class ManifestRow:
    """One sharp image (and, for GoPro, its real blurred partner)."""

    name: str               # unique, file-name safe id
    split: str              # train | val | test
    source: str             # gopro | folder | skimage | dead_leaves
    path: str               # sharp image, relative to the working directory or absolute
    blur_path: str | None   # real blurred partner (GoPro only)
    width: int
    height: int
    sha256: str             # of the sharp image file

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


# --- entry point ---------------------------------------------------------------------------

def run_ingest(params: Params, out_dir: Path) -> Path:
    """Ingest ``params.ingest.source`` into ``out_dir``; returns the manifest path."""
    cfg = params.ingest
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        if cfg.source == "gopro":
            rows, skipped = ingest_gopro(cfg.gopro, params.seed, cfg.skip_bad_files)
        elif cfg.source == "folder":
            rows, skipped = ingest_folder(cfg.folder, params.seed, cfg.skip_bad_files, staging, out_dir)
        elif cfg.source == "embedded":
            rows, skipped = ingest_embedded(cfg.embedded, params.seed, staging, out_dir), []
        else:
            raise IngestError(f"ingest.source: unknown source {cfg.source!r}; known: embedded, folder, gopro")
        check_splits_filled(rows, cfg)
        write_manifest(rows, staging / MANIFEST_NAME)
        write_jsonl([json.dumps(asdict(s), sort_keys=True) for s in skipped], staging / SKIPPED_NAME)
    counts = {split: sum(r.split == split for r in rows) for split in SPLITS}
    log.info("ingested %d images from %s %s; skipped %d", len(rows), cfg.source, counts, len(skipped))
    return out_dir / MANIFEST_NAME


def check_splits_filled(rows: list[ManifestRow], cfg) -> None:
    """A split asked for (non-zero fraction) that came out empty is an error naming the key to change."""
    keys = {"folder": {"val": ("ingest.folder.val_fraction", cfg.folder.val_fraction),
                       "test": ("ingest.folder.test_fraction", cfg.folder.test_fraction)},
            "gopro": {"val": ("ingest.gopro.val_sequences", cfg.gopro.val_sequences)},
            "embedded": {"val": ("ingest.embedded.val_fraction", cfg.embedded.val_fraction)}}[cfg.source]
    counts = Counter(r.split for r in rows)
    if not counts["train"]:
        raise IngestError(f"ingest.source {cfg.source}: all {len(rows)} images went to val/test, none to train; "
                          "lower the val/test fractions or add images")
    for split, (key, value) in keys.items():
        if value and not counts[split]:
            raise IngestError(f"{key}: {value} of {len(rows)} images gave an empty {split} split; "
                              f"raise {key} or add images")


# --- manifest ------------------------------------------------------------------------------

def write_manifest(rows: list[ManifestRow], path: Path) -> None:
    """Rows sorted by split (train, val, test) then name, one JSON object a line."""
    ordered = sorted(rows, key=lambda r: (SPLITS.index(r.split), r.name))
    write_jsonl([r.to_json() for r in ordered], path)


def read_manifest(path: Path) -> list[ManifestRow]:
    """Parse and check a manifest: known splits, unique names, all fields present."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError as err:
        raise IngestError(f"{path}: manifest not found; run the ingest stage first") from err
    rows, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = ManifestRow(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as err:
            raise IngestError(f"{path}:{number}: not a manifest row ({err})") from err
        if row.split not in SPLITS:
            raise IngestError(f"{path}:{number}: unknown split {row.split!r}")
        if row.name in seen:
            raise IngestError(f"{path}:{number}: duplicate name {row.name!r}")
        seen.add(row.name)
        rows.append(row)
    if not rows:
        raise IngestError(f"{path}: manifest is empty")
    return rows


def write_jsonl(lines: list[str], path: Path) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


# --- gopro ---------------------------------------------------------------------------------

def ingest_gopro(cfg: GoproConfig, seed: int, skip_bad_files: bool) -> tuple[list[ManifestRow], list[SkippedFile]]:
    """Reference GOPRO_Large pairs in place; whole train sequences become val."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise IngestError(f"{root}: GoPro root not found (ingest.gopro.root)")
    sequences = {split: _gopro_sequences(root / split) for split in ("train", "test")}
    if cfg.val_sequences >= len(sequences["train"]):
        raise IngestError(f"ingest.gopro.val_sequences={cfg.val_sequences} leaves no train sequence "
                          f"({len(sequences['train'])} under {root / 'train'})")
    val = set(rank_by_hash(sequences["train"], seed, "gopro-val")[:cfg.val_sequences])
    jobs = []
    for folder_split, names in sequences.items():
        for sequence in names:
            split = "val" if sequence in val else folder_split
            for sharp, blur in _gopro_pairs(root / folder_split / sequence, cfg.blur_dir):
                jobs.append((split, sequence, sharp, blur))
    rows, skipped = [], []
    with ThreadPoolExecutor(max_workers=4) as pool:
        try:
            results = pool.map(_gopro_row, jobs)
            for job, result in zip(jobs, progress(results, total=len(jobs), desc="ingest gopro", unit="pair")):
                if isinstance(result, ManifestRow):
                    rows.append(result)
                elif skip_bad_files:
                    skipped.append(SkippedFile(job[2].as_posix(), str(result)))
                    log.warning("skipped %s", result)
                else:
                    raise IngestError(f"{result} (ingest.skip_bad_files: true skips unreadable files)")
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return rows, skipped


def _gopro_sequences(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise IngestError(f"{split_dir}: missing; a GoPro root holds train/ and test/ sequence folders")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise IngestError(f"{split_dir}: no sequence folders")
    return names


def _gopro_pairs(sequence_dir: Path, blur_dir: str) -> list[tuple[Path, Path]]:
    """(sharp, blurred) paths matched by file name; a missing partner is an error."""
    folders = {kind: sequence_dir / kind for kind in ("sharp", blur_dir)}
    files = {}
    for kind, folder in folders.items():
        if not folder.is_dir():
            raise IngestError(f"{folder}: missing (every GoPro sequence has sharp/ and {blur_dir}/)")
        files[kind] = {p.name for p in folder.iterdir() if _is_image(p)}
    for kind, other in (("sharp", blur_dir), (blur_dir, "sharp")):
        orphans = sorted(files[kind] - files[other])
        if orphans:
            raise IngestError(f"{folders[kind] / orphans[0]}: no partner {folders[other] / orphans[0]} "
                              f"({len(orphans)} unpaired file(s) in {folders[kind]})")
    if not files["sharp"]:
        raise IngestError(f"{folders['sharp']}: no images")
    return [(folders["sharp"] / n, folders[blur_dir] / n) for n in sorted(files["sharp"])]


def _gopro_row(job: tuple[str, str, Path, Path]) -> ManifestRow | ImageError:
    """The manifest row of one pair, or the ImageError of an unreadable file (raised for a size mismatch)."""
    split, sequence, sharp, blur = job
    try:
        sharp_size, blur_size = _header_size(sharp), _header_size(blur)
    except ImageError as err:
        return err
    if sharp_size != blur_size:
        raise IngestError(f"{blur}: size {blur_size[0]}x{blur_size[1]} differs from its sharp partner "
                          f"{sharp} ({sharp_size[0]}x{sharp_size[1]})")
    return ManifestRow(name=f"{sequence}__{sharp.stem}", split=split, source="gopro", path=sharp.as_posix(),
                       blur_path=blur.as_posix(), width=sharp_size[0], height=sharp_size[1],
                       sha256=sha256_file(sharp))


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header only."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError(f"{path}: unreadable image header ({err})") from err


# --- folder --------------------------------------------------------------------------------

def ingest_folder(cfg: FolderConfig, seed: int, skip_bad_files: bool, staging: Path,
                  out_dir: Path) -> tuple[list[ManifestRow], list[SkippedFile]]:
    """Decode every photo under ``cfg.root`` to 8-bit RGB PNG, downscaled to ``cfg.max_side``."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise IngestError(f"{root}: photo folder not found (ingest.folder.root)")
    files = sorted((p for p in root.rglob("*") if _is_image(p) and not _hidden(p.relative_to(root))),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise IngestError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    names = unique_names([p.relative_to(root) for p in files])
    rows, skipped = [], []
    for path, name in zip(progress(files, desc="ingest folder", unit="image"), names):
        try:
            rgb = decode_image(path).rgb
        except ImageError as err:
            if not skip_bad_files:
                raise IngestError(f"{err} (ingest.skip_bad_files: true skips unreadable files)") from err
            skipped.append(SkippedFile(path.as_posix(), str(err)))
            log.warning("skipped %s", err)
            continue
        split = hash_split(f"folder:{path.relative_to(root).as_posix()}", seed, cfg.val_fraction, cfg.test_fraction)
        rows.append(_write_image(downscale(rgb, cfg.max_side), name, split, "folder", staging, out_dir))
    if not rows:
        raise IngestError(f"{root}: none of the {len(files)} images could be read")
    return rows, skipped


def hash_split(key: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Split of one item from a seeded hash of its key: stable when other items come and go."""
    u = seeded_unit(key, seed)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def unique_names(relative_paths: list[Path]) -> list[str]:
    """File-name-safe ids: path without suffix, '/' -> '__'; clashing ones get a path hash."""
    slugs = [re.sub(r"[^A-Za-z0-9._-]", "_", "__".join(p.with_suffix("").parts)) for p in relative_paths]
    clashes = {s for s, n in Counter(slugs).items() if n > 1}
    return [f"{s}-{hashlib.sha256(p.as_posix().encode()).hexdigest()[:8]}" if s in clashes else s
            for s, p in zip(slugs, relative_paths)]


def downscale(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink (area interpolation) so the longer side is at most ``max_side``; never enlarge."""
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


# --- embedded ------------------------------------------------------------------------------

def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        image = getattr(skimage_data, name)()
        return _grey_to_rgb(image) if image.ndim == 2 else image[..., :3]
    return load


def _motorcycle() -> np.ndarray:
    return skimage_data.stereo_motorcycle()[0]


EMBEDDED_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    **{name: _skimage(name) for name in (
        "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
        "camera", "moon", "coins", "brick", "grass", "gravel", "page", "cell", "text", "retina")},
    "motorcycle": _motorcycle,
}


def ingest_embedded(cfg: EmbeddedConfig, seed: int, staging: Path, out_dir: Path) -> list[ManifestRow]:
    """Photos bundled with scikit-image plus procedural dead-leaves images."""
    unknown = sorted(set(cfg.photos) - set(EMBEDDED_PHOTOS))
    if unknown:
        raise IngestError(f"ingest.embedded.photos: unknown photo(s) {unknown}; available: {sorted(EMBEDDED_PHOTOS)}")
    photos = {name: downscale(EMBEDDED_PHOTOS[name](), cfg.photo_max_side) for name in cfg.photos}
    others = [n for n in cfg.photos if n not in cfg.test_photos]
    val = set(rank_by_hash(others, seed, "embedded-val")[:fraction_count(len(others), cfg.val_fraction)])
    rows = [_write_image(rgb, name, "test" if name in cfg.test_photos else "val" if name in val else "train",
                         "skimage", staging, out_dir) for name, rgb in photos.items()]
    rows += _dead_leaves_rows(cfg, seed, [photos[n] for n in others], staging, out_dir)
    return rows


def _dead_leaves_rows(cfg: EmbeddedConfig, seed: int, palette_photos: list[np.ndarray], staging: Path,
                      out_dir: Path) -> list[ManifestRow]:
    leaves = cfg.dead_leaves
    names = [f"dead_leaves_{i:04d}" for i in range(leaves.count)]
    ranked = rank_by_hash(names, seed, "dead-leaves-split")
    n_test = fraction_count(len(names), leaves.test_fraction)
    n_val = fraction_count(len(names) - n_test, cfg.val_fraction)
    split_of = {n: "test" for n in ranked[:n_test]} | {n: "val" for n in ranked[n_test:n_test + n_val]}
    palette = palette_from_photos(palette_photos, derive_rng(seed, "dead-leaves-palette"))
    rows = []
    for name in progress(names, desc="dead leaves", unit="image"):
        image = dead_leaves(derive_rng(seed, name), leaves, palette)
        rows.append(_write_image(image, name, split_of.get(name, "train"), "dead_leaves", staging, out_dir))
    return rows


def fraction_count(n: int, fraction: float) -> int:
    """round(n * fraction), but at least 1 when fraction > 0 and at least one item is left over."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


# --- shared helpers ------------------------------------------------------------------------

def _write_image(rgb: np.ndarray, name: str, split: str, source: str, staging: Path, out_dir: Path) -> ManifestRow:
    relative = Path("images") / split / f"{name}.png"
    write_png(staging / relative, rgb)
    return ManifestRow(name=name, split=split, source=source, path=(out_dir / relative).as_posix(), blur_path=None,
                       width=int(rgb.shape[1]), height=int(rgb.shape[0]), sha256=sha256_file(staging / relative))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def seeded_unit(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, key)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def rank_by_hash(names: list[str], seed: int, salt: str) -> list[str]:
    """``names`` in a seeded pseudo-random order that does not depend on their input order."""
    return sorted(names, key=lambda n: seeded_unit(f"{salt}:{n}", seed))


def derive_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator fixed by the seed and keys (e.g. an image name): independent of processing order."""
    digest = hashlib.sha256(":".join(str(k) for k in keys).encode()).digest()
    return np.random.default_rng([seed, *np.frombuffer(digest[:16], dtype=np.uint32).tolist()])


# --- preview -------------------------------------------------------------------------------

def preview_sheet(rows: list[ManifestRow], per_split: int = 4, height: int = 128) -> np.ndarray:
    """Contact sheet with one line per split: up to ``per_split`` images, spread over the split
    (GoPro rows show the blurred image next to the sharp one)."""
    lines, labels = [], []
    for split in SPLITS:
        members = [r for r in rows if r.split == split]
        if not members:
            continue
        picks = [members[round(i)] for i in np.linspace(0, len(members) - 1, min(per_split, len(members)))]
        images, names = [], []
        for row in picks:
            if row.blur_path:
                images.append(read_rgb(row.blur_path))
                names.append(f"{split} blurred")
            images.append(read_rgb(row.path))
            names.append(f"{split} {row.name}")
        lines.append(images)
        labels.append(names)
    return contact_sheet(lines, labels, height=height)
