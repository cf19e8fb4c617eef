"""The diffusion family (documentation/diffusion.md): a conditional diffusion refiner on
``diffusers.UNet2DModel``, and Stable Diffusion 1.5 + ControlNet from local weights."""
