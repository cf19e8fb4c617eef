"""The one error answer of the service, JSON ``{"error": code, "detail": message}`` with a status,
and ``ERROR_CODES``, the catalogue of every ``error`` code: the handlers answer with these, the
OpenAPI spec (``deblur.service.openapi``) and documentation/serving.md list them, and a test
fails on any ``ApiError(status, "code", ...)`` in the service that is missing here.

A new code: add one line to ``ERROR_CODES`` (its status, what it means for the client, and the
routes that can answer it when that is not just ``POST /api/deblur``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deblur.core.imageio import ACCEPTED_FORMATS_TEXT

log = logging.getLogger("deblur.service")

DEBLUR_ROUTE = "POST /api/deblur"
EVERY_ROUTE = "*"          # any documented route
NO_ROUTE = "none"          # a path or method outside the spec (404, 405)


@dataclass(frozen=True)
class ErrorCode:
    """One ``error`` code: its HTTP status, when a client gets it, the routes that answer it, extra headers."""

    status: int
    meaning: str
    routes: tuple[str, ...] = (DEBLUR_ROUTE,)
    headers: tuple[str, ...] = ()


ERROR_CODES: dict[str, ErrorCode] = {
    "bad_request": ErrorCode(400, "a malformed request: not valid HTTP/1.1 (e.g. `Content-Length: abc`, an "
                                  "illegal header line), answered before any route with `Connection: close`",
                             routes=(EVERY_ROUTE,)),
    "empty_body": ErrorCode(400, "no bytes, or an empty multipart file"),
    "missing_field": ErrorCode(400, "a multipart form without an `image` file"),
    "invalid_multipart": ErrorCode(400, "a multipart form that cannot be parsed: no boundary, broken framing, "
                                        "truncated, over 16 parts or a part header over 8 kB"),
    "duplicate_field": ErrorCode(400, "a multipart form with more than one `image` part, or more than one `psf` part"),
    "invalid_image": ErrorCode(400, "a corrupt or truncated image file"),
    "image_too_small": ErrorCode(400, "a side below `serving.min_side`"),
    "invalid_parameter": ErrorCode(400, "`tile_size`, `overlap`, `seed` or `steps` outside its range, "
                                        "`2*overlap >= tile_size`, `seed`/`steps` for a model that does not sample, "
                                        "`mode` other than fast or thorough, `return_psf` other than 1, 0, true or "
                                        "false, or `return_psf=1` in fast mode (there is no kernel to return)"),
    "invalid_psf": ErrorCode(400, "the multipart `psf` part is not a usable blur kernel (not a .npy 2-D array or a "
                                  "greyscale image, an even or over-255 px side, negative or non-finite weights, "
                                  "zero sum); the detail names the problem"),
    "mode_unavailable": ErrorCode(400, "`mode=thorough` for a model exported without kernel-aware settings "
                                       "(`kernel_aware` in model.json: export or register it again), or on a "
                                       "worker without scipy and OpenCV; `mode=fast` works"),
    "invalid_format": ErrorCode(400, "`format` other than png, jpeg (jpg) or webp"),
    "unauthorized": ErrorCode(401, "`DEBLUR_API_KEY` is set and the request has no key or a wrong one"),
    "request_timeout": ErrorCode(408, "the body did not arrive within `serving.body_timeout_seconds`, or paused "
                                      "for a quarter of it; the connection is closed"),
    "not_found": ErrorCode(404, "a path that is not a route", routes=(NO_ROUTE,)),
    "method_not_allowed": ErrorCode(405, "a method the route does not have (`Allow` lists those it has)",
                                    routes=(NO_ROUTE,), headers=("Allow",)),
    "payload_too_large": ErrorCode(413, "a body over `serving.max_body_mb`: refused from `Content-Length` before "
                                        "the body is read, or while reading a body without one; or a body that can "
                                        "never fit the `serving.max_buffered_mb` budget"),
    "image_too_large": ErrorCode(413, "width x height over `serving.max_pixels` (from the header, before "
                                      "decoding) or a side over `serving.max_side`, or an image whose decoding "
                                      "needs more than the `serving.max_buffered_mb` budget"),
    "image_too_slow": ErrorCode(413, "this worker's measured speed says the image would take longer than "
                                     "`serving.max_request_seconds`; the detail names the largest size that fits"),
    "unsupported_media_type": ErrorCode(415, f"not a {ACCEPTED_FORMATS_TEXT} image"),
    "internal_error": ErrorCode(500, "a bug: the detail names the exception (the worker keeps serving)",
                                routes=(EVERY_ROUTE,)),
    "model_unavailable": ErrorCode(503, "the model could not be loaded (the detail says why; retried on the "
                                        "next request), or its default mode, thorough, cannot run on this worker "
                                        "(scipy or OpenCV missing)"),
    "busy": ErrorCode(503, "`inference_slots + max_waiting` requests already in the worker, or the "
                           "`serving.max_buffered_mb` budget is in use; retry after `Retry-After` seconds",
                      headers=("Retry-After",)),
    "deadline_exceeded": ErrorCode(503, "the request ran (or waited) past `serving.max_request_seconds`: the speed "
                                        "estimate was wrong and has learned from it; retry or send a smaller image",
                                   headers=("Retry-After",)),
    "shutting_down": ErrorCode(503, "the worker got SIGTERM: it admits nothing new and stops running work after "
                                    "`serving.shutdown_grace_seconds`; retry (another worker answers)",
                               headers=("Retry-After",)),
}


FRAMEWORK_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}   # Starlette's HTTPException


def codes_for(route: str, status: int | None = None) -> list[str]:
    """The codes that ``route`` (e.g. ``"POST /api/deblur"``) can answer, with ``status`` if given."""
    return [code for code, entry in ERROR_CODES.items()
            if (route in entry.routes or (EVERY_ROUTE in entry.routes and route != NO_ROUTE))
            and (status is None or entry.status == status)]


def is_catalogued(status: int, code: str) -> bool:
    entry = ERROR_CODES.get(code)
    return entry is not None and entry.status == status


class ApiError(Exception):
    """An error answered as JSON ``{"error": code, "detail": message}`` with ``status`` (a code of ``ERROR_CODES``)."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


def error_body(err: ApiError) -> bytes:
    """The JSON body of ``err``, for answers written below the app (deblur.service.server)."""
    if not is_catalogued(err.status, err.code):
        log.warning("error code %r with status %d is not in deblur.service.errors.ERROR_CODES", err.code, err.status)
    return json.dumps({"error": err.code, "detail": err.detail}).encode()


def error_response(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
    if not is_catalogued(status, code):
        log.warning("error code %r with status %d is not in deblur.service.errors.ERROR_CODES", code, status)
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.code, err.detail, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        detail = f"{request.method} {request.url.path}: {err.detail}"
        if err.status_code == 405:
            detail += f" (allowed: {err.headers.get('Allow', '') if err.headers else ''})"
        code = FRAMEWORK_CODES.get(err.status_code, "http_error")   # http_error: none is known to reach here
        return error_response(err.status_code, code, detail, err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(400, "bad_request", str(err.errors()))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", f"{type(err).__name__}: {err}")
