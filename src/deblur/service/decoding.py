"""What a request asks for and the image it carries, checked before any model work.

Query parameters and the Accept header give the output format, tiling and sampling; the
body (raw image bytes, or the ``image`` file of a multipart form) is read with a size
limit, and the image header is probed against the pixel and side limits.
"""

from __future__ import annotations

import hmac
import io
from collections.abc import AsyncGenerator

from fastapi import Request
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from deblur.config import ServingConfig, TilingConfig
from deblur.service.errors import ApiError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")  # JPEG includes MPO (multi-picture JPEGs from cameras)
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
UPLOAD_FIELD = "image"
MAX_SEED = 2**63 - 1   # ?seed= bound, = deblur.diffusion.refiner.MAX_SEED (not imported: parsing needs no torch)

Image.init()  # register every Pillow plugin, so Image.open(formats=ACCEPTED_FORMATS) knows them all


def check_api_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("x-functions-key") or request.query_params.get("code") or ""
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "unauthorized", "this server needs an API key: send it in the x-functions-key "
                       "header or as ?code=")


def output_format(request: Request) -> str:
    """``?format=`` if given, else the first supported image type in Accept, else PNG."""
    asked = request.query_params.get("format")
    if asked is not None:
        fmt = OUTPUT_FORMATS.get(asked.strip().lower())
        if fmt is None:
            raise ApiError(400, "invalid_format", f"format={asked!r} is not supported; use png, jpeg or webp")
        return fmt
    by_media = {v: k for k, v in MEDIA_TYPES.items()}
    for media in accepted_media(request.headers.get("accept", "")):
        if media in by_media:
            return by_media[media]
    return "PNG"


def accepted_media(accept: str) -> list[str]:
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


def tiling_params(request: Request, serving: ServingConfig, default: TilingConfig) -> tuple[int, int]:
    tile_size = int_param(request, "tile_size", serving.tile_size_range, default.tile_size)
    overlap = int_param(request, "overlap", serving.overlap_range, default.overlap)
    if 2 * overlap >= tile_size:
        raise ApiError(400, "invalid_parameter", f"overlap={overlap} must be less than half of tile_size={tile_size}")
    return tile_size, overlap


def sampling_params(request: Request, serving: ServingConfig) -> dict[str, int]:
    """``?seed=`` and ``?steps=`` for a diffusion refiner (only those given; the model checks its kind)."""
    sampling = {}
    if request.query_params.get("seed") is not None:
        sampling["seed"] = int_param(request, "seed", (0, MAX_SEED), 0, source="")
    if request.query_params.get("steps") is not None:
        sampling["steps"] = int_param(request, "steps", serving.refiner_steps_range, 0,
                                      source="serving.refiner_steps_range")
    return sampling


def int_param(request: Request, name: str, bounds: tuple[int, int], default: int, source: str | None = None) -> int:
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


async def read_body(request: Request, serving: ServingConfig) -> bytes:
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


async def image_bytes(request: Request, body: bytes) -> bytes:
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


def probe(data: bytes, serving: ServingConfig) -> tuple[int, int]:
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
