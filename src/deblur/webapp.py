"""The HTTP service: a FastAPI app that deblurs uploaded images (also run by Azure Functions).

Routes: ``POST /api/deblur`` (image in, deblurred image out), ``GET /api/health`` and
``GET /`` (a small web page, also at ``/api/ui`` for hosts that serve only ``/api/*``).
The contract and limits are in documentation/serving.md.

Where the model comes from (``model_dir=None``): ``DEBLUR_MODEL_URI`` (a ``models:/`` URI,
used when ``MLFLOW_TRACKING_URI`` is set), else ``DEBLUR_MODEL_DIR``, else
``function_app/model``. Limits come from the serving artifact's copy of params.yaml's
``serving`` section (from params.yaml itself, ``DEBLUR_PARAMS`` or ./params.yaml, for a
registry URI), unless ``settings`` is given.

The model is loaded once per worker, in a background thread at startup or by the first
request, whichever comes first. Inference runs on ``inference_slots`` dedicated threads
(always the same ones, so glibc reuses their memory arenas instead of growing one per
request thread); up to ``max_waiting`` more requests queue and later ones get 503.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hmac
import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from deblur.config import ServingConfig, TilingConfig, load_params
from deblur.imageio import ImageError, decode_image, encode_image
from deblur.serving import (
    DEFAULT_MODEL_DIR,
    ServingError,
    ServingModel,
    load_from_model_uri,
    load_serving_model,
    read_artifact_meta,
)

log = logging.getLogger("deblur.webapp")

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")  # JPEG includes MPO (multi-picture JPEGs from cameras)
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
UPLOAD_FIELD = "image"

Image.init()  # register every Pillow plugin, so Image.open(formats=ACCEPTED_FORMATS) knows them all


class ApiError(Exception):
    """An error answered as JSON ``{"error": code, "detail": message}`` with ``status``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


@dataclass(frozen=True)
class ModelSource:
    """Where the worker loads its model from: a serving-artifact folder or a registry URI."""

    model_dir: Path | None
    model_uri: str | None

    def describe(self) -> str:
        return self.model_uri or str(self.model_dir)


class ModelHolder:
    """Loads the model once, thread-safely; a failed load is reported and retried on the next request."""

    def __init__(self, source: ModelSource, tiling: TilingConfig, threads: int) -> None:
        self.source, self.tiling, self.threads = source, tiling, threads
        self._lock = threading.Lock()
        self._model: ServingModel | None = None
        self.error: str | None = None

    @property
    def model(self) -> ServingModel | None:
        return self._model

    def get(self) -> ServingModel:
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

    def _load(self) -> ServingModel:
        if self.source.model_uri:
            return load_from_model_uri(self.source.model_uri, self.tiling, self.threads)
        return load_serving_model(self.source.model_dir, self.threads)


class InferenceGate:
    """Admits at most ``slots + max_waiting`` requests; runs them on ``slots`` dedicated threads."""

    def __init__(self, slots: int, max_waiting: int) -> None:
        self.capacity = slots + max_waiting
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="deblur-inference")
        self._lock = threading.Lock()
        self.admitted = 0

    def admit(self) -> bool:
        with self._lock:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.admitted -= 1

    async def run(self, fn: Callable, *args):
        """``fn(*args)`` on an inference thread, once one is free."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class SpeedEstimate:
    """Seconds per megapixel of this worker's inferences (exponential average; None before the first)."""

    def __init__(self, smoothing: float = 0.3) -> None:
        self.smoothing = smoothing
        self.seconds_per_mp: float | None = None
        self._lock = threading.Lock()

    def update(self, pixels: int, seconds: float) -> None:
        rate = seconds / max(pixels / 1e6, 1e-6)
        with self._lock:
            old = self.seconds_per_mp
            self.seconds_per_mp = rate if old is None else (1 - self.smoothing) * old + self.smoothing * rate

    def seconds_for(self, pixels: int) -> float | None:
        rate = self.seconds_per_mp
        return None if rate is None else rate * pixels / 1e6


@dataclass
class DeblurResult:
    body: bytes
    fmt: str
    width: int
    height: int
    alpha: str
    timings_ms: dict[str, float]
    sampling: dict[str, int] | None = None   # a diffusion refiner's seed and steps, as used


def model_source_from_env() -> ModelSource:
    """``DEBLUR_MODEL_URI`` (with ``MLFLOW_TRACKING_URI``), else ``DEBLUR_MODEL_DIR``, else the default folder."""
    uri = os.environ.get("DEBLUR_MODEL_URI", "")
    if uri.startswith("models:/") and os.environ.get("MLFLOW_TRACKING_URI"):
        return ModelSource(model_dir=None, model_uri=uri)
    return ModelSource(model_dir=Path(os.environ.get("DEBLUR_MODEL_DIR") or DEFAULT_MODEL_DIR), model_uri=None)


def resolve_settings(source: ModelSource, settings: ServingConfig | None) -> tuple[ServingConfig, TilingConfig, str]:
    """Serving limits and default tiling: from the artifact's model.json, else params.yaml."""
    if source.model_dir is not None:
        try:
            meta = read_artifact_meta(source.model_dir)
            serving = settings or ServingConfig.model_validate(meta["serving"])
            return serving, TilingConfig.model_validate(meta["tiling"]), str(source.model_dir / "model.json")
        except (ServingError, ValidationError) as err:
            log.warning("no usable settings in the serving artifact (%s); falling back to params.yaml", err)
    params_path = Path(os.environ.get("DEBLUR_PARAMS", "params.yaml"))
    params = load_params(params_path)
    return settings or params.serving, params.tiling, str(params_path)


def create_app(model_dir: str | Path | None = None, settings: ServingConfig | None = None,
               preload: bool = True) -> FastAPI:
    """The FastAPI app; ``model_dir=None`` picks the model from the environment (see module doc)."""
    source = ModelSource(Path(model_dir), None) if model_dir is not None else model_source_from_env()
    serving, tiling, settings_source = resolve_settings(source, settings)
    holder = ModelHolder(source, tiling, serving.threads)
    gate = InferenceGate(serving.inference_slots, serving.max_waiting)
    speed = SpeedEstimate()
    api_key = os.environ.get("DEBLUR_API_KEY") or None

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if preload:
            threading.Thread(target=holder.preload, name="deblur-model-preload", daemon=True).start()
        yield
        gate.shutdown()

    app = FastAPI(title="deblur", summary="Single-image deblurring", lifespan=lifespan,
                  docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    app.state.holder = holder
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/api/ui", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(resources.files("deblur").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/api/health")
    def health() -> dict:
        model = holder.model
        return {
            "status": "ok",
            "ready": model is not None,
            "error": holder.error,
            "model": _model_info(model),
            "model_source": source.describe(),
            "settings_source": settings_source,
            "tiling": (model.tiling if model else tiling).model_dump(),
            "limits": {
                "max_body_mb": serving.max_body_mb,
                "max_pixels": serving.max_pixels,
                "min_side": serving.min_side,
                "max_side": serving.max_side,
                "tile_size_range": list(serving.tile_size_range),
                "overlap_range": list(serving.overlap_range),
                "refiner_steps_range": list(serving.refiner_steps_range),
                "inference_slots": serving.inference_slots,
                "max_waiting": serving.max_waiting,
                "max_request_seconds": serving.max_request_seconds,
            },
            "in_flight": gate.admitted,
            "seconds_per_megapixel": speed.seconds_per_mp,
            "accepted_formats": list(ACCEPTED_FORMATS),
            "output_formats": sorted(set(OUTPUT_FORMATS)),
            "auth": "api_key" if api_key else "anonymous",
        }

    @app.post("/api/deblur")
    async def deblur(request: Request) -> Response:
        started = time.perf_counter()
        _check_api_key(request, api_key)
        fmt = _output_format(request)
        tile_size, overlap = _tiling_params(request, serving, holder.model.tiling if holder.model else tiling)
        sampling = _sampling_params(request, serving)
        body = await _read_body(request, serving)
        data = await _image_bytes(request, body)
        width, height = _probe(data, serving)
        _check_expected_time(speed, width * height, serving)
        if not gate.admit():
            raise ApiError(503, "busy", f"the server is busy ({gate.capacity} requests in progress or queued, "
                           "serving.inference_slots + serving.max_waiting); retry in a few seconds",
                           headers={"Retry-After": "5"})
        try:
            result = await gate.run(_process, holder, serving, data, fmt, tile_size, overlap, time.perf_counter(),
                                    sampling)
        finally:
            gate.leave()
        speed.update(result.width * result.height, result.timings_ms["infer"] / 1000)
        model = holder.get()
        result.timings_ms["total"] = (time.perf_counter() - started) * 1000
        return Response(content=result.body, media_type=MEDIA_TYPES[result.fmt], headers={
            "X-Model-Name": model.name,
            "X-Model-Version": model.version,
            "X-Model-Alias": model.alias,
            "X-Inference-Ms": f"{result.timings_ms['infer']:.1f}",
            "X-Image-Size": f"{result.width}x{result.height}",
            "X-Tile-Size": str(tile_size),
            "X-Overlap": str(overlap),
            "X-Alpha": result.alpha,
            **({"X-Seed": str(result.sampling["seed"]), "X-Steps": str(result.sampling["steps"])}
               if result.sampling else {}),
            "Server-Timing": ", ".join(f"{k};dur={v:.1f}" for k, v in result.timings_ms.items()),
            "Content-Disposition": f'inline; filename="deblurred.{EXTENSIONS[result.fmt]}"',
        })

    return app


def _process(holder: ModelHolder, serving: ServingConfig, data: bytes, fmt: str,
             tile_size: int, overlap: int, queued_at: float, sampling: dict[str, int] | None = None) -> DeblurResult:
    """Decode, deblur and encode one image (on an inference thread)."""
    timings = {"queue": _lap(queued_at)}
    mark = time.perf_counter()
    model = holder.get()
    timings["load"] = _lap(mark)
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
    restored = model.deblur(decoded.rgb, tile_size, overlap, sampling)
    timings["infer"] = _lap(mark)
    mark = time.perf_counter()
    body = encode_image(restored, fmt, alpha=decoded.alpha, quality=serving.output_quality)
    timings["encode"] = _lap(mark)
    alpha = "none" if decoded.alpha is None else ("kept" if fmt in ("PNG", "WEBP") else "dropped")
    height, width = restored.shape[:2]
    return DeblurResult(body=body, fmt=fmt, width=width, height=height, alpha=alpha, timings_ms=timings,
                        sampling=sampling)


def _check_expected_time(speed: SpeedEstimate, pixels: int, serving: ServingConfig) -> None:
    expected = speed.seconds_for(pixels)
    if expected is not None and expected > serving.max_request_seconds:
        largest = serving.max_request_seconds / speed.seconds_per_mp
        raise ApiError(413, "image_too_slow", f"this {pixels / 1e6:.1f} MP image would take about {expected:.0f} s "
                       f"on this server, over the {serving.max_request_seconds:g} s limit "
                       f"(serving.max_request_seconds): downscale it to at most {largest:.1f} MP")


def _lap(mark: float) -> float:
    return (time.perf_counter() - mark) * 1000


def _model_info(model: ServingModel | None) -> dict | None:
    if model is None:
        return None
    keys = ("architecture", "run_id", "metrics", "weights_dtype", "exported_at")
    return {"name": model.name, "version": model.version, "alias": model.alias,
            "load_seconds": round(model.load_seconds, 3), **{k: model.meta.get(k) for k in keys}}


def _check_api_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("x-functions-key") or request.query_params.get("code") or ""
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "unauthorized", "this server needs an API key: send it in the x-functions-key "
                       "header or as ?code=")


def _output_format(request: Request) -> str:
    """``?format=`` if given, else the first supported image type in Accept, else PNG."""
    asked = request.query_params.get("format")
    if asked is not None:
        fmt = OUTPUT_FORMATS.get(asked.strip().lower())
        if fmt is None:
            raise ApiError(400, "invalid_format", f"format={asked!r} is not supported; use png, jpeg or webp")
        return fmt
    by_media = {v: k for k, v in MEDIA_TYPES.items()}
    for media in _accepted_media(request.headers.get("accept", "")):
        if media in by_media:
            return by_media[media]
    return "PNG"


def _accepted_media(accept: str) -> list[str]:
    """Media types of an Accept header, highest q first (q=0 dropped)."""
    ranked = []
    for position, part in enumerate(accept.split(",")):
        media, *options = [p.strip() for p in part.split(";")]
        q = 1.0
        for option in options:
            if option.startswith("q="):
                try:
                    q = float(option[2:])
                except ValueError:
                    q = 0.0
        if media and q > 0:
            ranked.append((-q, position, media.lower()))
    return [media for _, _, media in sorted(ranked)]


def _tiling_params(request: Request, serving: ServingConfig, default: TilingConfig) -> tuple[int, int]:
    tile_size = _int_param(request, "tile_size", serving.tile_size_range, default.tile_size)
    overlap = _int_param(request, "overlap", serving.overlap_range, default.overlap)
    if 2 * overlap >= tile_size:
        raise ApiError(400, "invalid_parameter", f"overlap={overlap} must be less than half of tile_size={tile_size}")
    return tile_size, overlap


def _sampling_params(request: Request, serving: ServingConfig) -> dict[str, int]:
    """``?seed=`` and ``?steps=`` for a diffusion refiner (only those given; the model checks its kind)."""
    from deblur.diffusion.refiner import MAX_SEED

    sampling = {}
    if request.query_params.get("seed") is not None:
        sampling["seed"] = _int_param(request, "seed", (0, MAX_SEED), 0, source="")
    if request.query_params.get("steps") is not None:
        sampling["steps"] = _int_param(request, "steps", serving.refiner_steps_range, 0,
                                       source="serving.refiner_steps_range")
    return sampling


def _int_param(request: Request, name: str, bounds: tuple[int, int], default: int, source: str | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    low, high = bounds
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        where = f"serving.{name}_range" if source is None else source
        raise ApiError(400, "invalid_parameter", f"{name}={raw!r} must be an integer in [{low}, {high}]"
                       + (f" ({where})" if where else ""))
    return value


async def _read_body(request: Request, serving: ServingConfig) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``max_body_mb``."""
    limit = int(serving.max_body_mb * 1024 * 1024)
    too_large = ApiError(413, "payload_too_large", f"the request body exceeds the {serving.max_body_mb:g} MB limit "
                         "(serving.max_body_mb); send a smaller file, e.g. a JPEG or a downscaled image")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad_request", f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty: send the image bytes, or a multipart "
                       f"form with the file in the field '{UPLOAD_FIELD}'")
    return bytes(body)


async def _image_bytes(request: Request, body: bytes) -> bytes:
    """The image in ``body``: the body itself, or the ``image`` file of a multipart form."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        return body

    async def replay() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(Headers({"content-type": content_type}), replay(), max_files=4, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise ApiError(400, "invalid_multipart", f"the multipart form could not be parsed: {err.message}") from err
    try:
        upload = form.get(UPLOAD_FIELD)
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "missing_field", f"the multipart form has no file field '{UPLOAD_FIELD}'")
        data = await upload.read()
    finally:
        await form.close()
    if not data:
        raise ApiError(400, "empty_body", f"the file in the field '{UPLOAD_FIELD}' is empty")
    return data


def _probe(data: bytes, serving: ServingConfig) -> tuple[int, int]:
    """Width and height from the image header, checked against the limits before any decoding."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            width, height = img.size
    except UnidentifiedImageError as err:
        raise ApiError(415, "unsupported_media_type", "the body is not an image in a supported format "
                       f"({', '.join(ACCEPTED_FORMATS)})") from err
    except Image.DecompressionBombError as err:
        raise ApiError(413, "image_too_large", f"the image has too many pixels ({err}); the limit is "
                       f"{serving.max_pixels} pixels (serving.max_pixels)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ApiError(400, "invalid_image", f"the image is corrupt or truncated ({err}); send the complete "
                       "file") from err
    pixels = width * height
    if pixels > serving.max_pixels:
        raise ApiError(413, "image_too_large", f"the image is {width}x{height} = {pixels} pixels; the limit is "
                       f"{serving.max_pixels} pixels (serving.max_pixels): downscale it")
    if max(width, height) > serving.max_side:
        raise ApiError(413, "image_too_large", f"the image is {width}x{height}; the longest side may be at most "
                       f"{serving.max_side} pixels (serving.max_side): downscale it")
    if min(width, height) < serving.min_side:
        raise ApiError(400, "image_too_small", f"the image is {width}x{height}; both sides must be at least "
                       f"{serving.min_side} pixels (serving.min_side)")
    return width, height


def _error_response(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    codes = {404: "not_found", 405: "method_not_allowed"}

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        return _error_response(err.status, err.code, err.detail, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        detail = f"{request.method} {request.url.path}: {err.detail}"
        if err.status_code == 405:
            detail += f" (allowed: {err.headers.get('Allow', '') if err.headers else ''})"
        return _error_response(err.status_code, codes.get(err.status_code, "http_error"), detail, err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        return _error_response(400, "bad_request", str(err.errors()))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(500, "internal_error", f"{type(err).__name__}: {err}")


# glibc hands large freed blocks back to the OS, so every tile batch faults its activation
# buffers in anew: 20-40 % of the CPU time of a request on this machine. These keep blocks
# up to 256 MB in the heap. glibc reads them at process start only (on Azure: app settings).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "268435456"}


def _restart_with_malloc_settings(argv: list[str]) -> None:
    """Re-execute this command once with MALLOC_ENV added (values already set are kept)."""
    if sys.platform != "linux" or all(k in os.environ for k in MALLOC_ENV):
        return
    env = {**MALLOC_ENV, **os.environ}
    os.execve(sys.executable, [sys.executable, "-m", "deblur.webapp", *argv], env)


SECRET_QUERY = re.compile(r"([?&](?:code|key|api_key|sig)=)[^&\s\"]*", re.IGNORECASE)


class RedactSecrets(logging.Filter):
    """Masks keys sent in the query (``?code=``, Azure's function key) in every log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(SECRET_QUERY.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = SECRET_QUERY.sub(r"\1***", record.msg)
        return True


def uvicorn_log_config() -> dict:
    """uvicorn's logging set-up with ``RedactSecrets`` on its handlers (the access log shows each query)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact"] = {"()": RedactSecrets}
    for handler in config["handlers"].values():
        handler["filters"] = [*handler.get("filters", []), "redact"]
    return config


def main(argv: list[str] | None = None) -> None:
    """``python -m deblur.webapp``: serve the app with uvicorn on one worker."""
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the deblurring HTTP API and web page.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--model-dir", default=None, help="serving artifact folder (default: from the environment)")
    parser.add_argument("--no-preload", action="store_true", help="load the model on the first request")
    parser.add_argument("--keep-malloc", action="store_true", help="do not restart with MALLOC_ENV (see source)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not args.keep_malloc:
        _restart_with_malloc_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())
    app = create_app(args.model_dir, preload=not args.no_preload)
    print(f"deblur: serving http://{args.host}:{args.port}/ (model: {app.state.holder.source.describe()})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="info", log_config=uvicorn_log_config())


if __name__ == "__main__":
    main()
