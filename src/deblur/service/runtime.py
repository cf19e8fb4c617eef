"""Where the worker's model comes from, loading it once, and running one image through it.

Importing this module does not import torch: the model (and torch with it) is loaded by
``ModelHolder`` in a background thread at startup or by the first request.

A served model (``deblur.serving.ServingModel``) offers: ``name``, ``version``, ``alias``,
``meta``, ``tiling``, ``architecture``, ``samples``, ``load_seconds``, ``source``,
``sampling_for(seed, steps)`` and ``deblur(rgb, tile_size, overlap, sampling, on_batch)``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from deblur.artifact import DEFAULT_MODEL_DIR, ServingError, read_artifact_meta
from deblur.config import ServingConfig, TilingConfig, load_params
from deblur.imageio import ImageError, decode_image, encode_image
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
            from deblur.onnx_runtime import load_onnx_serving_model

            try:
                return load_onnx_serving_model(self.source.model_dir, self.threads)
            except ServingError as err:
                onnx_error = err
                log.warning("serving.runtime onnx: %s; falling back to the torch runtime (model.pt)", err)
        try:
            from deblur.serving import load_from_model_uri, load_serving_model
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


def process_image(holder: ModelHolder, serving: ServingConfig, data: bytes, fmt: str, tile_size: int,
                  overlap: int, queued_at: float, sampling: dict[str, int] | None = None,
                  control=None) -> DeblurResult:
    """Decode, deblur and encode one image (on an inference thread). ``control``
    (deblur.service.admission.RequestControl) may stop it before decoding and after any tile batch."""
    timings = {"queue": _lap(queued_at)}
    mark = time.perf_counter()
    model = holder.get()
    timings["load"] = _lap(mark)
    if control is not None:
        control.start()
    if sampling and not model.samples:
        raise ApiError(400, "invalid_parameter", f"{' and '.join(f'{k}=' for k in sampling)} apply to diffusion "
                       f"refiner models only; this model is a {model.architecture}")
    sampling = model.sampling_for(**(sampling or {})) if model.samples else None
    if sampling:
        log.info("diffusion refiner: seed=%d steps=%d", sampling["seed"], sampling["steps"])
    mark = time.perf_counter()
    try:
        decoded = decode_image(data, name="the uploaded image", max_pixels=serving.max_pixels)
    except ImageError as err:
        raise ApiError(400, "invalid_image", f"{err}; send a complete JPEG, PNG, WebP, TIFF, BMP or GIF file") from err
    timings["decode"] = _lap(mark)
    mark = time.perf_counter()
    restored = model.deblur(decoded.rgb, tile_size, overlap, sampling,
                            on_batch=control.on_batch if control is not None else None)
    timings["infer"] = _lap(mark)
    mark = time.perf_counter()
    body = encode_image(restored, fmt, alpha=decoded.alpha, quality=serving.output_quality)
    timings["encode"] = _lap(mark)
    alpha = "none" if decoded.alpha is None else ("kept" if fmt in ("PNG", "WEBP") else "dropped")
    height, width = restored.shape[:2]
    return DeblurResult(body=body, fmt=fmt, width=width, height=height, alpha=alpha, timings_ms=timings,
                        sampling=sampling)


def _lap(mark: float) -> float:
    return (time.perf_counter() - mark) * 1000
