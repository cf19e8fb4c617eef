"""The MLflow pyfunc flavour of a deblur model.

Contract: ``predict(image)`` takes one RGB image as a uint8 array of shape (H, W, 3), any
H and W, and returns the deblurred image with the same shape and dtype. Inference is
the tiled, feathered inference of ``deblur.tiling`` with the tile settings the model was
logged with; ``params={"tile_size": .., "overlap": ..}`` overrides them per call.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import mlflow.pyfunc
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
    outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
    params=ParamSchema([ParamSpec("tile_size", "long", 0), ParamSpec("overlap", "long", -1)]),
)


class DeblurPyfunc(mlflow.pyfunc.PythonModel):
    """Wraps a deblur checkpoint (artifact ``checkpoint``) for ``mlflow.pyfunc``."""

    def load_context(self, context) -> None:
        from deblur.checkpoints import model_from_checkpoint
        from deblur.config import TilingConfig

        self.model = model_from_checkpoint(context.artifacts["checkpoint"])
        self.tiling = TilingConfig.model_validate(context.model_config["tiling"])

    def predict(self, context, model_input, params=None):
        from deblur.tiling import deblur_array

        image = np.asarray(model_input)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected one RGB image of shape (H, W, 3), got shape {image.shape}")
        if image.dtype != np.uint8:
            if not np.isfinite(image).all():
                raise ValueError("image holds NaN or infinite values")
            image = np.clip(np.round(image), 0, 255).astype(np.uint8)
        tiling = self._tiling_for(params or {})
        return deblur_array(self.model, image, tiling)

    def _tiling_for(self, params: dict):
        """Logged tile settings, with per-call overrides (tile_size > 0, overlap >= 0) validated."""
        from deblur.config import TilingConfig

        update = {}
        if int(params.get("tile_size", 0)) > 0:
            update["tile_size"] = int(params["tile_size"])
        if int(params.get("overlap", -1)) >= 0:
            update["overlap"] = int(params["overlap"])
        return TilingConfig.model_validate({**self.tiling.model_dump(), **update})


PIP_REQUIREMENTS = ["torch", "numpy", "pillow", "scikit-image", "pydantic", "pyyaml", "tqdm", "mlflow"]


def log_deblur_model(checkpoint: str | Path, tiling, name: str = "model") -> str:
    """Log a checkpoint with its tile settings as a pyfunc model in the active run; returns its model URI."""
    from deblur.tracking import _mlflow

    _mlflow()
    with warnings.catch_warnings():
        # MLflow nags about type hints and input examples; the tensor signature above is explicit
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=DeblurPyfunc(),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(__file__).resolve().parent)],
            signature=SIGNATURE,
            model_config={"tiling": tiling.model_dump()},
            pip_requirements=PIP_REQUIREMENTS,
        )
    return info.model_uri
