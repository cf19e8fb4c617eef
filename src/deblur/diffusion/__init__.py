"""The diffusion family (documentation/diffusion.md): a conditional diffusion refiner on
``diffusers.UNet2DModel``, and Stable Diffusion 1.5 + ControlNet from local weights."""

from __future__ import annotations

from pathlib import Path

DIFFUSION_MODELS = ("diffusion_refiner", "controlnet_sd")


def predictor_checkpoint(source: str, setting: str, error: type[Exception]) -> dict:
    """The checkpoint of the deterministic predictor ``source`` names: a file, or a ``models:/`` URI
    (an adapter version comes with its base merged in). ``setting`` names the param in errors."""
    import tempfile

    from deblur.checkpoints import load_checkpoint

    if source.startswith("models:/"):
        from deblur.lora import download_model_checkpoint

        with tempfile.TemporaryDirectory(prefix="deblur-predictor-") as tmp:
            ckpt = load_checkpoint(download_model_checkpoint(source, tmp))
    elif not Path(source).is_file():
        raise error(f"{setting}: {source}: checkpoint not found "
                    "(give a checkpoint path or a models:/<name>@<alias> URI)")
    else:
        ckpt = load_checkpoint(source)
    if ckpt["model_config"].get("name") in DIFFUSION_MODELS:
        raise error(f"{setting}: {source} is a diffusion model; give a deterministic one (nafnet, unet, stacked_conv)")
    return ckpt
