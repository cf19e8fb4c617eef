"""The MLflow pyfunc flavour of a deblur model; the contract is documentation/model_contract.md.

Inputs (one call):
- encoded images: a 1-D array of base64 strings (or raw bytes) of PNG/JPEG/WebP/TIFF/BMP/GIF files,
  e.g. a DataFrame with one column ``image``; returns a DataFrame with a column ``image`` of
  base64 PNGs, one row per input, alpha kept.
- one image as an integer array with values 0..255: (H, W, 3) RGB, (H, W) or (H, W, 1)
  grayscale (replicated to RGB), (H, W, 4) RGBA (alpha passed through); returns uint8
  (H, W, 3), or (H, W, 4) for RGBA.
Floats, values outside 0..255 and other shapes are refused with a message that says what to send.

MLflow's schema enforcement cannot say "a string column or a uint8 image", so the input
signature is a 1-D object tensor (which lets both through) and ``predict`` enforces the rest.
The model is logged from code (deblur/tracking/pyfunc_model.py), the checkpoint as an artifact, the
tile settings in ``model_config``; ``params={"tile_size": .., "overlap": ..}`` overrides them per call.

Kernel-aware restoration (documentation/kernel_aware.md): ``params={"mode": "thorough"}`` estimates
the blur kernel of each image, deconvolves it and keeps what the evidence supports (``"fast"``: the
network only; ``""``: the model's default, ``kernel_aware.default_mode`` when it was logged).
``params={"psf": <base64 .npy (2-D float) or grayscale PNG>}`` (odd-sized, centre = origin): the
images of the call are deconvolved with that PSF (non-blind) instead.
"""

from __future__ import annotations

import base64
import binascii
import warnings
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
from pydantic import ValidationError

from deblur.core.config import KernelAwareConfig, TilingConfig
from deblur.core.imageio import ACCEPTED_FORMATS_TEXT, ImageError, decode_image, encode_image
from deblur.inference.tiling import deblur_array
from deblur.models.build import model_from_checkpoint
from deblur.tracking import models_uri  # noqa: F401  (a diffusion predictor may be a models:/ URI)
from deblur.psf.io import PsfError, psf_from_bytes
from deblur.psf.restore import restore_thorough, restore_with_psf
from deblur.tracking.runs import _mlflow

IMAGE_COLUMN = "image"
MODES = ("fast", "thorough")
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
    params=ParamSchema([ParamSpec("tile_size", "long", 0), ParamSpec("overlap", "long", -1),
                        ParamSpec("mode", "string", ""), ParamSpec("psf", "string", "")]),
)
MODEL_CODE = Path(__file__).resolve().parent / "pyfunc_model.py"
WHAT_TO_SEND = ("send base64 PNG/JPEG/WebP strings (a column 'image') or one image as uint8 values 0..255 "
                "of shape (H, W, 3), (H, W), (H, W, 1) or (H, W, 4)")
# Exact versions this package was tested with; torch from PyTorch's CPU index, as in function_app/requirements.txt.
PIP_REQUIREMENTS = [
    "--extra-index-url https://download.pytorch.org/whl/cpu",
    "torch==2.13.0",
    "mlflow==3.17.2",
    "numpy==2.4.6",
    "pandas==3.1.1",
    "pillow==13.0.0",
    "pydantic==2.14.3",
    "PyYAML==6.0.3",
    "scipy==1.17.1",
    "opencv-python-headless==5.0.0.93",
    "tqdm==4.70.1",
]


def contract_error(message: str) -> MlflowException:
    """An input that breaks the contract: HTTP 400 from ``mlflow models serve``, the message says what to send."""
    return MlflowException.invalid_parameter_value(message)


class DeblurPyfunc(mlflow.pyfunc.PythonModel):
    """Wraps a deblur checkpoint (artifact ``checkpoint``) for ``mlflow.pyfunc``."""

    kernel_aware = None   # KernelAwareConfig from model_config; None (fast mode only) for subclasses that set none

    def load_context(self, context) -> None:
        self.model = model_from_checkpoint(context.artifacts["checkpoint"])
        config = context.model_config or {}
        self.tiling = TilingConfig.model_validate(config["tiling"])
        self.max_pixels = config.get("max_pixels")
        settings = config.get("kernel_aware")   # None: logged before kernel-aware restoration existed
        self.kernel_aware = KernelAwareConfig.model_validate(settings) if settings else None

    def predict(self, context, model_input, params=None):
        params = params or {}
        tiling = self._tiling_for(params)
        default_mode = self.kernel_aware.default_mode if self.kernel_aware else "fast"
        restore = self._restorer(tiling, params.get("mode") or default_mode)
        if params.get("psf"):
            restore = self._with_psf(params["psf"])
        if hasattr(model_input, "columns") and IMAGE_COLUMN in model_input.columns:
            model_input = model_input[IMAGE_COLUMN]
        data = model_input.to_numpy().ravel() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
        if data.ndim == 1 and data.size and all(isinstance(v, (str, bytes)) for v in data):
            return self._predict_encoded(data, restore)
        rgb, alpha = image_from_array(data, self.max_pixels)
        sharp = restore(rgb)
        return sharp if alpha is None else np.concatenate([sharp, alpha[..., None]], axis=2)

    def _restorer(self, tiling, mode: str):
        """uint8 RGB -> uint8 RGB in ``mode``: the network alone, or thorough kernel-aware restoration."""
        if mode not in MODES:
            raise contract_error(f"params mode: {mode!r} is not one of {', '.join(MODES)}")

        def network(rgb):
            return deblur_array(self.model, rgb, tiling)

        if mode == "fast":
            return network
        if self.kernel_aware is None:
            raise contract_error("params mode: this model version was logged without kernel-aware settings; "
                                 "register it again (dvc repro) for mode 'thorough', or send mode 'fast'")
        return lambda rgb: restore_thorough(rgb, network, self.kernel_aware)[0].image

    @staticmethod
    def _with_psf(encoded: str):
        """Non-blind restoration with the caller's PSF (params ``psf``)."""
        try:
            psf = psf_from_bytes(_b64decode(encoded, "params psf"), name="params psf")
        except PsfError as err:
            raise contract_error(f"{err}; send a base64 .npy (2-D float) or grayscale PNG, odd-sized") from err
        return lambda rgb: restore_with_psf(rgb, psf)

    def _predict_encoded(self, items, restore):
        restored = []
        for number, item in enumerate(items):
            label = f"image {number}" if len(items) > 1 else "the image"
            try:
                decoded = decode_image(_b64decode(item, label), name=label, max_pixels=self.max_pixels)
            except ImageError as err:
                raise contract_error(f"{err}; send a complete {ACCEPTED_FORMATS_TEXT} file, base64-encoded") from err
            sharp = restore(decoded.rgb)
            restored.append(base64.b64encode(encode_image(sharp, "PNG", alpha=decoded.alpha)).decode("ascii"))
        return pd.DataFrame({IMAGE_COLUMN: restored})

    def _tiling_for(self, params: dict):
        """Logged tile settings, with per-call overrides (tile_size > 0, overlap >= 0) validated."""
        update = {}
        if int(params.get("tile_size", 0)) > 0:
            update["tile_size"] = int(params["tile_size"])
        if int(params.get("overlap", -1)) >= 0:
            update["overlap"] = int(params["overlap"])
        try:
            return TilingConfig.model_validate({**self.tiling.model_dump(), **update})
        except ValidationError as err:
            raise contract_error(f"params tile_size/overlap: {err.errors()[0]['msg']}") from err


def _b64decode(item: str | bytes, label: str) -> bytes:
    """Raw bytes pass through; strings are base64, optionally as a ``data:image/...;base64,`` URL."""
    if isinstance(item, bytes):
        return item
    text = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise contract_error(f"{label}: not valid base64 ({err}); {WHAT_TO_SEND}") from err


def image_from_array(data: np.ndarray, max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 RGB (H, W, 3) and the alpha plane (or None) of an image array, by the rules of the module docstring."""
    if data.size == 0:
        raise contract_error(f"got no pixels (an empty array of shape {data.shape}); {WHAT_TO_SEND}")
    if data.dtype == object:  # JSON numbers as MLflow's serving parses them
        try:
            data = np.array(data.tolist())
        except ValueError as err:
            raise contract_error(f"the array is ragged or mixed ({err}); {WHAT_TO_SEND}") from err
    if data.dtype.kind == "f":
        low, high = (float(np.nanmin(data)), float(np.nanmax(data))) if data.size else (0.0, 0.0)
        raise contract_error(
            f"got floating-point pixel values ({data.dtype}, {low:.4g}..{high:.4g}); {WHAT_TO_SEND}. "
            "Floats in [0, 1]: send round(x * 255) as integers, or encode the image as PNG")
    if data.dtype.kind not in "iu":
        raise contract_error(f"got an array of {data.dtype}; {WHAT_TO_SEND}")
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3 or data.shape[2] not in (1, 3, 4) or data.shape[0] == 0 or data.shape[1] == 0:
        raise contract_error(f"got an array of shape {data.shape}; {WHAT_TO_SEND}")
    low, high = int(data.min()), int(data.max())
    if low < 0 or high > 255:
        raise contract_error(f"pixel values {low}..{high} are outside 0..255; {WHAT_TO_SEND} "
                             "(16-bit images: send a 16-bit PNG, it is scaled to 8 bits)")
    height, width = data.shape[:2]
    if max_pixels is not None and height * width > max_pixels:
        raise contract_error(f"{width}x{height} = {height * width} pixels exceeds the limit of {max_pixels}")
    data = data.astype(np.uint8)
    if data.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(data, 3, axis=2)), None
    if data.shape[2] == 4:
        return np.ascontiguousarray(data[..., :3]), np.ascontiguousarray(data[..., 3])
    return np.ascontiguousarray(data), None


def example_png_base64(size: int = 16) -> str:
    """A small deterministic base64 PNG: the logged input example."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // (size - 1), y * 255 // (size - 1), (x + y) * 255 // (2 * size - 2)], axis=2)
    return base64.b64encode(encode_image(rgb.astype(np.uint8), "PNG")).decode("ascii")


def log_deblur_model(checkpoint: str | Path, tiling, name: str = "model", max_pixels: int | None = None,
                     registered_model_name: str | None = None, kernel_aware=None) -> str:
    """Log a checkpoint with its tile settings (and ``kernel_aware`` settings: the thorough mode and the
    default mode) as a pyfunc model (from code) in the active run; returns its model URI."""
    _mlflow()
    with warnings.catch_warnings():
        # MLflow suggests type hints; the signature above is explicit and predict() enforces the contract
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(__file__).resolve().parents[1])],   # the deblur package
            signature=SIGNATURE,
            input_example=pd.DataFrame({IMAGE_COLUMN: [example_png_base64()]}),
            model_config={"tiling": tiling.model_dump(), "max_pixels": max_pixels,
                          **({"kernel_aware": kernel_aware.model_dump()} if kernel_aware is not None else {})},
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=registered_model_name,
        )
    return info.model_uri
