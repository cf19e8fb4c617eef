"""The API contract at ``/api/openapi.json`` and its docs at ``/api/docs``, both offline.

The spec is built from what the worker enforces, so it cannot drift: query bounds from its
``ServingConfig`` (``app.state.serving``), input and output media types from
``deblur.service.decoding``, and every error status with the enum of its ``error`` codes from
``deblur.service.errors.ERROR_CODES``. ``/api/docs`` is Swagger UI served from files shipped in
the package (``deblur/static/docs``, no CDN); its URLs carry the page's own ``?code=``, so it
also opens behind an Azure Functions key.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from importlib import resources
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from PIL import Image

from deblur.core.config import ServingConfig, TilingConfig
from deblur.service.decoding import ACCEPTED_FORMATS, FLAGS, MAX_PSF_SIDE, MAX_SEED, MEDIA_TYPES, MODES, \
    OUTPUT_FORMATS, PSF_FIELD, UPLOAD_FIELD, exact_query_key
from deblur.service.errors import DEBLUR_ROUTE, ERROR_CODES, NO_ROUTE, ApiError, codes_for

log = logging.getLogger("deblur.service")

DOCS_URL = "/api/docs"
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "favicon-32x32.png": "image/png"}
STATUS_TEXT = {400: "Bad request", 401: "Unauthorized", 404: "Not found", 405: "Method not allowed",
               408: "Request timeout", 413: "Too large", 415: "Unsupported media type",
               500: "Internal error", 503: "Unavailable"}
BINARY = {"type": "string", "format": "binary"}
DESCRIPTION = (
    "Deblurs one photo per request: send the image file's bytes (or a multipart form with the file in "
    f"the field `{UPLOAD_FIELD}`) to `POST /api/deblur`, get the deblurred image back, same size. "
    "Every error is JSON `{\"error\": code, \"detail\": message}`; the codes of each status are listed "
    "with it. A path that is not a route answers 404 `not_found`, a method a route does not have 405 "
    "`method_not_allowed` with `Allow`. The limits are this worker's `serving` settings "
    "(`GET /api/health` shows them). `mode=thorough` estimates the blur kernel, deconvolves it and keeps what "
    "the evidence supports; a multipart `psf` part deconvolves with a kernel you know; `return_psf=1` answers "
    "JSON with the image and the kernel. Details: documentation/serving.md and documentation/kernel_aware.md."
)
CANDIDATES = ("kernel", "network", "network_half", "network_quarter", "input")   # = deblur.psf.restore.CANDIDATES


def add_api_docs(app: FastAPI) -> None:
    """Serve the contract at ``app.openapi_url`` and Swagger UI at ``/api/docs`` from package files."""
    app.openapi = functools.partial(_cached_spec, app)

    @app.get(DOCS_URL, include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        key = exact_query_key(request)   # only a ?code= spelled so is passed on (see check_api_key)
        suffix = f"?code={quote(key, safe='')}" if key else ""   # quoted: safe inside the HTML and the JS string
        return get_swagger_ui_html(
            openapi_url=f"{app.openapi_url}{suffix}", title=f"{app.title} API",
            swagger_js_url=f"{DOCS_URL}/swagger-ui-bundle.js{suffix}",
            swagger_css_url=f"{DOCS_URL}/swagger-ui.css{suffix}",
            swagger_favicon_url=f"{DOCS_URL}/favicon-32x32.png{suffix}",
            swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": True},  # no call to validator.swagger.io
        )

    @app.get(DOCS_URL + "/{name}", include_in_schema=False)
    def docs_asset(name: str) -> Response:
        if name not in DOCS_ASSETS:
            raise ApiError(404, "not_found", f"GET {DOCS_URL}/{name}: no such file; the docs are at {DOCS_URL}")
        return Response(_asset(name), media_type=DOCS_ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files("deblur").joinpath("static", "docs", name).read_bytes()


def _cached_spec(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        app.openapi_schema = openapi_spec(app)
    return app.openapi_schema


def openapi_spec(app: FastAPI) -> dict:
    """The OpenAPI document of ``app``: FastAPI's list of routes, each operation described from ``OPERATIONS``."""
    serving: ServingConfig = app.state.serving
    holder = getattr(app.state, "holder", None)
    tiling: TilingConfig | None = getattr(holder, "tiling", None)
    modes = getattr(app.state, "modes", None)
    spec = get_openapi(title=app.title, version=app.version, summary=app.summary, description=DESCRIPTION,
                       routes=app.routes)
    for path, methods in spec.get("paths", {}).items():
        for method, operation in methods.items():
            route = f"{method.upper()} {path}"
            build = OPERATIONS.get(route)
            if build is None:
                log.warning("%s has no contract in deblur.service.openapi.OPERATIONS", route)
                continue
            operation.clear()
            operation.update(build(serving, tiling, modes))
            operation["responses"].update(error_responses(route))
    spec["components"] = {
        "schemas": {"Error": ERROR_SCHEMA, "Health": HEALTH_SCHEMA, "Restoration": RESTORATION_SCHEMA},
        "securitySchemes": {
            "functionKey": {"type": "apiKey", "in": "header", "name": "x-functions-key",
                            "description": "the API key (`DEBLUR_API_KEY`; on Azure, a function key)"},
            "code": {"type": "apiKey", "in": "query", "name": "code",
                     "description": "the same key as `?code=` (never written to the logs)"},
        },
        "responses": {STATUS_TEXT.get(status, f"Status {status}").title().replace(" ", ""):
                      error_response_object(NO_ROUTE, status)
                      for status in sorted({ERROR_CODES[c].status for c in codes_for(NO_ROUTE)})},
    }
    return spec


def error_responses(route: str) -> dict[str, dict]:
    """One response per error status that ``route`` can answer, its ``error`` an enum of that status's codes."""
    statuses = sorted({ERROR_CODES[code].status for code in codes_for(route)})
    return {str(status): error_response_object(route, status) for status in statuses}


def error_response_object(route: str, status: int) -> dict:
    codes = codes_for(route, status)
    headers = sorted({h for code in codes for h in ERROR_CODES[code].headers})
    response = {
        "description": f"{STATUS_TEXT.get(status, 'Error')}:\n\n"
                       + "\n".join(f"- `{code}`: {ERROR_CODES[code].meaning}" for code in codes),
        "content": {"application/json": {"schema": {
            "allOf": [{"$ref": "#/components/schemas/Error"}, {"properties": {"error": {"enum": codes}}}]}}},
    }
    if headers:
        response["headers"] = {name: HEADER_DOCS.get(name, {"schema": {"type": "string"}}) for name in headers}
    return response


HEADER_DOCS = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}},
    "Allow": {"description": "the methods the route has", "schema": {"type": "string"}},
}

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "detail"],
    "additionalProperties": False,
    "properties": {
        "error": {"type": "string", "description": "a stable code (each response lists the codes of its status)"},
        "detail": {"type": "string", "description": "what went wrong and what to do, naming the limit"},
    },
}

_NULLABLE_STRING = {"type": ["string", "null"]}
RESTORATION_SCHEMA = {
    "type": "object",
    "description": "the `?return_psf=1` answer: the restored image and the blur kernel, base64",
    "required": ["mode", "chosen", "media_type", "width", "height", "image", "psf", "psf_npy", "psf_size",
                 "evidence", "seconds"],
    "properties": {
        "mode": {"enum": ["thorough", "psf"], "description": "thorough, or psf (non-blind with the `psf` part)"},
        "chosen": {"enum": [*CANDIDATES, "psf"], "description": "the candidate kept (psf: the kernel sent)"},
        "media_type": {"enum": sorted(set(MEDIA_TYPES.values())), "description": "the encoding of `image`"},
        "width": {"type": "integer", "minimum": 1},
        "height": {"type": "integer", "minimum": 1},
        "image": {"type": "string", "contentEncoding": "base64", "description": "the restored image file"},
        "psf": {"type": ["string", "null"], "contentEncoding": "base64",
                "description": "the kernel as a 16-bit greyscale PNG scaled to its peak (null: none was estimated, "
                               "the photo being under `kernel_aware.min_side`)"},
        "psf_npy": {"type": ["string", "null"], "contentEncoding": "base64",
                    "description": "the kernel as a float32 .npy normalised to sum 1"},
        "psf_size": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 1}, "minItems": 2,
                     "maxItems": 2, "description": "[height, width] of the kernel, odd, centre pixel = origin"},
        "evidence": {"type": "object", "description": "why: support_px, crop_agreement, reblur_residual, "
                                                      "confidence, reason"},
        "seconds": {"type": "object", "additionalProperties": {"type": "number"},
                    "description": "time of each stage (estimate, the chosen candidate, total)"},
    },
}
HEALTH_SCHEMA = {
    "type": "object",
    "required": ["status", "ready", "error", "model", "model_source", "settings_source", "tiling", "limits",
                 "in_flight", "seconds_per_megapixel", "modes", "accepted_formats", "output_formats", "auth"],
    "properties": {
        "status": {"const": "ok"},
        "ready": {"type": "boolean", "description": "the model is loaded"},
        "error": {**_NULLABLE_STRING, "description": "the last model load error"},
        "model": {
            "type": ["object", "null"], "description": "the model served (null until loaded)",
            "required": ["name", "version", "alias", "load_seconds"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"}, "alias": {"type": "string"},
                           "load_seconds": {"type": "number"}, "architecture": _NULLABLE_STRING,
                           "run_id": _NULLABLE_STRING, "metrics": {"type": ["object", "null"]},
                           "weights_dtype": _NULLABLE_STRING, "exported_at": _NULLABLE_STRING},
        },
        "model_source": {"type": "string", "description": "the serving artifact folder or models:/ URI"},
        "settings_source": {"type": "string", "description": "where the serving settings were read"},
        "tiling": {"type": "object", "description": "default tiling",
                   "required": ["tile_size", "overlap", "batch_size"],
                   "properties": {name: {"type": "integer"} for name in ("tile_size", "overlap", "batch_size")}},
        "limits": {"type": "object", "description": "this worker's serving settings (params.yaml `serving`)",
                   "properties": {
                       **{name: {"type": "integer"} for name in ("max_pixels", "min_side", "max_side",
                                                                 "inference_slots", "max_waiting")},
                       **{name: {"type": "number"} for name in ("max_body_mb", "max_request_seconds")},
                       **{name: {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}
                          for name in ("tile_size_range", "overlap_range", "refiner_steps_range")},
                   }},
        "in_flight": {"type": "integer", "minimum": 0, "description": "requests admitted and not finished"},
        "seconds_per_megapixel": {"type": ["number", "null"], "description": "this worker's measured speed"},
        "modes": {"type": "object", "description": "restoration modes: the default (`?mode=` absent), those "
                                                   "available, why thorough is not, the kernel-aware settings",
                  "required": ["default", "available", "unavailable", "source", "kernel_aware"],
                  "properties": {"default": {"enum": list(MODES)},
                                 "available": {"type": "array", "items": {"enum": list(MODES)}},
                                 "unavailable": _NULLABLE_STRING, "source": {"type": "string"},
                                 "kernel_aware": {"type": ["object", "null"]}}},
        "admission": {"type": "object", "description": "the evidence admission decides from",
                      "properties": {
                          "speed": {"type": "object", "description": "the speed model behind `image_too_slow`"},
                          "memory": {"type": "object", "description": "the `serving.max_buffered_mb` budget",
                                     "properties": {
                                         **{name: {"type": "number"}
                                            for name in ("budget_mb", "used_mb", "bytes_per_pixel")},
                                         "receiving_bodies": {"type": "integer", "minimum": 0,
                                                              "description": "requests whose body is being read: "
                                                              "they hold only the bytes that arrived"}}},
                          "draining": {"type": "boolean", "description": "SIGTERM received: admitting nothing"},
                      }},
        "accepted_formats": {"type": "array", "items": {"type": "string"}},
        "output_formats": {"type": "array", "items": {"type": "string"}},
        "auth": {"enum": ["anonymous", "api_key"]},
    },
}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _bounded(bounds: tuple[int, int], default: int | None = None) -> dict:
    """An integer within ``bounds``; ``default`` (what the server uses without the parameter) only if inside them."""
    schema = {"type": "integer", "minimum": bounds[0], "maximum": bounds[1]}
    return schema if default is None or not bounds[0] <= default <= bounds[1] else {**schema, "default": default}


def deblur_operation(serving: ServingConfig, tiling: TilingConfig | None, modes=None) -> dict:
    image_types = [Image.MIME[fmt] for fmt in ACCEPTED_FORMATS]
    body_content = {media: {"schema": BINARY} for media in [*image_types, "application/octet-stream"]}
    body_content["multipart/form-data"] = {
        "schema": {"type": "object", "required": [UPLOAD_FIELD],
                   "properties": {UPLOAD_FIELD: {**BINARY, "description": "the image file"},
                                  PSF_FIELD: {**BINARY, "description": (
                                      "optional: a known blur kernel, a .npy 2-D float array or a greyscale PNG, "
                                      f"both sides odd and at most {MAX_PSF_SIDE} px, the centre pixel being the "
                                      "origin; the image is deconvolved with it (non-blind), whatever `mode` says")}}},
        "encoding": {UPLOAD_FIELD: {"contentType": ", ".join([*image_types, "application/octet-stream"])},
                     PSF_FIELD: {"contentType": "application/octet-stream, image/png"}},
    }
    default_mode = {"default": modes.default} if modes is not None else {}
    header = {"schema": {"type": "string"}, "required": True}
    return {
        "operationId": "deblur",
        "summary": "Deblur one image",
        "description": (
            f"The body is the image file ({', '.join(ACCEPTED_FORMATS)}; recognised by its content, whatever "
            f"the `Content-Type`), at most {serving.max_body_mb:g} MB, {serving.min_side} to {serving.max_side} "
            f"pixels a side and {serving.max_pixels} pixels in all; or a multipart form with the file in "
            f"`{UPLOAD_FIELD}`. The output format is `format`, else the first of "
            f"{', '.join(MEDIA_TYPES.values())} in `Accept` (q-values respected), else PNG."),
        "parameters": [
            _query("format", {"type": "string", "enum": sorted(OUTPUT_FORMATS)}, "output format"),
            _query("tile_size", _bounded(serving.tile_size_range, tiling and tiling.tile_size),
                   "tile side in pixels (`serving.tile_size_range`), rounded down to the model's size multiple"),
            _query("overlap", _bounded(serving.overlap_range, tiling and tiling.overlap),
                   "tile overlap in pixels (`serving.overlap_range`); `2*overlap` must be below `tile_size`"),
            _query("seed", _bounded((0, MAX_SEED)), "sampling seed: diffusion refiner models only (else 400)"),
            _query("steps", _bounded(serving.refiner_steps_range),
                   "sampling steps (`serving.refiner_steps_range`): diffusion refiner models only (else 400)"),
            _query("mode", {"type": "string", "enum": list(MODES), **default_mode},
                   "fast: the network only; thorough: estimate the blur kernel, deconvolve it and keep what the "
                   "evidence supports (slower; `X-Deblur-Chosen` says what was kept). Default: the model's "
                   "`kernel_aware.default_mode` (`GET /api/health` `modes.default`)"),
            _query("return_psf", {"type": "string", "enum": sorted(FLAGS)},
                   "1: answer `application/json` (`Restoration`) with the image and the blur kernel, base64; "
                   "thorough mode or a `psf` part only (else 400)"),
        ],
        "security": [{}, {"functionKey": []}, {"code": []}],
        "requestBody": {"required": True, "content": body_content},
        "responses": {"200": {
            "description": "the deblurred image, same width and height as the (EXIF-rotated) input; with "
                           "`return_psf=1`, JSON with that image and the blur kernel",
            "content": {**{media: {"schema": BINARY} for media in MEDIA_TYPES.values()},
                        "application/json": {"schema": {"$ref": "#/components/schemas/Restoration"}}},
            "headers": {
                "X-Model-Name": {**header, "description": "the registered model served"},
                "X-Model-Version": {**header, "description": "its version (`none` if unregistered)"},
                "X-Model-Alias": {**header, "description": "its alias, e.g. champion"},
                "X-Inference-Ms": {"required": True, "description": "model time of this request",
                                   "schema": {"type": "number", "minimum": 0}},
                "X-Image-Size": {"required": True, "description": "width x height computed",
                                 "schema": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"}},
                "X-Tile-Size": {"required": True, "description": "tile side used",
                                "schema": {"type": "integer", "minimum": 1}},
                "X-Overlap": {"required": True, "description": "tile overlap used",
                              "schema": {"type": "integer", "minimum": 0}},
                "X-Alpha": {"required": True, "description": "the input's alpha channel",
                            "schema": {"type": "string", "enum": ["none", "kept", "dropped"]}},
                "X-Seed": {"description": "sampling seed (diffusion refiner models only)",
                           "schema": {"type": "integer", "minimum": 0}},
                "X-Steps": {"description": "sampling steps (diffusion refiner models only)",
                            "schema": {"type": "integer", "minimum": 1}},
                "X-Deblur-Mode": {"required": True, "description": "what ran: fast, thorough, or psf (the `psf` "
                                                                   "part, non-blind)",
                                  "schema": {"type": "string", "enum": [*MODES, "psf"]}},
                "X-Deblur-Chosen": {"description": "thorough: the candidate kept; psf: `psf`",
                                    "schema": {"type": "string", "enum": [*CANDIDATES, "psf"]}},
                "X-Deblur-Psf-Size": {"description": "width x height of the kernel used (thorough: estimated)",
                                      "schema": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"}},
                "Server-Timing": {**header, "description": "queue, load, decode, infer (thorough: estimate too), "
                                                           "encode and total in ms"},
                "Content-Disposition": {**header, "description": 'inline; filename="deblurred.<ext>" (json with '
                                                                 '`return_psf=1`)'},
            },
        }},
    }


def health_operation(_serving: ServingConfig, _tiling: TilingConfig | None, _modes=None) -> dict:
    return {
        "operationId": "health",
        "summary": "Model, limits and load of this worker (never needs a key)",
        "responses": {"200": {"description": "the worker's state",
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}},
    }


def page_operation(operation_id: str) -> Callable[..., dict]:
    def build(_serving: ServingConfig, _tiling: TilingConfig | None, _modes=None) -> dict:
        return {
            "operationId": operation_id,
            "summary": "The web page: upload a photo, compare before and after (self-contained, no CDN)",
            "responses": {"200": {"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}}},
        }
    return build


OPERATIONS: dict[str, Callable[..., dict]] = {   # (serving, tiling, modes) -> the operation
    DEBLUR_ROUTE: deblur_operation,
    "GET /api/health": health_operation,
    "GET /": page_operation("page"),
    "GET /api/ui": page_operation("pageUnderApi"),
}
