"""Where the worker's model comes from, loading it once, and running one image through it.

Importing this module does not import torch: the model (and torch with it) is loaded by
``ModelHolder`` in a background thread at startup or by the first request.

A served model (``deblur.artifact.torch_model.ServingModel``) offers: ``name``, ``version``, ``alias``,
``meta``, ``tiling``, ``architecture``, ``samples``, ``load_seconds``, ``source``,
``sampling_for(seed, steps)`` and ``deblur(rgb, tile_size, overlap, sampling, on_batch)``.

Modes (documentation/serving.md): ``fast`` runs the model; ``thorough`` runs
``deblur.psf.restore.restore_thorough`` with the model's ``deblur`` (the artifact's tiling or the
request's) as its network, either runtime; ``psf`` (a multipart ``psf`` part) deconvolves with the
caller's kernel. The kernel-aware code (scipy, OpenCV) is imported only when such a request runs.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from deblur.artifact.meta import DEFAULT_MODEL_DIR, ServingError, read_artifact_meta
from deblur.artifact.onnx_model import load_onnx_serving_model   # onnxruntime itself loads with the model
from deblur.core.config import KernelAwareConfig, ServingConfig, TilingConfig, load_params
from deblur.core.imageio import ACCEPTED_FORMATS_TEXT, ImageError, decode_image, encode_image
from deblur.psf.io import psf_to_png_bytes
from deblur.service.errors import ApiError

log = logging.getLogger("deblur.service")


@dataclass(frozen=True)
class ModelSource:
    """Where the worker loads its model from: a serving-artifact folder or a registry URI."""

    model_dir: Path | None
    model_uri: str | None

    def describe(self) -> str:
        return self.model_uri or str(self.model_dir)


def model_source_from_env() -> ModelSource:
    """``DEBLUR_MODEL_URI`` (with ``MLFLOW_TRACKING_URI``), else ``DEBLUR_MODEL_DIR``, else the default folder."""
    uri = os.environ.get("DEBLUR_MODEL_URI", "")
    if uri.startswith("models:/") and os.environ.get("MLFLOW_TRACKING_URI"):
        return ModelSource(model_dir=None, model_uri=uri)
    return ModelSource(model_dir=Path(os.environ.get("DEBLUR_MODEL_DIR") or DEFAULT_MODEL_DIR), model_uri=None)


def resolve_settings(source: ModelSource, settings: ServingConfig | None
                     ) -> tuple[ServingConfig, TilingConfig, str, dict | None]:
    """Serving limits, default tiling, where they come from, and the artifact's model.json (None for a
    registry URI or an unusable artifact): from model.json, else params.yaml. Read once per worker."""
    if source.model_dir is not None:
        try:
            meta = read_artifact_meta(source.model_dir)
            serving = settings or ServingConfig.model_validate(meta["serving"])
            return serving, TilingConfig.model_validate(meta["tiling"]), str(source.model_dir / "model.json"), meta
        except (ServingError, ValidationError) as err:
            log.warning("no usable settings in the serving artifact (%s); falling back to params.yaml", err)
    params_path = Path(os.environ.get("DEBLUR_PARAMS", "params.yaml"))
    params = load_params(params_path)
    return settings or params.serving, params.tiling, str(params_path), None


THOROUGH_NEEDS = ("scipy", "cv2")   # import names of what deblur.psf needs beyond the fast path
PIP_NAMES = {"scipy": "scipy", "cv2": "opencv-python-headless"}


@dataclass(frozen=True)
class Modes:
    """The worker's restoration modes: its default, the thorough mode's settings and why it is unavailable."""

    default: str                                 # fast | thorough
    kernel_aware: KernelAwareConfig | None       # None: thorough is unavailable
    source: str                                  # where the settings come from
    unavailable: str | None = None               # why thorough cannot run (None: it can)
    missing: str | None = None                   # packages kernel-aware restoration needs that are not installed

    @property
    def available(self) -> list[str]:
        return ["fast"] if self.unavailable else ["fast", "thorough"]

    def check(self, mode: str, asked: bool) -> None:
        """400 ``mode_unavailable`` when ``mode`` was asked (or a psf part sent) and cannot run; 503 when it
        is the worker's default."""
        if mode == "psf" and self.missing:
            raise ApiError(400, "mode_unavailable", f"a psf part (non-blind deconvolution): {self.missing}")
        if mode != "thorough" or self.unavailable is None:
            return
        if asked:
            raise ApiError(400, "mode_unavailable", f"mode=thorough: {self.unavailable}; or send mode=fast")
        raise ApiError(503, "model_unavailable", f"this worker's default mode is thorough ({self.source}), but "
                       f"{self.unavailable}; send mode=fast meanwhile")

    def report(self) -> dict:
        return {"default": self.default, "available": self.available, "unavailable": self.unavailable,
                "source": self.source,
                "kernel_aware": self.kernel_aware.model_dump(mode="json") if self.kernel_aware else None}


def resolve_modes(source: ModelSource, meta: dict | None) -> Modes:
    """The thorough mode's settings and the default mode: the artifact's ``kernel_aware`` section (absent in
    artifacts exported before kernel-aware restoration: fast only, a clear error for thorough); for a registry
    URI, params.yaml's (where the worker's other settings come from too)."""
    packages = [name for name in THOROUGH_NEEDS if importlib.util.find_spec(name) is None]
    missing = (f"kernel-aware restoration needs {' and '.join(PIP_NAMES[n] for n in packages)}, not installed on "
               f"this worker (pip install {' '.join(PIP_NAMES[n] for n in packages)})") if packages else None
    if meta is not None:
        where = f"{source.describe()}/model.json kernel_aware"
        raw = meta.get("kernel_aware")
        if raw is None:
            why = ("this model's serving artifact was exported without kernel-aware settings (no kernel_aware in "
                   "model.json): export it again (the register stage of dvc repro, or deblur.artifact.torch_model."
                   "export_serving_artifact(..., kernel_aware=...)) or register it again")
            return Modes("fast", None, where, why, missing)
        try:
            settings = KernelAwareConfig.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            return Modes("fast", None, where, f"the model's kernel_aware settings are invalid "
                         f"({'.'.join(map(str, first['loc']))}: {first['msg']}); export it again", missing)
    elif source.model_uri is not None:
        params_path = Path(os.environ.get("DEBLUR_PARAMS", "params.yaml"))
        where = f"{params_path} kernel_aware"
        try:
            settings = load_params(params_path).kernel_aware
        except Exception as err:   # noqa: BLE001  (an unreadable params file: no thorough mode, and why)
            return Modes("fast", None, where, f"no kernel-aware settings could be read from {params_path} ({err})",
                         missing)
    else:
        return Modes("fast", None, "none", "no usable serving artifact", missing)
    if missing:
        log.warning("thorough mode unavailable: %s", missing)
    return Modes(settings.default_mode, settings, where, missing, missing)


class ModelHolder:
    """Loads the model once, thread-safely; a failed load is reported and retried on the next request."""

    def __init__(self, source: ModelSource, tiling: TilingConfig, threads: int, runtime: str) -> None:
        self.source, self.tiling, self.threads = source, tiling, threads
        self.runtime = runtime   # torch | onnx (the worker's serving.runtime)
        self._lock = threading.Lock()
        self._model = None
        self.error: str | None = None

    @property
    def model(self):
        return self._model

    def get(self):
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is None:
                try:
                    self._model = self._load()
                    self.error = None
                    log.info("model loaded from %s in %.2f s", self.source.describe(), self._model.load_seconds)
                except (ServingError, OSError, ValueError, RuntimeError) as err:
                    self.error = str(err)
                    log.error("model load failed: %s", err)
                    raise ApiError(503, "model_unavailable", f"the model could not be loaded: {err}") from err
        return self._model

    def preload(self) -> None:
        """Load now (in a background thread at startup); errors are kept for /api/health."""
        try:
            self.get()
        except ApiError:
            pass

    def _load(self):
        """The artifact's runtime: ONNX Runtime (no torch import) or torch; onnx falls back to torch
        when the artifact has no model.onnx or onnxruntime is missing, and says so in the log."""
        onnx_error = None
        if self.source.model_uri is None and self.runtime == "onnx":
            try:
                return load_onnx_serving_model(self.source.model_dir, self.threads)
            except ServingError as err:
                onnx_error = err
                log.warning("serving.runtime onnx: %s; falling back to the torch runtime (model.pt)", err)
        try:   # lazy: torch, and mlflow for a --model-uri; off the cold start and absent from an onnx deployment
            from deblur.artifact.torch_model import load_serving_model
            from deblur.tracking import models_uri  # noqa: F401  (a diffusion predictor may be a models:/ URI)
            from deblur.tracking.registry_serving import load_from_model_uri
        except ImportError as err:
            raise ServingError(f"{onnx_error or 'serving.runtime is torch'}, and torch cannot be imported ({err}); "
                               "install torch or serve an artifact with a model.onnx (serving.runtime onnx)") from err
        if self.source.model_uri:
            return load_from_model_uri(self.source.model_uri, self.tiling, self.threads)
        return load_serving_model(self.source.model_dir, self.threads)


def model_info(model) -> dict | None:
    if model is None:
        return None
    keys = ("architecture", "run_id", "metrics", "weights_dtype", "exported_at")
    return {"name": model.name, "version": model.version, "alias": model.alias,
            "runtime": getattr(model, "runtime", "torch"),
            "load_seconds": round(model.load_seconds, 3), **{k: model.meta.get(k) for k in keys}}


@dataclass
class DeblurResult:
    body: bytes
    fmt: str
    width: int
    height: int
    alpha: str
    timings_ms: dict[str, float]
    sampling: dict[str, int] | None = None   # a diffusion refiner's seed and steps, as used
    mode: str = "fast"                       # fast | thorough | psf
    chosen: str | None = None                # thorough: the candidate kept (deblur.psf.restore.CANDIDATES); psf: "psf"
    psf_shape: tuple[int, int] | None = None
    media_type: str | None = None            # set when the body is not the image (return_psf: JSON)


def process_image(holder: ModelHolder, serving: ServingConfig, data: bytes, fmt: str, tile_size: int,
                  overlap: int, queued_at: float, sampling: dict[str, int] | None = None,
                  control=None, mode: str = "fast", kernel_aware: KernelAwareConfig | None = None,
                  psf=None, return_psf: bool = False) -> DeblurResult:
    """Decode, restore and encode one image (on an inference thread). ``control``
    (deblur.service.admission.RequestControl) may stop it before decoding and after any tile batch.
    ``mode``: fast (the model), thorough (kernel-aware, with ``kernel_aware`` settings) or psf (non-blind
    deconvolution with ``psf``); ``return_psf``: the body is JSON with the image and the kernel."""
    timings = {"queue": _lap(queued_at)}
    mark = time.perf_counter()
    model = holder.get()
    timings["load"] = _lap(mark)
    if control is not None:
        control.start()
    if sampling and mode != "psf" and not model.samples:
        raise ApiError(400, "invalid_parameter", f"{' and '.join(f'{k}=' for k in sampling)} apply to diffusion "
                       f"refiner models only; this model is a {model.architecture}")
    sampling = model.sampling_for(**(sampling or {})) if mode != "psf" and model.samples else None
    if sampling:
        log.info("diffusion refiner: seed=%d steps=%d", sampling["seed"], sampling["steps"])
    mark = time.perf_counter()
    try:
        decoded = decode_image(data, name="the uploaded image", max_pixels=serving.max_pixels)
    except ImageError as err:
        raise ApiError(400, "invalid_image", f"{err}; send a complete {ACCEPTED_FORMATS_TEXT} file") from err
    timings["decode"] = _lap(mark)
    mark = time.perf_counter()
    on_batch = control.on_batch if control is not None else None
    kernel, chosen, evidence, stages = None, None, {}, {}
    if mode == "thorough":
        from deblur.psf.restore import restore_thorough   # lazy: scipy and OpenCV, off the cold start

        def network(rgb):
            return model.deblur(rgb, tile_size, overlap, sampling, on_batch=on_batch)

        outcome, _ = restore_thorough(decoded.rgb, network, kernel_aware)
        restored, chosen, kernel, evidence, stages = (outcome.image, outcome.chosen, outcome.psf, outcome.evidence,
                                                     outcome.seconds)
        log.info("thorough: %s (%s)", chosen, evidence.get("reason", ""))
    elif mode == "psf":
        from deblur.psf.deconvolve import deconvolve   # lazy: scipy, off the cold start

        restored, chosen, kernel = deconvolve(decoded.rgb, psf, workers=serving.threads), "psf", psf
    else:
        restored = model.deblur(decoded.rgb, tile_size, overlap, sampling, on_batch=on_batch)
    timings["infer"] = _lap(mark)
    if "estimate" in stages:
        timings["estimate"] = stages["estimate"] * 1000
    mark = time.perf_counter()
    body = encode_image(restored, fmt, alpha=decoded.alpha, quality=serving.output_quality)
    media_type = None
    if return_psf:
        body = restoration_json(body, fmt, restored, mode, chosen, kernel, evidence, stages)
        media_type = "application/json"
    timings["encode"] = _lap(mark)
    alpha = "none" if decoded.alpha is None else ("kept" if fmt in ("PNG", "WEBP") else "dropped")
    height, width = restored.shape[:2]
    return DeblurResult(body=body, fmt=fmt, width=width, height=height, alpha=alpha, timings_ms=timings,
                        sampling=sampling, mode=mode, chosen=chosen,
                        psf_shape=None if kernel is None else tuple(int(v) for v in kernel.shape[:2]),
                        media_type=media_type)


IMAGE_MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def restoration_json(image: bytes, fmt: str, restored, mode: str, chosen: str | None, kernel,
                     evidence: dict, stages: dict) -> bytes:
    """The ``?return_psf=1`` answer: the encoded image and the blur kernel (a 16-bit PNG scaled to its peak and
    the normalised float32 ``.npy``), base64, with the choice and its evidence (documentation/serving.md)."""
    psf_png = psf_npy = None
    if kernel is not None:
        npy = io.BytesIO()
        np.save(npy, (kernel / kernel.sum()).astype(np.float32))
        psf_png = base64.b64encode(psf_to_png_bytes(kernel)).decode("ascii")
        psf_npy = base64.b64encode(npy.getvalue()).decode("ascii")
    height, width = restored.shape[:2]
    answer = {
        "mode": mode,
        "chosen": chosen,
        "media_type": IMAGE_MEDIA_TYPES[fmt],
        "width": int(width),
        "height": int(height),
        "image": base64.b64encode(image).decode("ascii"),
        "psf": psf_png,
        "psf_npy": psf_npy,
        "psf_size": None if kernel is None else [int(kernel.shape[0]), int(kernel.shape[1])],
        "evidence": evidence,
        "seconds": {name: round(float(value), 4) for name, value in stages.items()},
    }
    return json.dumps(answer).encode()


def _lap(mark: float) -> float:
    return (time.perf_counter() - mark) * 1000
