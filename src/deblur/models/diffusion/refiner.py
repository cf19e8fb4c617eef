"""Predict-and-refine: a diffusion UNet that samples the residual a frozen predictor leaves.

After "Deblurring via Stochastic Refinement" (Whang et al., CVPR 2022). A deterministic
predictor (any registered deblur model) gives an estimate; a ``diffusers.UNet2DModel``
conditioned by concatenation on (noisy residual, blurred, estimate) learns the residual
``sharp - estimate`` (times ``residual_scale``) with a DDPM objective, and at inference a
few DDIM or DPM-Solver++ steps (trailing spacing, so the first step is the last timestep)
sample it. The UNet runs after pixel-unshuffle by ``unshuffle``: 9·r² input channels at 1/r²
of the pixels, which is what makes it affordable on a CPU.

Large images are sampled whole: one noise tensor and one scheduler step per sampling step
over the whole image; only the UNet call inside a step is tiled, its tile outputs blended
with the shared weights of ``deblur.inference.tiling`` (the DiffBIR/StableSR approach), so tiles
never diverge into seams. The predictor's weights and architecture live inside the
refiner's state dict (``predictor_spec_json``, JSON bytes), so a refiner checkpoint is complete.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from deblur.core.tile_grid import BlendWeights, TileGrid
from deblur.inference.tiling import tiled_inference
from deblur.models.checkpoint_file import checkpoint_model_config
from deblur.models.common import MODELS, pad_to_multiple
from deblur.models.diffusion import predictor_checkpoint
from deblur.models.factory import build_model, configure_inference, model_from_checkpoint

SPEC_KEY = "predictor_spec_json"   # state-dict key: the predictor's spec as UTF-8 JSON bytes
MAX_SEED = 2**63 - 1


class RefinerError(ValueError):
    """A refiner cannot be built or run as asked; the message names the setting."""


def _encode_spec(spec: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(spec, sort_keys=True).encode()), dtype=torch.uint8)


def _decode_spec(blob: torch.Tensor) -> dict:
    return json.loads(bytes(blob.tolist()).decode())


def _load_predictor(source: str) -> tuple[nn.Module, dict]:
    """The predictor model (fp32, eval, frozen, inference form) and its spec from a checkpoint or URI."""
    ckpt = predictor_checkpoint(source, "model.diffusion_refiner.predictor", RefinerError)
    spec = {"model_config": ckpt["model_config"], "train_patch_size": int(ckpt.get("train_patch_size", 256)),
            "source": source}
    return model_from_checkpoint(ckpt), spec


def _predictor_from_spec(spec: dict) -> nn.Module:
    """An empty predictor of the spec's architecture, in its inference form (weights come with the state dict)."""
    cfg = checkpoint_model_config(spec["model_config"])
    model = build_model(cfg).eval()
    return configure_inference(model, cfg, int(spec["train_patch_size"]))


@MODELS.register("diffusion_refiner")
class DiffusionRefiner(nn.Module):
    """Frozen ``predictor`` + UNet2DModel on the residual; ``forward(blurred)`` returns the refined image."""

    tiles_itself = True   # deblur.inference.tiling hands it the whole image and the tiling (see ``restore``)

    def __init__(self, predictor: str | nn.Module, unshuffle: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, norm_groups: int, prediction_type: str, train_timesteps: int,
                 residual_scale: float, sampler: str, sampling_steps: int, fidelity_samples: int, seed: int,
                 predictor_spec: dict | None = None) -> None:
        super().__init__()
        if prediction_type not in ("v_prediction", "sample"):
            raise RefinerError(f"prediction_type {prediction_type!r}: use v_prediction or sample "
                               "(few-step epsilon sampling blows up)")
        if isinstance(predictor, str):
            predictor, predictor_spec = _load_predictor(predictor)
        elif predictor_spec is None:
            raise RefinerError("a predictor module needs its predictor_spec")
        from diffusers import DDPMScheduler, UNet2DModel   # heavy: imported only when a refiner is built

        self.predictor = predictor
        self.predictor.requires_grad_(False)
        self.register_buffer(SPEC_KEY, _encode_spec(predictor_spec))
        self.unshuffle = int(unshuffle)
        self.residual_scale = float(residual_scale)
        self.sampler, self.sampling_steps = sampler, int(sampling_steps)
        self.fidelity_samples, self.seed = int(fidelity_samples), int(seed)
        self.size_multiple = self.unshuffle * 2 ** (len(block_out_channels) - 1)
        levels = len(block_out_channels)
        self.unet = UNet2DModel(
            in_channels=9 * self.unshuffle ** 2, out_channels=3 * self.unshuffle ** 2,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
            add_attention=False, norm_num_groups=norm_groups)
        self.train_scheduler = DDPMScheduler(num_train_timesteps=train_timesteps, prediction_type=prediction_type,
                                             clip_sample=False)

    @classmethod
    def from_state_dict(cls, settings: dict, state: dict[str, torch.Tensor]) -> "DiffusionRefiner":
        """An empty refiner shaped for ``state`` (a checkpoint's): the predictor is rebuilt from ``predictor_spec``."""
        if SPEC_KEY not in state:
            raise RefinerError(f"a diffusion_refiner state dict needs {SPEC_KEY!r} (the predictor's architecture)")
        spec = _decode_spec(state[SPEC_KEY])
        return cls(**{**settings, "predictor": _predictor_from_spec(spec), "predictor_spec": spec})

    @property
    def predictor_spec(self) -> dict:
        """The predictor's model_config, train_patch_size and where it came from."""
        return _decode_spec(getattr(self, SPEC_KEY))

    # --- modes: the predictor stays frozen in its inference form ------------------------------
    def train(self, mode: bool = True) -> "DiffusionRefiner":
        super().train(mode)
        self.predictor.eval()
        return self

    def prepare_inference(self, train_patch_size: int) -> None:
        """Nothing to switch: the predictor is already in its own inference form."""

    # --- the UNet on (noisy residual, blurred, estimate) ------------------------------------
    def denoise(self, noisy: torch.Tensor, blurred: torch.Tensor, estimate: torch.Tensor,
                timestep: torch.Tensor | int) -> torch.Tensor:
        """UNet output (v or x0, in pixel layout) for inputs whose sides are multiples of ``size_multiple``."""
        r = self.unshuffle
        cond = torch.cat([noisy, blurred * 2 - 1, estimate * 2 - 1], dim=1)
        if r > 1:
            cond = F.pixel_unshuffle(cond.reshape(-1, 3, *cond.shape[-2:]), r).reshape(
                cond.shape[0], 9 * r * r, cond.shape[-2] // r, cond.shape[-1] // r)
        if not torch.is_tensor(timestep) or timestep.dim() == 0:
            timestep = torch.full((cond.shape[0],), int(timestep), device=cond.device, dtype=torch.long)
        out = self.unet(cond, timestep).sample
        return F.pixel_shuffle(out, r) if r > 1 else out

    def estimate(self, blurred: torch.Tensor) -> torch.Tensor:
        """The predictor's estimate, clamped to [0, 1] as tiled inference clamps it."""
        with torch.no_grad():
            return self.predictor(blurred).float().clamp(0.0, 1.0)

    def training_loss(self, blurred: torch.Tensor, sharp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """DDPM objective on the scaled residual: MSE to v (v_prediction) or to the residual (sample)."""
        h, w = blurred.shape[-2:]
        blurred, sharp = pad_to_multiple(blurred, self.size_multiple), pad_to_multiple(sharp, self.size_multiple)
        estimate = self.estimate(blurred)
        residual = (sharp - estimate) * self.residual_scale
        noise = torch.randn_like(residual)
        steps = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (residual.shape[0],),
                              device=residual.device)
        noisy = self.train_scheduler.add_noise(residual, noise, steps)
        if self.train_scheduler.config.prediction_type == "v_prediction":
            target = self.train_scheduler.get_velocity(residual, noise, steps)
        else:
            target = residual
        pred = self.denoise(noisy, blurred, estimate, steps)
        loss = F.mse_loss(pred[..., :h, :w].float(), target[..., :h, :w].float())
        return loss, {"diffusion_mse": loss.detach()}

    # --- sampling ---------------------------------------------------------------------------
    def sampling_scheduler(self, steps: int):
        """DDIM or DPM-Solver++ from the training scheduler's config, trailing spacing, ``steps`` steps."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler   # heavy, as above

        if not 1 <= steps <= self.train_scheduler.config.num_train_timesteps:
            raise RefinerError(f"steps {steps} must be in [1, {self.train_scheduler.config.num_train_timesteps}]")
        if self.sampler == "ddim":
            scheduler = DDIMScheduler.from_config(self.train_scheduler.config, timestep_spacing="trailing",
                                                  clip_sample=False)
        else:
            scheduler = DPMSolverMultistepScheduler.from_config(
                self.train_scheduler.config, algorithm_type="dpmsolver++", timestep_spacing="trailing",
                final_sigmas_type="zero")
        scheduler.set_timesteps(steps)
        return scheduler

    def sample_residual(self, blurred: torch.Tensor, estimate: torch.Tensor, seed: int, steps: int,
                        tiling: tuple[int, int, int] | None = None) -> torch.Tensor:
        """One sample of the residual (in [0, 1] units) for padded inputs; ``tiling`` tiles only the UNet calls."""
        scheduler = self.sampling_scheduler(steps)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        x = torch.randn(estimate.shape, generator=generator, dtype=torch.float32).to(estimate.device)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t)
            if tiling is None:
                out = self.denoise(model_in, blurred, estimate, t)
            else:
                out = self._tiled_denoise(model_in, blurred, estimate, t, *tiling)
            x = scheduler.step(out.float(), t, x).prev_sample
        return x / self.residual_scale

    def _tiled_denoise(self, noisy: torch.Tensor, blurred: torch.Tensor, estimate: torch.Tensor, t,
                       tile_size: int, overlap: int, batch_size: int) -> torch.Tensor:
        """``denoise`` evaluated tile by tile on the ``size_multiple`` grid, blended as tiled_inference blends."""
        align = self.size_multiple
        n, _, height, width = noisy.shape
        tile = max(align, tile_size // align * align)
        if height <= tile and width <= tile:
            return self.denoise(noisy, blurred, estimate, t)
        grid = TileGrid.plan(height, width, tile, min(overlap, (tile - 1) // 2), align)   # height, width: on the grid
        blend = BlendWeights(grid, lambda weights: torch.from_numpy(weights).to(noisy.device))
        out = torch.zeros_like(noisy)
        cells = [(r, c) for r in range(grid.rows) for c in range(grid.cols)]
        per_call = max(1, batch_size // n)    # tiles per UNet call; each carries all n images
        for i in range(0, len(cells), per_call):
            batch = cells[i:i + per_call]
            crop = lambda a: torch.cat([grid.cut(a, r, c) for r, c in batch])
            pred = self.denoise(crop(noisy), crop(blurred), crop(estimate), t).float()
            for k, (r, c) in enumerate(batch):
                blend.add(out, pred[k * n:(k + 1) * n], r, c)
        blend.normalise(out)
        return out

    def refine(self, blurred: torch.Tensor, estimate: torch.Tensor, seed: int | None = None,
               steps: int | None = None, samples: int | None = None,
               tiling: tuple[int, int, int] | None = None) -> torch.Tensor:
        """``estimate`` + the mean of ``samples`` sampled residuals (seeds ``seed``, ``seed + 1``, ...), clamped."""
        seed = self.seed if seed is None else int(seed)
        steps = self.sampling_steps if steps is None else int(steps)
        samples = self.fidelity_samples if samples is None else int(samples)
        if not 0 <= seed <= MAX_SEED - samples:
            raise RefinerError(f"seed {seed} must be in [0, {MAX_SEED - samples}]")
        h, w = blurred.shape[-2:]
        blurred_p = pad_to_multiple(blurred, self.size_multiple)
        estimate_p = pad_to_multiple(estimate, self.size_multiple)
        residual = sum(self.sample_residual(blurred_p, estimate_p, seed + k, steps, tiling) for k in range(samples))
        return (estimate + residual[..., :h, :w] / samples).clamp(0.0, 1.0)

    def forward(self, blurred: torch.Tensor, seed: int | None = None, steps: int | None = None) -> torch.Tensor:
        """Whole-image refinement (no tiling): the predictor's estimate plus a sampled residual."""
        with torch.no_grad():
            return self.refine(blurred, self.estimate(blurred), seed, steps)

    def restore(self, image: torch.Tensor, tile_size: int, overlap: int, batch_size: int,
                seed: int | None = None, steps: int | None = None) -> torch.Tensor:
        """What ``deblur.inference.tiling.tiled_inference`` calls: the predictor tiled as any model, then sampling
        over the whole image with the UNet tiled inside each step. float32 in [0, 1] on the model's device."""
        estimate = tiled_inference(self.predictor, image, tile_size, overlap, batch_size)
        device = estimate.device
        blurred = image.to(device)
        blurred = blurred.float().div(255.0) if blurred.dtype == torch.uint8 else blurred.float()
        with torch.inference_mode():
            refined = self.refine(blurred, estimate, seed, steps, tiling=(tile_size, overlap, batch_size))
        return refined.clone()   # a normal tensor, as tiled_inference returns: callers scale it in place
