"""Reading any common image into 8-bit RGB, and writing PNGs atomically.

Conversion rules (documented in documentation/data.md):
- EXIF orientation is applied, then the tag is gone.
- Grayscale (L, 1, I;16, I, F) is replicated to three channels.
- Palette (P) is expanded through its palette; CMYK and YCbCr go through Pillow's RGB conversion.
- 16-bit samples are scaled to 8 bits as round(v / 257); float images are clipped to [0, 1].
- Alpha (RGBA, LA, PA) is split off: the RGB channels are kept unchanged and the alpha
  plane is returned beside them, so callers can re-attach or drop it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deblur.core.errors import DeblurError
from deblur.core.files import write_atomically

# The image formats every entry point accepts, in one list: the HTTP API (415 for others), the
# pyfunc, ``deblur predict`` and ingest (by suffix). Pillow's names; JPEG includes MPO (multi-picture
# JPEGs from cameras); of a GIF or a multi-page TIFF the first frame is used.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")
_SUFFIXES = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",), "TIFF": (".tif", ".tiff"),
             "BMP": (".bmp",), "GIF": (".gif",)}
IMAGE_SUFFIXES = tuple(suffix for fmt in ACCEPTED_FORMATS for suffix in _SUFFIXES[fmt])
_SPELLED = [{"WEBP": "WebP"}.get(fmt, fmt) for fmt in ACCEPTED_FORMATS]
ACCEPTED_FORMATS_TEXT = f"{', '.join(_SPELLED[:-1])} or {_SPELLED[-1]}"   # "JPEG, PNG, WebP, TIFF, BMP or GIF"


class ImageError(DeblurError, ValueError):
    """An image could not be used; the message names the image and the problem."""


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray            # HxWx3 uint8
    alpha: np.ndarray | None   # HxW uint8 or None
    source_mode: str           # Pillow mode before conversion
    format: str | None         # JPEG, PNG, ...


def decode_image(data: bytes | str | Path, *, name: str | None = None, max_pixels: int | None = None) -> DecodedImage:
    """Decode a file path or bytes into 8-bit RGB (+ alpha), raising ImageError on bad input."""
    label = name or (str(data) if isinstance(data, (str, Path)) else "upload")
    if isinstance(data, (bytes, bytearray)) and len(data) == 0:
        raise ImageError(f"{label}: empty image data")
    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        with Image.open(source, formats=ACCEPTED_FORMATS) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(
                    f"{label}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                )
            fmt = img.format
            img.load()
            img = ImageOps.exif_transpose(img)
            mode = img.mode
            rgb, alpha = _to_rgb8(img)
    except ImageError:
        raise
    except FileNotFoundError as err:
        raise ImageError(f"{label}: file not found") from err
    except UnidentifiedImageError as err:
        raise ImageError(f"{label}: not a recognised image format") from err
    except Image.DecompressionBombError as err:
        raise ImageError(f"{label}: rejected as a decompression bomb ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{label}: corrupt or truncated image ({err})") from err
    return DecodedImage(rgb=rgb, alpha=alpha, source_mode=mode, format=fmt)


def read_rgb(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB of an image file (alpha dropped)."""
    return decode_image(path, max_pixels=max_pixels).rgb


def _to_rgb8(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    mode = img.mode
    alpha = None
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3].copy()
        return np.ascontiguousarray(np.asarray(rgba)[..., :3]), alpha
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        if mode == "I" and arr.max(initial=0) <= 255:
            gray = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            gray = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), None
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        gray = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), None
    return np.ascontiguousarray(np.asarray(img.convert("RGB"))), None


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write uint8 HxWx3 as PNG atomically (temp file + rename)."""
    write_atomically(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


def encode_image(rgb: np.ndarray, fmt: str = "PNG", alpha: np.ndarray | None = None, quality: int = 95) -> bytes:
    """Encode uint8 RGB (optionally with alpha re-attached) as PNG, JPEG or WEBP bytes."""
    fmt = fmt.upper()
    img = Image.fromarray(rgb)
    if alpha is not None and fmt in ("PNG", "WEBP"):
        img.putalpha(Image.fromarray(alpha))
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()
