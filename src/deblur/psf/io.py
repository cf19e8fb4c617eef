"""Reading, checking and writing point-spread functions (PSFs, blur kernels).

File convention (documentation/kernel_aware.md):
- ``.npy``: a 2-D array of non-negative finite weights (any real dtype).
- an image (PNG, or anything ``deblur.core.imageio`` reads): the grey levels are the weights. 8- and
  16-bit greyscale are read at full precision; colour images become their luminance
  (Rec. 709 weights of the stored values, no gamma decoding); alpha is ignored.
- Both sides odd, at most ``MAX_PSF_SIDE`` px; the centre pixel is the origin (a kernel is centred
  on its support box, as ``deblur.data.blur`` draws them). Weights are normalised to sum 1.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from deblur.core.errors import DeblurError
from deblur.core.files import atomic_write_bytes
from deblur.core.imageio import ImageError, decode_image

MAX_PSF_SIDE = 255
NPY_MAGIC = b"\x93NUMPY"
LUMINANCE = np.array([0.2126, 0.7152, 0.0722])            # Rec. 709
GREY_MODES = ("L", "I", "I;16", "I;16L", "I;16B", "F")    # read as stored, without the 8-bit conversion


class PsfError(DeblurError, ValueError):
    """A PSF that cannot be used; the message names the file and the problem."""


def load_psf(path: str | Path) -> np.ndarray:
    """The normalised float64 PSF stored in a ``.npy`` or image file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise PsfError(f"{path}: PSF file not found") from err
    except OSError as err:
        raise PsfError(f"{path}: cannot read the PSF file ({err.strerror})") from err
    return psf_from_bytes(data, str(path))


def psf_from_bytes(data: bytes, name: str) -> np.ndarray:
    """The normalised float64 PSF in ``data``: ``.npy`` or image bytes, told apart by content; ``name`` labels
    errors (an upload's file name)."""
    if not data:
        raise PsfError(f"{name}: empty PSF file")
    weights = _npy_weights(data, name) if data.startswith(NPY_MAGIC) else _image_weights(data, name)
    return validate_psf(weights, name)


def validate_psf(psf: np.ndarray, name: str = "psf") -> np.ndarray:
    """``psf`` checked (2-D, odd sides <= MAX_PSF_SIDE, finite, non-negative, positive sum) and normalised to sum 1."""
    psf = np.asarray(psf)
    if psf.ndim != 2:
        raise PsfError(f"{name}: a PSF must be a 2-D array, got shape {psf.shape}")
    if psf.dtype.kind not in "biuf":
        raise PsfError(f"{name}: a PSF must hold real numbers, got dtype {psf.dtype}")
    if psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
        raise PsfError(f"{name}: PSF shape {psf.shape} has an even side; sides must be odd, the centre pixel "
                       "being the origin (pad or crop the kernel around its centre)")
    if max(psf.shape) > MAX_PSF_SIDE:
        raise PsfError(f"{name}: PSF shape {psf.shape} exceeds the limit of {MAX_PSF_SIDE} px per side")
    psf = psf.astype(np.float64)
    if not np.all(np.isfinite(psf)):
        raise PsfError(f"{name}: PSF contains NaN or infinite values")
    if psf.min() < 0:
        raise PsfError(f"{name}: PSF has negative weights (min {psf.min():.3g}); weights must be >= 0")
    total = psf.sum()
    if total <= 0:
        raise PsfError(f"{name}: PSF sums to zero; it needs at least one positive weight")
    return psf / total


def psf_to_png_bytes(psf: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG of ``psf``, scaled so its largest weight is 65535."""
    psf = validate_psf(psf)
    levels = np.round(psf / psf.max() * 65535.0).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_psf(path: str | Path, psf: np.ndarray) -> None:
    """Write ``psf`` (normalised) as ``.npy`` (float32) or ``.png`` (16-bit), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, validate_psf(psf, str(path)).astype(np.float32))
        data = buffer.getvalue()
    elif suffix == ".png":
        data = psf_to_png_bytes(validate_psf(psf, str(path)))
    else:
        raise PsfError(f"{path}: a PSF is written as .npy or .png, not {suffix or 'a file without suffix'}")
    atomic_write_bytes(path, data)


def _npy_weights(data: bytes, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:   # object arrays, truncated or corrupt files
        raise PsfError(f"{name}: not a readable .npy array ({err})") from err


def _image_weights(data: bytes, name: str) -> np.ndarray:
    """Grey levels of a PSF picture: greyscale at its stored precision, colour as luminance."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode in GREY_MODES:
                img.load()
                return np.asarray(img, dtype=np.float64)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        pass   # decode_image below names the problem
    try:
        rgb = decode_image(data, name=name).rgb
    except ImageError as err:
        raise PsfError(f"{err} (expected a .npy array or a greyscale image)") from err
    return rgb.astype(np.float64) @ LUMINANCE
