"""``deblur predict``: deblur image files with a serving artifact or a registered model, or
deconvolve them with a known blur kernel (``--psf``: no model is loaded).

    deblur predict photo.jpg shots/ 'raw/*.png' -o sharp/ [--model function_app/model | models:/deblur@champion]
    deblur predict photo.jpg -o sharp/ --mode thorough --save-psf   # kernel-aware; the estimated kernels too
    deblur predict photo.jpg -o sharp/ --psf kernel.png

Inputs are files, folders (their images, recursively) and glob patterns. Each output goes to
``OUT/<name>.<format>``; images found in a folder keep their path below it. Images that
cannot be read are skipped and listed at the end; the exit code is 1 when any failed, 0
when all were written. Inference is the HTTP service's: seam-free tiled, on the CPU. ``--mode``
(default: the model's ``kernel_aware.default_mode``, fast without one) picks the network alone or
thorough kernel-aware restoration (``deblur.psf.restore``), which prints the candidate kept for
each image and, with ``--save-psf``, writes the estimated kernel beside each output
(``<name>.psf.png``, 16-bit, and ``<name>.psf.npy``, float32). With ``--psf``, every image is
deconvolved with that PSF by ``deblur.psf.deconvolve`` (whole image).
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import ValidationError

from deblur.core.config import KernelAwareConfig, load_params
from deblur.core.errors import DeblurError
from deblur.core.imageio import IMAGE_SUFFIXES, ImageError, decode_image, encode_image
from deblur.core.progress import progress
from deblur.psf.deconvolve import deconvolve
from deblur.psf.io import load_psf, write_psf
from deblur.psf.restore import restore_thorough

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
    # torch and mlflow load here, with a model: ``--psf`` runs without them
    from deblur.artifact.torch_model import load_serving_model
    from deblur.tracking.registry_serving import load_from_model_uri

    if model.startswith("models:/"):
        if params_path.is_file():   # the tiling for a model logged without one
            params = load_params(params_path)
            return load_from_model_uri(model, params.tiling, threads or params.serving.threads)
        return load_from_model_uri(model, None, threads or 2)
    return load_serving_model(model, threads)


def kernel_aware_of(serving_model, params_path: Path):
    """The thorough mode's settings for ``serving_model``: its artifact's ``kernel_aware`` (None for an artifact
    exported before kernel-aware restoration), or for a ``models:/`` URI ``--params``' (as its tiling)."""
    raw = serving_model.meta.get("kernel_aware")
    if raw is not None:
        try:
            return KernelAwareConfig.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            raise PredictError(f"{serving_model.source}: invalid kernel_aware settings in model.json "
                               f"({'.'.join(map(str, first['loc']))}: {first['msg']}); export the model again") from err
    if str(serving_model.source).startswith("models:/") and params_path.is_file():
        return load_params(params_path).kernel_aware
    return None


def choose_mode(asked: str | None, kernel_aware, model_source: str, save_psf: bool) -> str:
    """``--mode`` (default: the model's ``kernel_aware.default_mode``, else fast), checked before any image."""
    mode = asked or (kernel_aware.default_mode if kernel_aware is not None else "fast")
    if mode == "thorough" and kernel_aware is None:
        raise PredictError(f"--mode thorough: the model {model_source} was exported without kernel-aware settings "
                           "(no kernel_aware in its model.json): export or register it again (dvc repro), or use "
                           "--mode fast")
    if save_psf and mode != "thorough":
        raise PredictError("--save-psf writes the kernel that --mode thorough estimates; this run is in mode fast "
                           "(add --mode thorough)")
    return mode


def predict(jobs: list[Job], serving_model, out_dir: Path, fmt: str, tile_size: int | None, overlap: int | None,
            quality: int, mode: str = "fast", kernel_aware=None, save_psf: bool = False) -> Report:
    """Deblur every job into ``out_dir``; unreadable inputs are recorded, not raised. In ``mode`` thorough the
    model's tiled inference is the network of ``deblur.psf.restore.restore_thorough``."""
    tiling = serving_model.tiling_for(tile_size, overlap)   # validated once, before the first image

    def network(rgb: np.ndarray) -> np.ndarray:
        return serving_model.deblur(rgb, tiling.tile_size, tiling.overlap)

    if mode == "fast":
        return restore_all(jobs, network, out_dir, fmt, quality)
    return restore_all(jobs, lambda rgb: restore_thorough(rgb, network, kernel_aware)[0], out_dir, fmt, quality,
                       save_psf=save_psf)


def restore_all(jobs: list[Job], restore: Callable[[np.ndarray], np.ndarray], out_dir: Path, fmt: str,
                quality: int, save_psf: bool = False) -> Report:
    """Write ``restore(rgb)`` of every job into ``out_dir``; unreadable inputs are recorded, not raised.
    ``restore`` may return a thorough-mode result (``deblur.psf.restore.ThoroughResult``): its choice is
    printed, and with ``save_psf`` its kernel written beside the output."""
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
        outcome = restore(image.rgb)
        restored = outcome if isinstance(outcome, np.ndarray) else outcome.image
        alpha = image.alpha if pil_format != "JPEG" else None
        target = out_dir / job.relative.with_suffix(suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_image(restored, pil_format, alpha=alpha, quality=quality))
        report.written.append(target)
        if not isinstance(outcome, np.ndarray):
            bar.write(_thorough_line(job, target, outcome, save_psf), file=sys.stdout)
    bar.close()
    return report


def _thorough_line(job: Job, target: Path, outcome, save_psf: bool) -> str:
    """One line per image in thorough mode: the candidate kept, the kernel and why; writes the kernel files."""
    line = f"{job.source}: {outcome.chosen}"
    if outcome.psf is not None:
        height, width = outcome.psf.shape[:2]
        line += f", PSF {width}x{height}"
        if save_psf:
            stem = target.with_suffix("")
            for suffix in (".psf.png", ".psf.npy"):
                write_psf(stem.with_name(stem.name + suffix), outcome.psf)
            line += f" -> {stem.name}.psf.png, {stem.name}.psf.npy"
    reason = outcome.evidence.get("reason")
    shrink = outcome.evidence.get("shrink")
    if shrink is not None:   # kernel_aware.input_shrink
        kept = f"kept {shrink['weight']:.0%} of its change to the photo (blur {shrink['blur_rms']:.1f} levels)"
        reason = f"{reason}; {kept}" if reason else kept
    return f"{line} ({reason})" if reason else line


def run(inputs: list[str], out_dir: Path, model: str, params_path: Path, fmt: str, tile_size: int | None,
        overlap: int | None, quality: int, threads: int | None, mode: str | None = None, save_psf: bool = False) -> int:
    jobs = _prepare(inputs, out_dir)
    serving_model = load_model(model, params_path, threads)
    kernel_aware = kernel_aware_of(serving_model, params_path)
    mode = choose_mode(mode, kernel_aware, str(serving_model.source), save_psf)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = predict(jobs, serving_model, out_dir, fmt, tile_size, overlap, quality, mode, kernel_aware, save_psf)
    return _summarise(report, len(jobs), out_dir, f"model {serving_model.name} v{serving_model.version}, "
                                                  f"{serving_model.source}, mode {mode}")


def run_with_psf(inputs: list[str], out_dir: Path, psf_path: Path, fmt: str, quality: int,
                 threads: int | None) -> int:
    """``deblur predict --psf``: non-blind deconvolution of every input with one known PSF."""
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
