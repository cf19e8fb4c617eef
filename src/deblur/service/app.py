"""The FastAPI app: ``POST /api/deblur`` (image in, deblurred image out; ``?mode=fast|thorough``,
a multipart ``psf`` part for a known kernel, ``?return_psf=1`` for JSON with the kernel), ``GET
/api/health`` and ``GET /`` (a small web page, also at ``/api/ui`` for hosts that serve only ``/api/*``).

Where the model comes from (``model_dir=None``): ``DEBLUR_MODEL_URI`` (a ``models:/`` URI,
used when ``MLFLOW_TRACKING_URI`` is set), else ``DEBLUR_MODEL_DIR``, else
``function_app/model``. Limits come from the serving artifact's copy of params.yaml's
``serving`` section (from params.yaml itself, ``DEBLUR_PARAMS`` or ./params.yaml, for a
registry URI), unless ``settings`` is given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from deblur.core.config import ServingConfig
from deblur.service.admission import (BYTES_PER_PIXEL, MODE_BYTES_PER_PADDED_PIXEL, InferenceGate, MemoryBudget,
                                      ModeCosts, NotStarted, RequestCancelled, RequestControl, Reservation, Shutdown,
                                      check_expected_time, shutting_down, working_bytes)
from deblur.service.decoding import (ACCEPTED_FORMATS, EXTENSIONS, MEDIA_TYPES, OUTPUT_FORMATS, check_api_key,
                                     mode_param, output_format, probe, read_body, read_psf, return_psf_param,
                                     sampling_params, tiling_params, upload_parts)
from deblur.service.errors import ApiError, add_error_handlers
from deblur.service.openapi import add_api_docs
from deblur.service.runtime import (DeblurResult, ModelHolder, ModelSource, model_info, model_source_from_env,
                                    process_image, resolve_modes, resolve_settings)
from deblur.inference.cost_model import SpeedModel, plan_tiles, prior_from_meta

log = logging.getLogger("deblur.service")


def create_app(model_dir: str | Path | None = None, settings: ServingConfig | None = None,
               preload: bool = True) -> FastAPI:
    """The FastAPI app; ``model_dir=None`` picks the model from the environment (see module doc)."""
    source = ModelSource(Path(model_dir), None) if model_dir is not None else model_source_from_env()
    service = Service(source, settings, preload)
    app = FastAPI(title="deblur", summary="Single-image deblurring", lifespan=service.lifespan,
                  docs_url=None, openapi_url="/api/openapi.json", redoc_url=None)
    app.state.holder, app.state.serving, app.state.modes = service.holder, service.serving, service.modes
    app.state.speed, app.state.costs = service.speed, service.costs
    app.state.budget, app.state.shutdown = service.budget, service.shutdown
    add_error_handlers(app)
    add_api_docs(app)
    app.add_api_route("/api/ui", page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/", page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/api/health", service.health, methods=["GET"])
    app.add_api_route("/api/deblur", service.deblur, methods=["POST"])
    return app


def page() -> HTMLResponse:
    """``GET /`` and ``GET /api/ui``: the web page."""
    return HTMLResponse(resources.files("deblur").joinpath("static/index.html").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Asked:
    """What a request asks for, read (and refused) before its body: query, Accept, API key."""
    fmt: str
    tile_size: int
    overlap: int
    sampling: dict | None
    mode: str | None
    return_psf: bool


@dataclass(frozen=True)
class Received:
    """An upload that fits: the image bytes, its psf part, the mode it runs in and its time estimate."""
    data: bytes
    psf: object          # the psf part's kernel (a float array), or None
    mode: str
    estimate: float


class Service:
    """What the routes share: the model, the serving settings and the admission state
    (inference slots, speed model, memory budget, shutdown)."""

    def __init__(self, source: ModelSource, settings: ServingConfig | None, preload: bool) -> None:
        self.source, self.preload = source, preload
        self.serving, self.tiling, self.settings_source, artifact_meta = resolve_settings(source, settings)
        self.modes = resolve_modes(source, artifact_meta)
        self.holder = ModelHolder(source, self.tiling, self.serving.threads, self.serving.runtime)
        self.gate = InferenceGate(self.serving.inference_slots, self.serving.max_waiting)
        self.speed = SpeedModel(prior_from_meta(artifact_meta, self.serving.runtime))
        self.costs = ModeCosts()
        self.budget = MemoryBudget(int(self.serving.max_buffered_mb * 2**20))
        self.shutdown = Shutdown(self.serving.shutdown_grace_seconds)
        self.running: set[RequestControl] = set()
        self.api_key = os.environ.get("DEBLUR_API_KEY") or None

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI):
        if self.preload:
            threading.Thread(target=self.holder.preload, name="deblur-model-preload", daemon=True).start()
        _drain_on_sigterm(self.shutdown)
        yield
        self.shutdown.begin()
        for control in list(self.running):   # the server's grace is over: stop what still runs
            control.cancel("the worker shut down")
        self.gate.shutdown()

    def _tiling(self):
        """The loaded model's tiling, or the configured one before it loads."""
        return self.holder.model.tiling if self.holder.model else self.tiling

    def plan_for(self, tile_size: int, overlap: int):
        model = self.holder.model
        align = (getattr(model, "size_multiple", None)   # the ONNX runtime's model; torch's is model.model's
                 or getattr(getattr(model, "model", None), "size_multiple", None) or self.speed.prior.size_multiple)
        batch_size = (model.tiling if model else self.tiling).batch_size
        return lambda width, height: plan_tiles(width, height, tile_size, overlap, batch_size, int(align))

    # --- GET /api/health ---------------------------------------------------------------------
    def health(self) -> dict:
        model, serving = self.holder.model, self.serving
        default = self._tiling()
        speed_report = self.speed.report(self.plan_for(default.tile_size, default.overlap))
        return {
            "status": "ok",
            "ready": model is not None,
            "error": self.holder.error,
            "model": model_info(model),
            "model_source": self.source.describe(),
            "settings_source": self.settings_source,
            "tiling": (model.tiling if model else self.tiling).model_dump(),
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
            "in_flight": self.gate.admitted,
            "seconds_per_megapixel": speed_report["seconds_per_megapixel"],
            "modes": self.modes.report(),
            "admission": {
                "speed": {**speed_report, "modes": self.costs.report()},
                "memory": {"budget_mb": self.budget.limit / 2**20, "used_mb": round(self.budget.used / 2**20, 3),
                           "bytes_per_pixel": BYTES_PER_PIXEL,
                           "mode_bytes_per_padded_pixel": dict(MODE_BYTES_PER_PADDED_PIXEL),
                           "receiving_bodies": self.budget.receiving},
                "draining": self.shutdown.draining,
            },
            "accepted_formats": list(ACCEPTED_FORMATS),
            "output_formats": sorted(set(OUTPUT_FORMATS)),
            "auth": "api_key" if self.api_key else "anonymous",
        }

    # --- POST /api/deblur --------------------------------------------------------------------
    async def deblur(self, request: Request) -> Response:
        started, arrived = time.perf_counter(), time.monotonic()
        asked = self._asked(request)
        with self.budget.reservation() as reservation:
            received = await self._receive(request, asked, reservation)
            ran = await self._run(request, asked, received, arrived)
        if ran is None:
            return Response(status_code=499)   # nginx's 'client closed request'; nobody reads it
        result, control = ran
        self._learn(result, control, received.mode)
        return self._answer(result, asked, started)

    def _asked(self, request: Request) -> Asked:
        """The query and headers, checked before a byte of body is read."""
        if self.shutdown.draining:
            raise shutting_down()
        check_api_key(request, self.api_key)
        fmt = output_format(request)
        tile_size, overlap = tiling_params(request, self.serving, self._tiling())
        sampling = sampling_params(request, self.serving)
        asked_mode, return_psf = mode_param(request), return_psf_param(request)
        if asked_mode is not None:
            self.modes.check(asked_mode, asked=True)   # refused before the body is read
        return Asked(fmt, tile_size, overlap, sampling, asked_mode, return_psf)

    async def _receive(self, request: Request, asked: Asked, reservation: Reservation) -> Received:
        """The body read into ``reservation``, probed, and covered for the pixels it decodes to."""
        serving = self.serving
        declared = request.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) <= serving.max_body_mb * 2**20:   # larger: read_body's 413
            reservation.check_room(int(declared))   # 503 before the body is sent when it could not be held now
        with self.budget.receiving_body():
            body = await read_body(request, serving, reservation)   # held as the bytes arrive, not before
        upload = await upload_parts(request, body)
        data = upload.image
        reservation.cover(len(body) + (len(data) if data is not body else 0))
        width, height = probe(data, serving)
        psf = read_psf(upload.psf, upload.psf_name) if upload.psf is not None else None
        mode = "psf" if psf is not None else (asked.mode or self.modes.default)   # a psf part: non-blind, any mode
        self.modes.check(mode, asked=asked.mode is not None)
        if asked.return_psf and mode == "fast":
            raise ApiError(400, "invalid_parameter", "return_psf=1 returns the blur kernel that mode=thorough "
                           "estimates (or the one sent in a psf part); this request runs in mode=fast, which "
                           "has none: add mode=thorough")
        kernel_side = (max(psf.shape) if psf is not None else
                       self.modes.kernel_aware.max_kernel_size if mode == "thorough" else 0)
        estimate = check_expected_time(self.speed, width, height, serving,
                                       self.plan_for(asked.tile_size, asked.overlap), mode, self.costs)
        reservation.cover(reservation.held + working_bytes(mode, width, height, kernel_side), "decoded pixels",
                          never_fits=_never_fits(width, height, serving, mode, kernel_side))
        return Received(data, psf, mode, estimate)

    async def _run(self, request: Request, asked: Asked, received: Received,
                   arrived: float) -> tuple[DeblurResult, RequestControl] | None:
        """Admit the request to an inference slot and run it: ``(result, control)``, or None when the
        client went away."""
        if self.shutdown.draining:
            raise shutting_down()
        if not self.gate.admit():
            raise ApiError(503, "busy", f"the server is busy ({self.gate.capacity} requests in progress or queued, "
                           "serving.inference_slots + serving.max_waiting); retry in a few seconds",
                           headers={"Retry-After": "5"})
        control = RequestControl(self.serving, arrived, received.estimate, self.speed, self.shutdown)
        self.running.add(control)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, control))
        try:
            result = await self.gate.run(process_image, self.holder, self.serving, received.data, asked.fmt,
                                         asked.tile_size, asked.overlap, time.perf_counter(), asked.sampling, control,
                                         received.mode, self.modes.kernel_aware, received.psf, asked.return_psf,
                                         stop_waiting=self.shutdown.began())
        except NotStarted:   # SIGTERM while it waited for the inference thread: answered now, not after the grace
            raise shutting_down() from None
        except RequestCancelled as err:
            log.info("cancelled after %.1f s: %s", time.monotonic() - arrived, err)
            return None
        except ApiError as err:
            if err.code in ("deadline_exceeded", "shutting_down"):
                log.warning("%s after %.1f s (estimated %.1f s)", err.code, time.monotonic() - arrived,
                            received.estimate)
            raise
        finally:
            control.cancel("the request ended")   # stops the inference thread if this task was cancelled
            watcher.cancel()
            self.running.discard(control)
            self.gate.leave()
        return result, control

    def _learn(self, result: DeblurResult, control: RequestControl, mode: str) -> None:
        """Feed the speed model what this request cost outside its tile batches."""
        worked = sum(result.timings_ms.get(k, 0.0) for k in ("decode", "infer", "encode")) / 1000
        outside_batches, pixels = max(worked - control.batch_seconds, 0.0), result.width * result.height
        if mode == "fast":
            self.speed.observe_request(pixels, outside_batches)
        else:   # the kernel-aware part is learnt apart: fast estimates stay as they were
            self.costs.observe(mode, pixels, max(outside_batches - self.speed.request.line.at(pixels), 0.0))

    def _answer(self, result: DeblurResult, asked: Asked, started: float) -> Response:
        model = self.holder.get()
        result.timings_ms["total"] = (time.perf_counter() - started) * 1000
        extension = "json" if result.media_type else EXTENSIONS[result.fmt]
        return Response(content=result.body, media_type=result.media_type or MEDIA_TYPES[result.fmt], headers={
            "X-Model-Name": model.name,
            "X-Model-Version": model.version,
            "X-Model-Alias": model.alias,
            "X-Inference-Ms": f"{result.timings_ms['infer']:.1f}",
            "X-Image-Size": f"{result.width}x{result.height}",
            "X-Tile-Size": str(asked.tile_size),
            "X-Overlap": str(asked.overlap),
            "X-Alpha": result.alpha,
            **({"X-Seed": str(result.sampling["seed"]), "X-Steps": str(result.sampling["steps"])}
               if result.sampling else {}),
            "X-Deblur-Mode": result.mode,
            **({"X-Deblur-Chosen": result.chosen} if result.chosen else {}),
            **({"X-Deblur-Psf-Size": f"{result.psf_shape[1]}x{result.psf_shape[0]}"} if result.psf_shape else {}),
            "Server-Timing": ", ".join(f"{k};dur={v:.1f}" for k, v in result.timings_ms.items()),
            "Content-Disposition": f'inline; filename="deblurred.{extension}"',
        })


def _never_fits(width: int, height: int, serving: ServingConfig, mode: str = "fast", kernel_side: int = 0) -> ApiError:
    per_pixel = BYTES_PER_PIXEL + MODE_BYTES_PER_PADDED_PIXEL.get(mode, 0)
    largest = serving.max_buffered_mb * 2**20 / per_pixel
    how = {"fast": "deblurring it", "thorough": "restoring it in mode=thorough (mode=fast needs "
                                                f"{BYTES_PER_PIXEL} B per pixel)",
           "psf": "deconvolving it with the psf part"}[mode]
    return ApiError(413, "image_too_large", f"the image is {width}x{height}: decoding and {how} needs about "
                    f"{working_bytes(mode, width, height, kernel_side) / 2**20:.0f} MB, over the "
                    f"{serving.max_buffered_mb:g} MB budget (serving.max_buffered_mb): downscale it to under "
                    f"{largest / 1e6:.1f} MP")


async def _cancel_on_disconnect(request: Request, control: RequestControl) -> None:
    """Set ``control``'s cancel flag when the client disconnects (the body has been read by now)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            control.cancel("the client disconnected")
            return
        await asyncio.sleep(0.05)


def _drain_on_sigterm(shutdown: Shutdown) -> None:
    """Chain ``shutdown.begin()`` in front of the server's SIGTERM handler (uvicorn's, in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return

    def handler(signum, frame) -> None:
        shutdown.begin()
        log.info("SIGTERM: admitting no new requests; running ones get %g s", shutdown.grace)
        previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)
