"""The diffusion family (documentation/diffusion.md): a conditional diffusion refiner on
``diffusers.UNet2DModel``, and Stable Diffusion 1.5 + ControlNet from local weights."""

from __future__ import annotations

import tempfile
from pathlib import Path

from deblur.core.model_sources import checkpoint_from_models_uri
from deblur.models.checkpoint_file import load_checkpoint

DIFFUSION_MODELS = ("diffusion_refiner", "controlnet_sd")


def predictor_checkpoint(source: str, setting: str, error: type[Exception]) -> dict:
    """The checkpoint of the deterministic predictor ``source`` names: a file, or a ``models:/`` URI
    (an adapter version comes with its base merged in). ``setting`` names the param in errors."""
    if source.startswith("models:/"):
        with tempfile.TemporaryDirectory(prefix="deblur-predictor-") as tmp:
            ckpt = load_checkpoint(checkpoint_from_models_uri(source, Path(tmp)))
    elif not Path(source).is_file():
        raise error(f"{setting}: {source}: checkpoint not found "
                    "(give a checkpoint path or a models:/<name>@<alias> URI)")
    else:
        ckpt = load_checkpoint(source)
    if ckpt["model_config"].get("name") in DIFFUSION_MODELS:
        raise error(f"{setting}: {source} is a diffusion model; give a deterministic one (nafnet, unet, stacked_conv)")
    return ckpt
