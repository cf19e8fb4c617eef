"""``deblur predict``: deblur image files with a serving artifact or a registered model, or
deconvolve them with a known blur kernel (``--psf``: no model is loaded).

    deblur predict photo.jpg shots/ 'raw/*.png' -o sharp/ [--model function_app/model | models:/deblur@champion]
    deblur predict photo.jpg -o sharp/ --psf kernel.png

Inputs are files, folders (their images, recursively) and glob patterns. Each output goes to
``OUT/<name>.<format>``; images found in a folder keep their path below it. Images that
cannot be read are skipped and listed at the end; the exit code is 1 when any failed, 0
when all were written. Inference is the HTTP service's: seam-free tiled, on the CPU. With
``--psf``, every image is deconvolved with that PSF by ``deblur.psf.deconvolve`` (whole image).
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from deblur.errors import DeblurError
from deblur.imageio import IMAGE_SUFFIXES, ImageError

FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}
SAME_AS_INPUT = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}   # other input formats are written as PNG


class PredictError(DeblurError, ValueError):
    """The command cannot start: no inputs, or an output path that is not a folder."""


@dataclass(frozen=True)
class Job:
    source: Path
    relative: Path   # output path below OUT, without suffix


@dataclass
class Report:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def collect_inputs(inputs: list[str]) -> list[Job]:
    """Files, folders (recursively, image suffixes only) and globs -> jobs with distinct output names."""
    jobs: list[Job] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            jobs += [Job(p, p.relative_to(path).with_suffix("")) for p in found]
        elif path.exists():
            jobs.append(Job(path, Path(path.stem)))
        elif glob.has_magic(item):
            jobs += [Job(Path(p), Path(Path(p).stem)) for p in sorted(glob.glob(item, recursive=True))
                     if Path(p).is_file()]
        else:
            jobs.append(Job(path, Path(path.stem)))   # reported as "file not found" with the others
    if not jobs:
        raise PredictError(f"no images found in {', '.join(inputs)} (suffixes: {', '.join(IMAGE_SUFFIXES)})")
    seen: dict[Path, int] = {}
    unique = []
    for job in jobs:   # photo.jpg and other/photo.png would both be OUT/photo: number the later ones
        n = seen.get(job.relative, 0)
        seen[job.relative] = n + 1
        unique.append(job if n == 0 else Job(job.source, job.relative.with_name(f"{job.relative.name}-{n + 1}")))
    return unique


def load_model(model: str, params_path: Path, threads: int | None):
    """A ServingModel from a serving artifact folder or a ``models:/`` registry URI."""
    from deblur.serving import load_from_model_uri, load_serving_model

    if model.startswith("models:/"):
        from deblur.config import load_params

        if params_path.is_file():   # the tiling for a model logged without one
            params = load_params(params_path)
            return load_from_model_uri(model, params.tiling, threads or params.serving.threads)
        return load_from_model_uri(model, None, threads or 2)
    return load_serving_model(model, threads)


def predict(jobs: list[Job], serving_model, out_dir: Path, fmt: str, tile_size: int | None, overlap: int | None,
            quality: int) -> Report:
    """Deblur every job into ``out_dir``; unreadable inputs are recorded, not raised."""
    tiling = serving_model.tiling_for(tile_size, overlap)   # validated once, before the first image
    return restore_all(jobs, lambda rgb: serving_model.deblur(rgb, tiling.tile_size, tiling.overlap), out_dir, fmt,
                       quality)


def restore_all(jobs: list[Job], restore: Callable[[np.ndarray], np.ndarray], out_dir: Path, fmt: str,
                quality: int) -> Report:
    """Write ``restore(rgb)`` of every job into ``out_dir``; unreadable inputs are recorded, not raised."""
    from deblur.imageio import decode_image, encode_image
    from deblur.progress import progress

    report = Report()
    bar = progress(jobs, desc="deblur", unit="image")
    for job in bar:
        try:
            image = decode_image(job.source)
        except ImageError as err:
            report.failed.append((job.source, str(err)))
            continue
        name = fmt if fmt != "same" else SAME_AS_INPUT.get(image.format or "", "png")
        pil_format, suffix = FORMATS[name]
        restored = restore(image.rgb)
        alpha = image.alpha if pil_format != "JPEG" else None
        target = out_dir / job.relative.with_suffix(suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_image(restored, pil_format, alpha=alpha, quality=quality))
        report.written.append(target)
    bar.close()
    return report


def run(inputs: list[str], out_dir: Path, model: str, params_path: Path, fmt: str, tile_size: int | None,
        overlap: int | None, quality: int, threads: int | None) -> int:
    jobs = _prepare(inputs, out_dir)
    serving_model = load_model(model, params_path, threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = predict(jobs, serving_model, out_dir, fmt, tile_size, overlap, quality)
    return _summarise(report, len(jobs), out_dir, f"model {serving_model.name} v{serving_model.version}, "
                                                  f"{serving_model.source}")


def run_with_psf(inputs: list[str], out_dir: Path, psf_path: Path, fmt: str, quality: int,
                 threads: int | None) -> int:
    """``deblur predict --psf``: non-blind deconvolution of every input with one known PSF."""
    from deblur.psf.deconvolve import deconvolve
    from deblur.psf.io import load_psf

    psf = load_psf(psf_path)   # a bad PSF stops the command before any output
    jobs = _prepare(inputs, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = restore_all(jobs, lambda rgb: deconvolve(rgb, psf, workers=threads), out_dir, fmt, quality)
    return _summarise(report, len(jobs), out_dir, f"non-blind deconvolution with {psf_path}, {psf.shape[1]}x"
                                                  f"{psf.shape[0]} px")


def _prepare(inputs: list[str], out_dir: Path) -> list[Job]:
    if out_dir.exists() and not out_dir.is_dir():
        raise PredictError(f"-o {out_dir}: exists and is not a folder")
    return collect_inputs(inputs)


def _summarise(report: Report, total: int, out_dir: Path, how: str) -> int:
    print(f"deblur: {len(report.written)} of {total} images written to {out_dir} ({how})")
    for source, why in report.failed:
        print(f"skipped {source}: {why}", file=sys.stderr)
    return 1 if report.failed else 0
