"""The FastAPI app: ``POST /api/deblur`` (image in, deblurred image out), ``GET /api/health``
and ``GET /`` (a small web page, also at ``/api/ui`` for hosts that serve only ``/api/*``).

Where the model comes from (``model_dir=None``): ``DEBLUR_MODEL_URI`` (a ``models:/`` URI,
used when ``MLFLOW_TRACKING_URI`` is set), else ``DEBLUR_MODEL_DIR``, else
``function_app/model``. Limits come from the serving artifact's copy of params.yaml's
``serving`` section (from params.yaml itself, ``DEBLUR_PARAMS`` or ./params.yaml, for a
registry URI), unless ``settings`` is given.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from deblur.config import ServingConfig
from deblur.service.admission import InferenceGate, SpeedEstimate, check_expected_time
from deblur.service.decoding import (
    ACCEPTED_FORMATS,
    EXTENSIONS,
    MEDIA_TYPES,
    OUTPUT_FORMATS,
    check_api_key,
    image_bytes,
    output_format,
    probe,
    read_body,
    sampling_params,
    tiling_params,
)
from deblur.service.errors import ApiError, add_error_handlers
from deblur.service.runtime import ModelHolder, ModelSource, model_info, model_source_from_env, process_image, \
    resolve_settings


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
    app.state.holder, app.state.serving = holder, serving
    add_error_handlers(app)

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
            "model": model_info(model),
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
        check_api_key(request, api_key)
        fmt = output_format(request)
        tile_size, overlap = tiling_params(request, serving, holder.model.tiling if holder.model else tiling)
        sampling = sampling_params(request, serving)
        body = await read_body(request, serving)
        data = await image_bytes(request, body)
        width, height = probe(data, serving)
        check_expected_time(speed, width * height, serving)
        if not gate.admit():
            raise ApiError(503, "busy", f"the server is busy ({gate.capacity} requests in progress or queued, "
                           "serving.inference_slots + serving.max_waiting); retry in a few seconds",
                           headers={"Retry-After": "5"})
        try:
            result = await gate.run(process_image, holder, serving, data, fmt, tile_size, overlap,
                                    time.perf_counter(), sampling)
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
