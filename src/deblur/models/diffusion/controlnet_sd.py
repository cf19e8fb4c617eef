"""Stable Diffusion 1.5 + ControlNet from local weights (``model.name: controlnet_sd``).

The blurred image (or blurred + a deterministic predictor's estimate: ``conditioning:
blurred_and_estimate``, ``conditioning_channels=6``) is the ControlNet's control input. Training
updates the ControlNet and/or a LoRA on the UNet's attention projections (``to_q, to_k, to_v,
to_out.0``) with the latent noise-prediction loss plus optional pixel losses on the decoded
estimate of the sharp image. Inference is Img2Img: the predictor's estimate is encoded, noised
to ``strength`` and denoised in ``steps * strength`` DDIM steps, then decoded (VAE tiling on) and
given the estimate's colours back (wavelet or AdaIN colour fix, after DiffBIR/StableSR).

The SD weights are never copied: a checkpoint holds only what was trained (ControlNet and/or
LoRA tensors) and the config pointing at ``weights_dir``. Everything is read from local files
(``local_files_only=True``, ``HF_HUB_OFFLINE=1``); a missing file is an error naming it.
diffusers, transformers and peft are imported inside the functions that use them, after ``_offline()``:
they are optional and heavy, and importing this module (the registry of architectures does) stays cheap.
Perceptual-only: the model can invent detail that is not in the scene (documentation/diffusion.md).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deblur.core.errors import DeblurError
from deblur.core.files import update_from_file
from deblur.inference.tiling import tiled_inference
from deblur.models.checkpoint_file import load_checkpoint
from deblur.models.common import MODELS, pad_to_multiple
from deblur.models.diffusion import predictor_checkpoint
from deblur.models.factory import model_from_checkpoint
from deblur.models.perceptual import PerceptualLoss

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PIXEL_LOSS_NAMES = {"l1": "deblur_l1_loss", "mse": "deblur_mse_loss", "perceptual": "deblur_perceptual_loss",
                    "gradient": "deblur_gradient_loss"}
NOISE_LOSS_NAME = "noise_prediction"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"   # the name save_lora_weights writes
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Files a diffusers-format SD 1.5 directory must hold: each entry lists alternatives, each
# alternative the files that must all be there.
SD_REQUIRED_FILES = (
    (("model_index.json",),),
    (("scheduler/scheduler_config.json",),),
    (("unet/config.json",),),
    tuple((f"unet/{w}",) for w in _WEIGHTS),
    (("vae/config.json",),),
    tuple((f"vae/{w}",) for w in _WEIGHTS),
    (("text_encoder/config.json",),),
    (("text_encoder/model.safetensors",), ("text_encoder/pytorch_model.bin",)),
    (("tokenizer/tokenizer.json",), ("tokenizer/vocab.json", "tokenizer/merges.txt")),
)
CONTROLNET_REQUIRED_FILES = ((("config.json",),), tuple((w,) for w in _WEIGHTS))


class ControlNetSDError(DeblurError, ValueError):
    """SD/ControlNet weights are missing or the settings do not fit them; the message names the file or key."""


def _first_missing(folder: Path, required: tuple, key: str) -> None:
    if not folder.is_dir():
        raise ControlNetSDError(f"model.controlnet_sd.{key}: {folder} is not a directory")
    for alternatives in required:
        if any(all((folder / f).is_file() for f in files) for files in alternatives):
            continue
        first = alternatives[0]
        missing = next(f for f in first if not (folder / f).is_file())
        others = " or ".join(" + ".join(files) for files in alternatives[1:])
        raise ControlNetSDError(f"model.controlnet_sd.{key}: {folder / missing} is missing"
                                + (f" (or give {others})" if others else "")
                                + "; a diffusers-format directory is needed, nothing is downloaded")


def check_sd_dir(weights_dir: str | Path) -> Path:
    """``weights_dir`` as a Path once every file SD 1.5 needs is there; else an error naming the first missing one."""
    folder = Path(weights_dir)
    _first_missing(folder, SD_REQUIRED_FILES, "weights_dir")
    return folder


def check_controlnet_dir(controlnet_dir: str | Path) -> Path:
    folder = Path(controlnet_dir)
    _first_missing(folder, CONTROLNET_REQUIRED_FILES, "controlnet_dir")
    return folder


def _offline() -> None:
    """No hub traffic from here on (read by huggingface_hub when first imported)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def load_pipeline(weights_dir: str | Path, controlnet: nn.Module | str | Path, img2img: bool = True):
    """``StableDiffusionControlNetImg2ImgPipeline`` (or, ``img2img=False``, the text-to-image
    ``StableDiffusionControlNetPipeline``) from local directories only, fp32, no safety checker.
    ``controlnet`` is a ControlNetModel or the directory of one."""
    _offline()
    folder = check_sd_dir(weights_dir)
    from diffusers import (ControlNetModel, StableDiffusionControlNetImg2ImgPipeline,   # lazy: optional, heavy
                           StableDiffusionControlNetPipeline)

    if not isinstance(controlnet, nn.Module):
        controlnet = ControlNetModel.from_pretrained(check_controlnet_dir(controlnet), local_files_only=True,
                                                     dtype=torch.float32)
    cls = StableDiffusionControlNetImg2ImgPipeline if img2img else StableDiffusionControlNetPipeline
    return cls.from_pretrained(folder, controlnet=controlnet, safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False, local_files_only=True, dtype=torch.float32)


def sd_weights_hash(weights_dir: str | Path) -> str:
    """Short hash of ``model_index.json`` + ``unet/config.json``: which SD a checkpoint was trained on."""
    folder = check_sd_dir(weights_dir)
    digest = hashlib.sha256()
    for name in ("model_index.json", "unet/config.json"):
        update_from_file(digest, folder / name)
    return digest.hexdigest()[:16]


# --- colour fix ------------------------------------------------------------------------------

def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]],
                          dtype=x.dtype, device=x.device).expand(x.shape[1], 1, 3, 3)
    padded = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=x.shape[1], dilation=radius)


def wavelet_low_frequency(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """What is left of ``x`` after removing ``levels`` à-trous wavelet detail bands (DiffBIR's
    ``wavelet_decomposition``): the colours and shading, without texture."""
    low = x
    for i in range(levels):
        low = _wavelet_blur(low, 2 ** i)
    return low


def colour_fix(output: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """``output`` with the colours of ``reference`` (N, 3, H, W): ``wavelet`` keeps the output's
    high frequencies and the reference's low ones; ``adain`` matches each channel's mean and std."""
    if method == "none":
        return output
    if method == "wavelet":
        return output - wavelet_low_frequency(output) + wavelet_low_frequency(reference)
    if method == "adain":
        dims = (2, 3)
        mean_o, std_o = output.mean(dims, keepdim=True), output.std(dims, keepdim=True)
        mean_r, std_r = reference.mean(dims, keepdim=True), reference.std(dims, keepdim=True)
        return (output - mean_o) / (std_o + 1e-6) * std_r + mean_r
    raise ControlNetSDError(f"model.controlnet_sd.colour_fix: unknown method {method!r}; known: wavelet, adain, none")


def image_gradient_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 distance of horizontal and vertical finite differences (edges)."""
    def grads(x):
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
    (px, py), (tx, ty) = grads(prediction), grads(target)
    return (px - tx).abs().mean() + (py - ty).abs().mean()


# --- predictor -------------------------------------------------------------------------------

def load_predictor(source: str) -> nn.Module:
    """The deterministic first-estimate model from a checkpoint path or a ``models:/`` URI (frozen, fp32)."""
    model = model_from_checkpoint(predictor_checkpoint(source, "model.controlnet_sd.predictor", ControlNetSDError))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --- the model -------------------------------------------------------------------------------

@MODELS.register("controlnet_sd")
class ControlNetSD(nn.Module):
    """SD 1.5 + ControlNet deblurring: ``forward(blurred)`` samples, ``training_loss`` trains.

    Only the trained parts are parameters with gradients and only they are in ``state_dict``:
    ``controlnet.*`` (``train_parts`` controlnet/both) and the UNet's ``lora_A/lora_B`` tensors
    (lora/both). The UNet, VAE, text encoder and predictor stay frozen and are rebuilt from
    their files when a checkpoint is loaded.
    """

    def __init__(self, weights_dir: str | None, controlnet_dir: str | None, conditioning: str,
                 predictor: str | None, prompt: str, negative_prompt: str, strength: float, steps: int,
                 guidance_scale: float, seed: int, train_parts: str, lora_rank: int, lora_alpha: float,
                 noise_loss: float, l1: float, mse: float, gradient: float, perceptual: float,
                 perceptual_backbone: str | None, perceptual_net: str, colour_fix: str, vae_tiling: bool) -> None:
        super().__init__()
        if weights_dir is None:
            raise ControlNetSDError("model.controlnet_sd.weights_dir is null: point it at a local diffusers-format "
                                    "Stable Diffusion 1.5 directory (documentation/diffusion.md); nothing is downloaded")
        if perceptual > 0 and perceptual_backbone is None:
            raise ControlNetSDError("model.controlnet_sd.perceptual is > 0 but model.controlnet_sd.perceptual_backbone "
                                    "is null: give a local backbone file or set perceptual: 0")
        _offline()
        from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel   # lazy: optional
        from transformers import CLIPTextModel, CLIPTokenizer   # lazy: optional, heavy

        self.weights_dir = str(weights_dir)
        self.conditioning = conditioning
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.strength, self.steps, self.guidance_scale, self.seed = strength, steps, guidance_scale, seed
        self.train_parts = train_parts
        self.loss_weights = {"noise": noise_loss, "l1": l1, "mse": mse, "gradient": gradient, "perceptual": perceptual}
        self.colour_fix_method = colour_fix
        channels = 6 if conditioning == "blurred_and_estimate" else 3

        folder = check_sd_dir(weights_dir)
        local = {"local_files_only": True, "dtype": torch.float32}
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **local)
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **local)
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **local)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        self.scheduler_config = dict(DDPMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True))
        self.train_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # the UNet halves the latents at every level but the last
        self.size_multiple = self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if controlnet_dir is not None:
            self.controlnet = ControlNetModel.from_pretrained(check_controlnet_dir(controlnet_dir), **local)
            if self.controlnet.config.conditioning_channels != channels:
                raise ControlNetSDError(
                    f"model.controlnet_sd.controlnet_dir: {controlnet_dir} takes "
                    f"{self.controlnet.config.conditioning_channels} conditioning channels, conditioning "
                    f"{conditioning!r} gives {channels}")
        else:
            # zero convolutions at its outputs: a fresh ControlNet leaves the UNet unchanged
            embedding = (16, 32, 96, 256)[: int(self.vae_scale).bit_length()]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=embedding,
                                                            conditioning_channels=channels)
        for module in (self.unet, self.vae, self.text_encoder, self.controlnet):
            module.requires_grad_(False)
        if train_parts in ("controlnet", "both"):
            self.controlnet.requires_grad_(True)
        if train_parts in ("lora", "both"):
            from peft import LoraConfig   # lazy: optional, for a LoRA on the UNet only

            self.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                             target_modules=list(LORA_TARGETS)))
        if vae_tiling:
            self.vae.enable_tiling()
        self.predictor = load_predictor(predictor) if predictor else None
        self.perceptual_loss = None
        if perceptual > 0:
            self.perceptual_loss = PerceptualLoss.from_files(perceptual_backbone, None, perceptual_net)
        self._embeddings: dict[tuple[str, str], torch.Tensor] = {}

    # --- what a checkpoint holds ---
    def is_trained_key(self, key: str) -> bool:
        if key.startswith("controlnet."):
            return self.train_parts in ("controlnet", "both")
        return key.startswith("unet.") and "lora_" in key and self.train_parts in ("lora", "both")

    def state_dict(self, *args, **kwargs):
        """Only the trained tensors (ControlNet and/or LoRA): SD's own weights stay in ``weights_dir``."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return OrderedDict((k, v) for k, v in full.items() if self.is_trained_key(k[len(prefix):]))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        expected, given = set(self.state_dict()), set(state_dict)
        if strict and expected != given:
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            raise RuntimeError(f"Error(s) in loading state_dict for ControlNetSD (train_parts {self.train_parts!r}): "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet's LoRA tensors in peft's naming (what ``save_lora_weights`` takes as ``unet_lora_layers``)."""
        return lora_layers_from_state(self.state_dict())

    def train(self, mode: bool = True) -> "ControlNetSD":
        super().train(mode)
        for frozen in (self.vae, self.text_encoder, self.predictor, self.perceptual_loss):
            if frozen is not None:
                frozen.eval()
        return self

    def prepare_inference(self, train_patch_size: int) -> None:
        """Nothing to switch: sampling settings come from the config."""

    # --- shared pieces ---
    def _prompt_embeddings(self, batch: int, negative: bool) -> torch.Tensor:
        text = self.negative_prompt if negative else self.prompt
        device = next(self.text_encoder.parameters()).device
        key = (text, str(device))
        if key not in self._embeddings:
            ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            with torch.no_grad():
                self._embeddings[key] = self.text_encoder(ids)[0]
        return self._embeddings[key].expand(batch, -1, -1)

    @torch.no_grad()
    def estimate(self, blurred: torch.Tensor) -> torch.Tensor:
        """The predictor's first estimate in [0, 1] (the blurred image itself without a predictor)."""
        if self.predictor is None:
            return blurred
        return self.predictor(blurred).clamp(0, 1)

    def _control(self, blurred: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
        return torch.cat([blurred, estimate], 1) if self.conditioning == "blurred_and_estimate" else blurred

    def _predict_noise(self, latents, t, embeddings, control) -> torch.Tensor:
        down, mid = self.controlnet(latents, t, encoder_hidden_states=embeddings, controlnet_cond=control,
                                    return_dict=False)
        return self.unet(latents, t, encoder_hidden_states=embeddings, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    def _encode(self, image: torch.Tensor, sample: bool) -> torch.Tensor:
        dist = self.vae.encode(image * 2 - 1).latent_dist
        return (dist.sample() if sample else dist.mode()) * self.vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.vae.decode(latents / self.vae.config.scaling_factor).sample + 1) / 2

    # --- training ---
    def training_loss(self, blurred: torch.Tensor, sharp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Latent noise-prediction MSE (weight ``noise_loss``) plus the pixel losses with weight > 0 on
        the decoded one-step estimate of the sharp image; the pixel losses of each sample are weighted by
        its ᾱ_t, as at high noise that estimate is mostly noise."""
        h, w = blurred.shape[-2:]
        blurred_p = pad_to_multiple(blurred, self.size_multiple)
        sharp_p = pad_to_multiple(sharp, self.size_multiple)
        control = self._control(blurred_p, self.estimate(blurred_p))
        with torch.no_grad():
            latents = self._encode(sharp_p, sample=True)
        noise = torch.randn_like(latents)
        sched = self.train_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = sched.add_noise(latents, noise, t)
        pred = self._predict_noise(noisy, t, self._prompt_embeddings(latents.shape[0], negative=False), control).float()
        target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        parts = {NOISE_LOSS_NAME: F.mse_loss(pred, target.float())}
        total = self.loss_weights["noise"] * parts[NOISE_LOSS_NAME]
        pixel = {k: v for k, v in self.loss_weights.items() if k != "noise" and v > 0}
        if pixel:
            alpha = sched.alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1)
            if sched.config.prediction_type == "v_prediction":
                x0 = alpha.sqrt() * noisy - (1 - alpha).sqrt() * pred
            else:
                x0 = (noisy - (1 - alpha).sqrt() * pred) / alpha.sqrt()
            image = self._decode(x0)[..., :h, :w].float()
            weight = alpha.flatten() / alpha.sum()
            for name, value in pixel.items():
                per_sample = torch.stack([self._pixel_loss(name, image[i:i + 1], sharp[i:i + 1].float())
                                          for i in range(image.shape[0])])
                parts[PIXEL_LOSS_NAMES[name]] = (weight * per_sample).sum()
                total = total + value * parts[PIXEL_LOSS_NAMES[name]]
        return total, {k: v.detach() for k, v in parts.items()}

    def _pixel_loss(self, name: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if name == "l1":
            return F.l1_loss(prediction, target)
        if name == "mse":
            return F.mse_loss(prediction, target)
        if name == "gradient":
            return image_gradient_loss(prediction, target)
        return self.perceptual_loss(prediction.clamp(0, 1), target)

    # --- inference ---
    tiles_itself = True   # deblur.inference.tiling hands over whole images: one noise tensor per image, no seams

    def sampling_timesteps(self, steps: int | None = None):
        """The DDIM sampler (built from the weights' scheduler config) and the Img2Img timesteps it runs:
        the last ``steps * strength`` of a ``steps``-step schedule."""
        from diffusers import DDIMScheduler   # lazy: optional, heavy

        steps = steps or self.steps
        sched = DDIMScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(steps)
        run = max(1, min(int(steps * self.strength), steps))
        return sched, sched.timesteps[steps - run:]

    @torch.no_grad()
    def sample(self, blurred: torch.Tensor, estimate: torch.Tensor, seed: int | None = None,
               steps: int | None = None) -> torch.Tensor:
        """Img2Img ControlNet sampling from ``estimate`` over whole images, then the colour fix; [0, 1]."""
        h, w = blurred.shape[-2:]
        blurred_p = pad_to_multiple(blurred, self.size_multiple)
        estimate_p = pad_to_multiple(estimate, self.size_multiple)
        control = self._control(blurred_p, estimate_p)
        latents = self._encode(estimate_p, sample=False)
        sched, timesteps = self.sampling_timesteps(steps)
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        latents = sched.add_noise(latents, noise, timesteps[:1].repeat(latents.shape[0]))
        n = latents.shape[0]
        guided = self.guidance_scale > 1
        embeddings = self._prompt_embeddings(n, negative=False)
        if guided:
            embeddings = torch.cat([self._prompt_embeddings(n, negative=True), embeddings])
            control = torch.cat([control, control])
        for t in timesteps:
            model_in = torch.cat([latents, latents]) if guided else latents
            pred = self._predict_noise(model_in, t, embeddings, control)
            if guided:
                unconditional, conditional = pred.chunk(2)
                pred = unconditional + self.guidance_scale * (conditional - unconditional)
            latents = sched.step(pred, t, latents).prev_sample
        image = self._decode(latents)[..., :h, :w]
        return colour_fix(image, estimate, self.colour_fix_method).clamp(0, 1)

    def forward(self, blurred: torch.Tensor, seed: int | None = None, steps: int | None = None) -> torch.Tensor:
        blurred = blurred.float()
        return self.sample(blurred, self.estimate(blurred), seed, steps)

    def restore(self, image: torch.Tensor, tile_size: int, overlap: int, batch_size: int,
                seed: int | None = None, steps: int | None = None) -> torch.Tensor:
        """What ``deblur.inference.tiling.tiled_inference`` calls: the predictor tiled as any model, then one
        sampling run over the whole image (the VAE tiles itself when ``vae_tiling``). float32 in [0, 1]."""
        device = next(self.unet.parameters()).device
        blurred = image.to(device)
        blurred = blurred.float().div(255.0) if blurred.dtype == torch.uint8 else blurred.float()
        estimate = (tiled_inference(self.predictor, image, tile_size, overlap, batch_size).to(device)
                    if self.predictor is not None else blurred)
        with torch.inference_mode():
            restored = self.sample(blurred, estimate, seed, steps)
        return restored.clone()   # a normal tensor, as tiled_inference returns


def lora_layers_from_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``unet.<module>.lora_A.default.weight`` (our state dict) -> ``<module>.lora_A.weight`` (peft's naming)."""
    return {k[len("unet."):].replace(".default.", "."): v for k, v in state.items()
            if k.startswith("unet.") and "lora_" in k}


def save_lora_from_checkpoint(checkpoint: dict | str | Path, out_dir: str | Path) -> Path | None:
    """Write a checkpoint's LoRA with ``StableDiffusionPipeline.save_lora_weights`` (loadable by any SD
    pipeline's ``load_lora_weights(out_dir)``); None when the checkpoint holds no LoRA."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    layers = lora_layers_from_state(ckpt["state_dict"])
    if not layers:
        return None
    _offline()
    from diffusers import StableDiffusionPipeline   # lazy: optional, heavy

    out_dir = Path(out_dir)
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers={k: v.float() for k, v in layers.items()})
    return out_dir


def registry_extras(ckpt: dict, workdir: str | Path) -> tuple[dict[str, str], Path | None]:
    """For the register stage, given the loaded checkpoint: the model version's tags naming the base
    SD weights (directory and hash of model_index.json + unet/config.json), and the folder (written
    in ``workdir``) holding its LoRA, to log as the run's ``lora/`` artifacts, if any. Empty for other models."""
    settings = ckpt["model_config"].get("controlnet_sd")
    if ckpt["model_config"].get("name") != "controlnet_sd" or not settings:
        return {}, None
    tags = {"sd_weights_dir": str(Path(settings["weights_dir"]).resolve()),
            "sd_weights_hash": sd_weights_hash(settings["weights_dir"]),
            "sd_controlnet_dir": str(settings["controlnet_dir"]), "sd_train_parts": settings["train_parts"],
            "sd_predictor": str(settings["predictor"])}   # read again at load time: the checkpoint does not hold it
    lora_dir = save_lora_from_checkpoint(ckpt, Path(workdir) / "lora")
    if lora_dir is not None:
        tags["lora_artifact"] = "lora/" + LORA_WEIGHTS_FILE
    return tags, lora_dir
