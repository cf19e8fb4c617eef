"""What a request asks for and the image it carries, checked before any model work.

Query parameters and the Accept header give the output format, tiling, sampling and the
restoration mode; the body (raw image bytes, or the ``image`` part of a multipart form, with an
optional ``psf`` part: a known blur kernel) is read with a size limit and a time limit, and the
image header is probed against the pixel and side limits.
"""

from __future__ import annotations

import asyncio
import hmac
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

from fastapi import Request
from PIL import Image, UnidentifiedImageError
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from deblur.core.config import ServingConfig, TilingConfig
from deblur.core.imageio import ACCEPTED_FORMATS, ACCEPTED_FORMATS_TEXT
from deblur.core.config import overlap_fits
from deblur.psf.io import MAX_PSF_SIDE, NPY_MAGIC, PsfError, psf_from_bytes
from deblur.service.errors import ApiError

if TYPE_CHECKING:
    import numpy as np

    from deblur.service.admission import Reservation

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
UPLOAD_FIELD = "image"
PSF_FIELD = "psf"                 # optional multipart part: a known blur kernel (.npy or greyscale PNG)
MODES = ("fast", "thorough")      # ?mode=: the network only, or kernel-aware restoration (deblur.psf.restore)
FLAGS = {"1": True, "true": True, "0": False, "false": False}   # ?return_psf=
KEY_HEADER = "x-functions-key"   # the API key, as Azure Functions names it
KEY_PARAMETER = "code"            # ... or in the query, spelled exactly so
MAX_SEED = 2**63 - 1   # ?seed= bound, = deblur.models.diffusion.refiner.MAX_SEED (not imported: parsing needs no torch)
# How each accepted format starts (Pillow's own checks): a body that starts like one but that
# Pillow cannot open is a corrupt image (400), not an unsupported one (415).
SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*", b"II\x00*", b"MM*\x00", b"II+\x00", b"MM\x00+"),
}
# Multipart limits: a form carries one image and perhaps a few small fields.
MAX_FORM_PARTS = 16
MAX_PART_HEADERS = 8            # header lines per part
MAX_PART_HEADER_BYTES = 8192    # bytes per part header line
MAX_BOUNDARY_LENGTH = 70        # RFC 2046
BODY_IDLE_FRACTION = 0.25       # a body may pause at most this fraction of serving.body_timeout_seconds

Image.init()  # register every Pillow plugin, so Image.open(formats=ACCEPTED_FORMATS) knows them all


def check_api_key(request: Request, api_key: str | None) -> None:
    """The key must come in the ``x-functions-key`` header or as ``?code=``, spelled exactly as Azure does.

    Starlette decodes parameter names, so ``?%63ode=`` or ``?CODE=`` would otherwise read as the key while
    the log redaction (deblur.service.logs) and Azure's own key check see another name: any such
    spelling is refused with 401, as is a second ``code``.
    """
    if api_key is None:
        return
    in_query = query_key(request)   # first: a misnamed key is refused even beside a right header
    given = request.headers.get(KEY_HEADER) or in_query or ""
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "unauthorized", f"this server needs an API key: send it in the {KEY_HEADER} "
                       f"header or as ?{KEY_PARAMETER}=")


def query_key(request: Request) -> str | None:
    """The value of the one query parameter named exactly ``code`` (None if there is none).

    401 ``unauthorized`` for a parameter whose name only decodes or case-folds to ``code``
    (``%63ode``, ``CODE``, ``c%6fde``) and for more than one ``code``: the key has one name.
    """
    values = []
    for name, value in raw_query_items(request.scope.get("query_string", b"")):
        if name == KEY_PARAMETER:
            values.append(unquote_plus(value))
        elif unquote_plus(name).strip().lower() == KEY_PARAMETER:
            shown = name if len(name) <= 40 else name[:40] + "..."
            raise ApiError(401, "unauthorized", f"the query parameter {shown!r} is not how the key is sent: name it "
                           f"'{KEY_PARAMETER}' exactly (lower case, not percent-encoded), or send the key in the "
                           f"{KEY_HEADER} header")
    if len(values) > 1:
        raise ApiError(401, "unauthorized", f"the query has {len(values)} '{KEY_PARAMETER}' parameters: send the "
                       "key once")
    return values[0] if values else None


def exact_query_key(request: Request) -> str | None:
    """``query_key`` without the refusals: the exactly named ``code``, else None (for pages that pass it on)."""
    try:
        return query_key(request)
    except ApiError:
        return None


def raw_query_items(query_string: bytes) -> list[tuple[str, str]]:
    """``(name, value)`` of each ``&``-separated query parameter as sent: nothing decoded."""
    text = query_string.decode("latin-1")
    return [(piece.partition("=")[0], piece.partition("=")[2]) for piece in text.split("&") if piece]


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
    if not overlap_fits(tile_size, overlap):
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


def mode_param(request: Request) -> str | None:
    """``?mode=fast|thorough``, or None when absent (the model's default then applies)."""
    raw = request.query_params.get("mode")
    if raw is None:
        return None
    mode = raw.strip().lower()
    if mode not in MODES:
        raise ApiError(400, "invalid_parameter", f"mode={raw!r} is not one of {', '.join(MODES)} (fast: the network "
                       "only; thorough: estimate the blur kernel, deconvolve it and keep what the evidence supports)")
    return mode


def return_psf_param(request: Request) -> bool:
    """``?return_psf=1|0|true|false`` (default 0): answer JSON with the image and the blur kernel."""
    raw = request.query_params.get("return_psf")
    if raw is None:
        return False
    flag = FLAGS.get(raw.strip().lower())
    if flag is None:
        raise ApiError(400, "invalid_parameter", f"return_psf={raw!r} must be 1, 0, true or false")
    return flag


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


async def read_body(request: Request, serving: ServingConfig, reservation: Reservation | None = None) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``max_body_mb``.

    The whole body must arrive within ``serving.body_timeout_seconds`` and no pause between two
    chunks may last longer than ``BODY_IDLE_FRACTION`` of it, else 408 and the connection is
    closed. With a ``reservation``, the bytes read so far are held in it as they arrive (503 when
    the worker's ``serving.max_buffered_mb`` budget has no room).
    """
    limit = int(serving.max_body_mb * 1024 * 1024)
    too_large = ApiError(413, "payload_too_large", f"the request body exceeds the {serving.max_body_mb:g} MB limit "
                         "(serving.max_body_mb); send a smaller file, e.g. a JPEG or a downscaled image")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad_request", f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise too_large
    loop = asyncio.get_running_loop()
    whole, idle = serving.body_timeout_seconds, serving.body_timeout_seconds * BODY_IDLE_FRACTION
    deadline = loop.time() + whole
    chunks = request.stream().__aiter__()
    body = bytearray()
    while True:
        pause_ends = loop.time() + idle
        try:
            async with asyncio.timeout_at(min(deadline, pause_ends)):
                chunk = await anext(chunks, None)
        except TimeoutError:
            raise body_too_slow(len(body), whole, idle, paused=pause_ends < deadline) from None
        except ClientDisconnect:   # nobody will read the answer; it only keeps a traceback out of the log
            raise ApiError(400, "bad_request", f"the client closed the connection after {len(body)} bytes of the "
                           "body") from None
        if chunk is None:
            break
        body += chunk
        if len(body) > limit:
            raise too_large
        if reservation is not None:
            reservation.cover(len(body))
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty: send the image bytes, or a multipart "
                       f"form with the file in the field '{UPLOAD_FIELD}'")
    return bytes(body)


def body_too_slow(received: int, whole: float, idle: float, paused: bool) -> ApiError:
    """408 ``request_timeout``, closing the connection (the rest of the body is never read)."""
    if paused:
        what = (f"no part of the body arrived for {idle:g} s ({BODY_IDLE_FRACTION:g} of "
                f"serving.body_timeout_seconds = {whole:g} s)")
    else:
        what = f"the body did not arrive within serving.body_timeout_seconds = {whole:g} s"
    return ApiError(408, "request_timeout", f"{what}; {received} bytes were received. Send the request again "
                    "over a faster connection, or a smaller file", headers={"Connection": "close"})


@dataclass(frozen=True)
class Upload:
    """What a request carries: the image file, and a known blur kernel's file (the multipart ``psf`` part)."""

    image: bytes
    psf: bytes | None = None
    psf_name: str = PSF_FIELD   # the part's file name, for error messages


async def upload_parts(request: Request, body: bytes) -> Upload:
    """The image in ``body`` (the body itself, or the ``image`` part of a multipart form) and the ``psf`` part."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        return Upload(body)
    form = read_form(body, content_type, (UPLOAD_FIELD, PSF_FIELD))
    image = form.field_data(UPLOAD_FIELD)
    psf = form.data.get(PSF_FIELD)
    return Upload(image, None if psf is None else b"".join(psf), form.filenames.get(PSF_FIELD) or PSF_FIELD)


async def image_bytes(request: Request, body: bytes) -> bytes:
    """The image in ``body``: the body itself, or the ``image`` part of a multipart form."""
    return (await upload_parts(request, body)).image


def read_psf(data: bytes, name: str) -> np.ndarray:
    """The normalised PSF in an uploaded ``psf`` part; 400 ``invalid_psf`` naming the problem.

    An image's size is read from its header first, so a small file that decodes to a huge picture
    costs nothing; ``.npy`` data is bounded by the body limit."""
    label = f"the '{PSF_FIELD}' part ({name})" if name != PSF_FIELD else f"the '{PSF_FIELD}' part"
    how = ("; send a .npy 2-D float array or a greyscale PNG, both sides odd and at most "
           f"{MAX_PSF_SIDE} px, the centre pixel being the origin")
    if data and not data.startswith(NPY_MAGIC):
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            width = height = 0   # psf_from_bytes names the problem
        if max(width, height) > MAX_PSF_SIDE:
            raise ApiError(400, "invalid_psf", f"{label}: a {width}x{height} picture exceeds the limit of "
                           f"{MAX_PSF_SIDE} px per side{how}")
    try:
        return psf_from_bytes(data, label)
    except PsfError as err:
        raise ApiError(400, "invalid_psf", f"{err}{how}") from err


def invalid_form(why: str) -> ApiError:
    return ApiError(400, "invalid_multipart", f"the multipart form could not be parsed: {why}")


def form_field(body: bytes, content_type: str, field: str) -> bytes:
    """The data of the one part named ``field`` of the multipart/form-data ``body``."""
    return read_form(body, content_type, (field,)).field_data(field)


def read_form(body: bytes, content_type: str, fields: tuple[str, ...]) -> FormReader:
    """The parts named in ``fields`` (at most one each) of the multipart/form-data ``body``; others are skipped."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if not 0 < len(boundary) <= MAX_BOUNDARY_LENGTH:
        raise invalid_form("the Content-Type needs a boundary parameter of 1 to "
                           f"{MAX_BOUNDARY_LENGTH} characters, e.g. 'multipart/form-data; boundary=XyZ'")
    form = FormReader(fields)
    parser = MultipartParser(boundary, form.callbacks(), max_header_count=MAX_PART_HEADERS,
                             max_header_size=MAX_PART_HEADER_BYTES)
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as err:
        raise invalid_form(f"{err} (python-multipart)") from err
    if not form.ended:
        raise invalid_form("the body ends before the form's closing boundary: it is truncated")
    return form


class FormReader:
    """Callbacks for python-multipart's streaming parser: keeps the data of the parts named in ``fields``."""

    def __init__(self, fields: str | tuple[str, ...]) -> None:
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.parts = 0
        self.data: dict[str, list[bytes]] = {}   # each kept field's pieces, once its part has begun
        self.filenames: dict[str, str] = {}
        self.ended = False
        self._keeping: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._name: list[bytes] = []
        self._value: list[bytes] = []

    def field_data(self, field: str) -> bytes:
        """The bytes of the part ``field``: 400 ``missing_field`` without one, ``empty_body`` when it is empty."""
        if field not in self.data:
            raise ApiError(400, "missing_field", f"the multipart form has no part named '{field}': send the image "
                           f"file in the field '{field}', e.g. curl -F {field}=@photo.jpg")
        data = b"".join(self.data[field])
        if not data:
            raise ApiError(400, "empty_body", f"the file in the field '{field}' is empty")
        return data

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_name,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end, "on_end": self.end}

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_FORM_PARTS:
            raise invalid_form(f"it has more than {MAX_FORM_PARTS} parts")
        self._headers = {}

    def header_name(self, data: bytes, start: int, end: int) -> None:
        self._name.append(data[start:end])

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value.append(data[start:end])

    def header_end(self) -> None:
        self._headers[b"".join(self._name).strip().lower()] = b"".join(self._value).strip()
        self._name, self._value = [], []

    def headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition")
        if disposition is None:
            raise invalid_form(f"part {self.parts} has no Content-Disposition header")
        kind, params = parse_options_header(disposition)
        if kind != b"form-data" or b"name" not in params:
            raise invalid_form(f"part {self.parts} is not 'Content-Disposition: form-data; name=...'")
        name = params[b"name"].decode("utf-8", "replace")
        self._keeping = name if name in self.fields else None
        if self._keeping is not None:
            if name in self.data:
                what = "one image" if name == UPLOAD_FIELD else f"one '{name}' file"
                raise ApiError(400, "duplicate_field", f"the multipart form has more than one part named "
                               f"'{name}': send {what} per request")
            self.data[name] = []
            filename = params.get(b"filename")
            if filename:
                self.filenames[name] = filename.decode("utf-8", "replace")[:100]

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._keeping is not None:
            self.data[self._keeping].append(data[start:end])

    def part_end(self) -> None:
        self._keeping = None

    def end(self) -> None:
        self.ended = True


def probe(data: bytes, serving: ServingConfig) -> tuple[int, int]:
    """Width and height from the image header, checked against the limits before any decoding."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            width, height = img.size
    except UnidentifiedImageError as err:
        fmt = format_by_signature(data)
        if fmt is not None:
            raise ApiError(400, "invalid_image", f"the body starts like a {fmt} file but its header cannot be read: "
                           "it is corrupt or truncated; send the complete file") from err
        raise ApiError(415, "unsupported_media_type", "the body is not an image in a supported format "
                       f"({ACCEPTED_FORMATS_TEXT})") from err
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


def format_by_signature(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` starts with, if any."""
    for fmt, prefixes in SIGNATURES.items():
        if data.startswith(prefixes):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None
