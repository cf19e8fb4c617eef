"""A LoRA adapter as a registered MLflow pyfunc: only the adapter files are logged; loading fetches
the base version from the registry and merges the adapter in (contract: ``deblur.tracking.pyfunc``)."""

from __future__ import annotations

import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from deblur.core.config import TilingConfig
from deblur.models.checkpoint_file import load_checkpoint
from deblur.models.lora import BASE_FILE, CONFIG_FILE, WEIGHTS_FILE
from deblur.models.lora_checkpoints import adapter_from_checkpoint
from deblur.tracking.pyfunc import IMAGE_COLUMN, PIP_REQUIREMENTS, SIGNATURE, DeblurPyfunc, example_png_base64
from deblur.tracking.registry_io import load_adapter_model
from deblur.tracking.runs import _mlflow


with warnings.catch_warnings():   # MLflow suggests type hints on predict(); the signature is explicit
    warnings.simplefilter("ignore", UserWarning)

    class LoraAdapterPyfunc(DeblurPyfunc):
        """A registered adapter as an MLflow pyfunc with ``deblur.tracking.pyfunc``'s contract: its
        artifacts are the adapter files; loading fetches the base version from the registry
        (``MLFLOW_TRACKING_URI``) and merges the adapter into it."""

        def load_context(self, context) -> None:
            config = context.model_config or {}
            self.model, self.base = load_adapter_model(Path(context.artifacts[CONFIG_FILE]).parent)
            self.tiling = TilingConfig.model_validate(config["tiling"])
            self.max_pixels = config.get("max_pixels")


def log_adapter_model(checkpoint: str | Path, tiling, name: str = "model",
                      max_pixels: int | None = None) -> tuple[str, dict]:
    """Log only the adapter of a LoRA checkpoint as a pyfunc model in the active run; returns
    its model URI and the base reference (for the version's tags)."""
    _mlflow()
    ckpt = load_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = adapter_from_checkpoint(ckpt, Path(tmp) / "adapter")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(Path(__file__).resolve().with_name("lora_pyfunc_model.py")),   # from code
                artifacts={f: str(adapter_dir / f) for f in (CONFIG_FILE, WEIGHTS_FILE, BASE_FILE)},
                code_paths=[str(Path(__file__).resolve().parents[1])],   # the deblur package
                signature=SIGNATURE,
                input_example=pd.DataFrame({IMAGE_COLUMN: [example_png_base64()]}),
                model_config={"tiling": tiling.model_dump(), "max_pixels": max_pixels,
                              "base_model_uri": ckpt["lora"]["base"]["uri"]},
                pip_requirements=[*PIP_REQUIREMENTS, f"peft=={version('peft')}", f"safetensors=={version('safetensors')}"],
            )
    return info.model_uri, ckpt["lora"]["base"]
