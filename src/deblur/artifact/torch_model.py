"""The serving artifact: what the register stage exports and the HTTP service loads.

A serving artifact is a folder with two files, written together atomically:

- ``model.pt``: ``model_config``, ``state_dict`` (fp32 or fp16, per ``serving.weights_dtype``),
  ``train_patch_size`` and ``step``: a minimal checkpoint that ``deblur.models.checkpoint_file`` loads.
- ``model.json``: the caller's metadata (registered name, version, alias, run id, metrics)
  plus what the service needs without reading params.yaml: the ``tiling`` and ``serving``
  sections as they were at export, the architecture and a hash of the weights file.

Loading one needs torch and this package only, never MLflow (a registered model is loaded by
``deblur.tracking.registry_io.load_from_model_uri``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deblur.artifact.meta import WEIGHTS_FILE, ServedModelInfo, ServingError, read_artifact_meta
from deblur.models.checkpoint_file import CheckpointError
from deblur.models.build import model_from_checkpoint
from deblur.core.config import TilingConfig
from deblur.core.imageio import DecodedImage
from deblur.inference.tiling import BatchCallback, deblur_array


@dataclass
class ServingModel(ServedModelInfo):
    """A model ready for CPU inference, with the metadata the service reports."""

    model: torch.nn.Module
    meta: dict
    tiling: TilingConfig
    load_seconds: float = 0.0
    source: str = ""

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def samples(self) -> bool:
        """True for a diffusion refiner: its output depends on a seed and a number of steps."""
        return bool(getattr(self.model, "tiles_itself", False))

    def sampling_for(self, seed: int | None = None, steps: int | None = None) -> dict[str, int]:
        """A refiner's seed and steps for one call: the given ones, else the model's defaults."""
        default_steps = getattr(self.model, "sampling_steps", None) or getattr(self.model, "steps", None)
        return {"seed": self.model.seed if seed is None else int(seed),
                "steps": default_steps if steps is None else int(steps)}

    def deblur(self, image: DecodedImage | np.ndarray, tile_size: int | None = None,
               overlap: int | None = None, sampling: dict[str, int] | None = None,
               on_batch: BatchCallback | None = None) -> np.ndarray:
        """Deblur an HxWx3 uint8 RGB array (or a DecodedImage's RGB); alpha is the caller's.
        ``sampling`` (seed, steps) is for a diffusion refiner only; ``on_batch``: see deblur.inference.tiling."""
        rgb = image.rgb if isinstance(image, DecodedImage) else image
        return deblur_array(self.model, rgb, self.tiling_for(tile_size, overlap), sampling=sampling, on_batch=on_batch)


def load_serving_model(model_dir: str | Path, threads: int | None = None) -> ServingModel:
    """Load a serving artifact onto the CPU in eval mode; sets torch's thread count."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    meta = read_artifact_meta(model_dir)
    torch.set_num_threads(threads or int(meta["serving"]["threads"]))
    model = model_or_serving_error(model_dir / WEIGHTS_FILE)
    return ServingModel(
        model=model,
        meta=meta,
        tiling=TilingConfig.model_validate(meta["tiling"]),
        load_seconds=time.perf_counter() - started,
        source=str(model_dir),
    )


def model_or_serving_error(weights: Path) -> torch.nn.Module:
    try:
        return model_from_checkpoint(weights)
    except (CheckpointError, KeyError, RuntimeError, ValueError) as err:
        raise ServingError(f"{weights}: cannot build the model ({type(err).__name__}: {err})") from err
