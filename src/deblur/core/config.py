"""Typed configuration: ``params.yaml`` validated into frozen pydantic models.

Every value has exactly one home, ``params.yaml``; the classes here carry no defaults for
pipeline parameters, so a missing key is an error rather than a silent second default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deblur.core.errors import DeblurError

BLUR_TYPES = ("motion", "gaussian", "defocus", "lens")   # degradations with a blur kernel (PSF)
NOISE = "noise"                                          # no blur, Gaussian noise only (a denoising pair)
DEGRADATION_TYPES = (*BLUR_TYPES, NOISE)                 # every value blur_mix accepts, in draw order


def overlap_fits(tile_size: int, overlap: int) -> bool:
    """The overlap rule: a tile's two ramps must not meet, ``2 * overlap < tile_size``."""
    return 2 * overlap < tile_size


def check_overlap(tile_size: int, overlap: int) -> None:
    """Raises ValueError when ``overlap`` breaks ``overlap_fits``."""
    if not overlap_fits(tile_size, overlap):
        raise ValueError(f"overlap {overlap} must be less than half of tile_size {tile_size}")


class ConfigError(DeblurError, ValueError):
    """params.yaml is missing, unreadable or invalid; the message names file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackingConfig(_Strict):
    experiment: str


class GoproConfig(_Strict):
    root: str
    blur_dir: Literal["blur", "blur_gamma"]
    val_sequences: int = Field(ge=0)


class FolderConfig(_Strict):
    root: str
    val_fraction: float = Field(ge=0, lt=1)
    test_fraction: float = Field(ge=0, lt=1)
    max_side: int = Field(ge=16)

    @model_validator(mode="after")
    def _leaves_train(self) -> "FolderConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1 (nothing would be left to train on)")
        return self


def _check_range(low: float, high: float, what: str) -> None:
    if low > high:
        raise ValueError(f"{what}: minimum {low} exceeds maximum {high}")


class DeadLeavesConfig(_Strict):
    count: int = Field(ge=0)
    size: int = Field(ge=32)
    test_fraction: float = Field(ge=0, lt=1)
    soft_fraction: float = Field(ge=0, le=1)
    layers: int = Field(ge=1)
    radius_min: float = Field(gt=0, le=1)
    radius_max: float = Field(gt=0, le=1)
    max_defocus: float = Field(ge=0, le=0.25)

    @model_validator(mode="after")
    def _ordered(self) -> "DeadLeavesConfig":
        _check_range(self.radius_min, self.radius_max, "radius")
        return self


class EmbeddedConfig(_Strict):
    photos: tuple[str, ...]
    test_photos: tuple[str, ...]
    photo_max_side: int = Field(ge=32)
    val_fraction: float = Field(ge=0, lt=1)
    dead_leaves: DeadLeavesConfig

    @model_validator(mode="after")
    def _test_photos_listed(self) -> "EmbeddedConfig":
        missing = sorted(set(self.test_photos) - set(self.photos))
        if missing:
            raise ValueError(f"test_photos {missing} are not in photos")
        return self


class IngestConfig(_Strict):
    source: Literal["embedded", "folder", "gopro"]
    skip_bad_files: bool
    gopro: GoproConfig
    folder: FolderConfig
    embedded: EmbeddedConfig


class MotionConfig(_Strict):
    min_kernel_size: int = Field(ge=3)
    max_kernel_size: int = Field(ge=3)
    trajectory_length: float = Field(gt=0)
    anxiety_max: float = Field(ge=0)

    @model_validator(mode="after")
    def _odd_ordered(self) -> "MotionConfig":
        if self.min_kernel_size % 2 == 0 or self.max_kernel_size % 2 == 0:
            raise ValueError("kernel sizes must be odd")
        _check_range(self.min_kernel_size, self.max_kernel_size, "kernel size")
        return self


class RangeSigma(_Strict):
    sigma_min: float = Field(gt=0)
    sigma_max: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "RangeSigma":
        _check_range(self.sigma_min, self.sigma_max, "sigma")
        return self


class DefocusConfig(_Strict):
    radius_min: float = Field(gt=0)
    radius_max: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "DefocusConfig":
        _check_range(self.radius_min, self.radius_max, "radius")
        return self


class LensConfig(DefocusConfig):
    edge_softness: float = Field(ge=0, le=1)
    chromatic_shift: float = Field(ge=0)


class SynthesizeConfig(_Strict):
    pairs_per_image: int = Field(ge=1)
    test_pairs_per_image: int = Field(ge=1)
    blur_mix: dict[str, float]
    motion: MotionConfig
    gaussian: RangeSigma
    defocus: DefocusConfig
    lens: LensConfig
    gamma: float = Field(gt=0)
    noise_sigma_max: float = Field(ge=0, le=0.5)
    noise: RangeSigma              # the ``noise`` degradation's std, in [0, 1] units

    @field_validator("blur_mix")
    @classmethod
    def _known_blur_types(cls, mix: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(mix) - set(DEGRADATION_TYPES))
        if unknown:
            raise ValueError(f"unknown blur type(s) {unknown}; known: {list(DEGRADATION_TYPES)}")
        if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError("proportions must be >= 0 and sum to more than 0")
        return mix


class UNetConfig(_Strict):
    base_channels: int = Field(ge=8)
    levels: int = Field(ge=1, le=6)
    bottleneck_channels: int = Field(ge=8)
    groups: int = Field(ge=1)


class NAFNetConfig(_Strict):
    width: int = Field(ge=4)
    enc_blocks: tuple[int, ...]
    middle_blocks: int = Field(ge=0)
    dec_blocks: tuple[int, ...]
    tlc: bool
    tlc_factor: float = Field(ge=1.0)
    padding: Literal["reflect", "zeros"]   # zeros: as the official NAFNet (deblur.models.official)

    @model_validator(mode="after")
    def _symmetric(self) -> "NAFNetConfig":
        if len(self.enc_blocks) != len(self.dec_blocks):
            raise ValueError("enc_blocks and dec_blocks must have the same length")
        return self


class StackedConvConfig(_Strict):
    channels: int = Field(ge=4)
    depth: int = Field(ge=2)


class DiffusionRefinerConfig(_Strict):
    """A diffusion UNet that refines a frozen predictor's estimate (deblur.models.diffusion.refiner)."""

    predictor: str                      # checkpoint path or models:/<name>@<alias> (resolved when training starts)
    unshuffle: Literal[1, 2, 4]
    block_out_channels: tuple[int, ...]
    layers_per_block: int = Field(ge=1)
    norm_groups: int = Field(ge=1)
    prediction_type: Literal["v_prediction", "sample", "epsilon"]
    train_timesteps: int = Field(ge=2)
    residual_scale: float = Field(gt=0)
    sampler: Literal["ddim", "dpmsolver"]
    sampling_steps: int = Field(ge=1)
    fidelity_samples: int = Field(ge=1)
    seed: int = Field(ge=0, lt=2**63)

    @model_validator(mode="after")
    def _consistent(self) -> "DiffusionRefinerConfig":
        if self.prediction_type == "epsilon":
            raise ValueError("prediction_type 'epsilon' is refused: few-step sampling with epsilon-prediction blows up "
                             "(an untrained 4-step epsilon sampler reached +-9e4, v- and x0-prediction stayed within "
                             "+-4; issue #12); use v_prediction or sample")
        if not self.block_out_channels:
            raise ValueError("block_out_channels needs at least one width")
        odd = [c for c in self.block_out_channels if c % self.norm_groups]
        if odd:
            raise ValueError(f"block_out_channels {odd} are not multiples of norm_groups {self.norm_groups}")
        if self.sampling_steps > self.train_timesteps:
            raise ValueError(f"sampling_steps {self.sampling_steps} exceeds train_timesteps {self.train_timesteps}")
        return self

    @property
    def size_multiple(self) -> int:
        """Image sides the UNet needs: the unshuffle factor times one halving per extra level."""
        return self.unshuffle * 2 ** (len(self.block_out_channels) - 1)


class ControlNetSDConfig(_Strict):
    """Stable Diffusion 1.5 + ControlNet from local weights (deblur.models.diffusion.controlnet_sd)."""

    weights_dir: str | None             # diffusers-format SD 1.5 directory; None: the model cannot be built
    controlnet_dir: str | None          # None: a ControlNet initialised from the UNet
    conditioning: Literal["blurred", "blurred_and_estimate"]
    predictor: str | None               # checkpoint path or models:/ URI of the first estimate; None: the blurred input
    prompt: str
    negative_prompt: str
    strength: float = Field(gt=0, le=1)
    steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=1)
    seed: int = Field(ge=0, lt=2**63)
    train_parts: Literal["controlnet", "lora", "both"]
    lora_rank: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    noise_loss: float = Field(ge=0)
    l1: float = Field(ge=0)
    mse: float = Field(ge=0)
    gradient: float = Field(ge=0)
    perceptual: float = Field(ge=0)
    perceptual_backbone: str | None
    perceptual_net: Literal["alex", "vgg"]
    colour_fix: Literal["wavelet", "adain", "none"]
    vae_tiling: bool

    @model_validator(mode="after")
    def _consistent(self) -> "ControlNetSDConfig":
        if self.perceptual > 0 and self.perceptual_backbone is None:
            raise ValueError("perceptual > 0 needs perceptual_backbone (a local LPIPS backbone file); or set perceptual: 0")
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"steps * strength = {self.steps * self.strength:g} runs no denoising step; raise steps or strength")
        if self.noise_loss + self.l1 + self.mse + self.gradient + self.perceptual <= 0:
            raise ValueError("at least one of noise_loss, l1, mse, gradient, perceptual must be > 0")
        return self


class ModelConfig(_Strict):
    name: Literal["unet", "nafnet", "stacked_conv", "diffusion_refiner", "controlnet_sd"]
    unet: UNetConfig
    nafnet: NAFNetConfig
    stacked_conv: StackedConvConfig
    diffusion_refiner: DiffusionRefinerConfig
    controlnet_sd: ControlNetSDConfig

    def arch_kwargs(self) -> dict:
        """Keyword arguments of the selected architecture."""
        return getattr(self, self.name).model_dump()


class LossConfig(_Strict):
    charbonnier: float = Field(ge=0)
    ms_ssim: float = Field(ge=0)
    l1: float = Field(ge=0)
    mse: float = Field(ge=0)
    psnr: float = Field(ge=0)
    fft: float = Field(ge=0)
    edge: float = Field(ge=0)
    charbonnier_eps: float = Field(gt=0)
    ms_ssim_min_side: int = Field(ge=161)  # MS-SSIM with an 11-px window needs a side > 160

    def weights(self) -> dict[str, float]:
        """Non-zero component weights by component name."""
        names = ("charbonnier", "ms_ssim", "l1", "mse", "psnr", "fft", "edge")
        return {n: getattr(self, n) for n in names if getattr(self, n) > 0}

    @model_validator(mode="after")
    def _some_weight(self) -> "LossConfig":
        if not self.weights():
            raise ValueError("at least one loss weight must be > 0")
        return self


class LoRAConfig(_Strict):
    """``train.lora``: train only a low-rank adapter on top of ``train.init_from`` (deblur.models.lora)."""

    rank: int = Field(ge=0)                # 0: off (full fine-tune)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(min_length=1)


class TrainConfig(_Strict):
    source: Literal["pairs", "on_the_fly"]
    identity_fraction: float = Field(ge=0, le=1)
    patch_size: int = Field(ge=16)
    batch_size: int = Field(ge=1)
    max_steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float]
    eta_min: float = Field(ge=0)
    grad_clip: float = Field(gt=0)
    val_every: int = Field(ge=1)
    early_stop_patience: int = Field(ge=0)
    on_nonfinite: Literal["stop", "skip"]
    init_from: str | None
    num_workers: int = Field(ge=0)
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["bf16", "fp16", "fp32"]
    channels_last: bool
    compile: bool
    cpu_threads: int = Field(ge=0)
    deterministic: bool
    log_every: int = Field(ge=1)
    val_max_images: int = Field(ge=1)
    lora: LoRAConfig

    @model_validator(mode="after")
    def _lora_has_base(self) -> "TrainConfig":
        if self.lora.rank > 0 and not self.init_from:
            raise ValueError(f"lora.rank is {self.lora.rank} but init_from is empty: a LoRA adapter adapts an "
                             "existing model; set train.init_from to its checkpoint or models:/<name>@<alias>")
        return self


class TilingConfig(_Strict):
    tile_size: int = Field(ge=16)
    overlap: int = Field(ge=0)
    batch_size: int = Field(ge=1)

    @model_validator(mode="after")
    def _overlap_fits(self) -> "TilingConfig":
        check_overlap(self.tile_size, self.overlap)
        return self


class LpipsConfig(_Strict):
    net: Literal["alex", "vgg"]
    backbone: str | None           # torchvision alexnet/vgg16 state dict (.pth); None: LPIPS unavailable
    linear: str | None             # the lpips package's linear heads (.pth); None: uncalibrated equal weights


class EvaluateConfig(_Strict):
    max_images: int = Field(ge=0)
    sharp_in_images: int = Field(ge=0)
    classical_baseline: Literal["richardson_lucy", "wiener", "none"]
    rl_iterations: int = Field(ge=1)
    triptychs: int = Field(ge=0)
    lpips: LpipsConfig


class RegisterConfig(_Strict):
    """The registered model's name and the promotion gate's thresholds (deblur.evaluation.gate takes this as is)."""

    model_name: str
    margin_db: float = Field(ge=0, allow_inf_nan=False)
    confidence: float = Field(gt=0, lt=1)
    bootstrap_samples: int
    min_gain_over_input_db: float = Field(allow_inf_nan=False)
    min_pairs_per_blur_type: int = Field(ge=1)
    min_sharp_in_psnr: float = Field(allow_inf_nan=False)

    @field_validator("bootstrap_samples")
    @classmethod
    def _enough_samples(cls, v: int) -> int:
        if v < 100:
            raise ValueError(f"bootstrap samples must be at least 100, got {v}")
        return v


class KernelAwareConfig(_Strict):
    """Thorough mode (deblur.psf.restore): blind PSF estimate, deconvolution, evidence-based choice."""

    default_mode: Literal["fast", "thorough"]
    max_kernel_size: int = Field(ge=3, le=255)
    crop_size: int = Field(ge=64, le=1024)
    crops: int = Field(ge=1, le=8)
    network_latent: bool
    min_confidence: float = Field(ge=0.0, le=1.0)
    max_overshoot: float = Field(ge=0.0, le=1.0)
    min_network_agreement: float | None = Field(default=None, ge=-1.0, le=1.0)   # None: check off
    sharp_support: int = Field(ge=1)
    half_scale_from: int = Field(ge=1)
    quarter_scale_from: int = Field(ge=1)
    min_side: int = Field(ge=32)
    # share of the deconvolution in the kernel result, the rest the network at 1/2 scale (deblur.psf.restore);
    # 1.0: the deconvolution alone, as artifacts exported before this setting serve
    kernel_weight: float = Field(default=1.0, gt=0.0, le=1.0)
    # 8-bit levels: the chosen result's change to the input is shrunk by this much of the blur's own size
    # (deblur.psf.restore.shrink_weight); 0: off, as artifacts exported before this setting serve
    input_shrink: float = Field(default=0.0, ge=0.0, le=64.0)

    @field_validator("max_kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"must be odd (a PSF's centre pixel is its origin), got {v}")
        return v

    @model_validator(mode="after")
    def _scales_in_order(self) -> "KernelAwareConfig":
        if not self.half_scale_from <= self.quarter_scale_from:
            raise ValueError(f"half_scale_from {self.half_scale_from} must not exceed quarter_scale_from "
                             f"{self.quarter_scale_from}")
        return self


class ServingConfig(_Strict):
    max_body_mb: float = Field(gt=0)
    max_pixels: int = Field(ge=1)
    min_side: int = Field(ge=1)
    max_side: int = Field(ge=1)
    threads: int = Field(ge=1)
    inference_slots: int = Field(ge=1)
    max_waiting: int = Field(ge=0)
    max_request_seconds: float = Field(gt=0)
    tile_size_range: tuple[int, int]
    overlap_range: tuple[int, int]
    weights_dtype: Literal["fp32", "fp16"]
    output_quality: int = Field(ge=1, le=100)
    refiner_steps_range: tuple[int, int]
    runtime: Literal["torch", "onnx"]
    max_buffered_mb: float = Field(gt=0)
    header_timeout_seconds: float = Field(gt=0)
    body_timeout_seconds: float = Field(gt=0)
    shutdown_grace_seconds: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "ServingConfig":
        for name in ("tile_size_range", "overlap_range", "refiner_steps_range"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be [low, high] with 0 <= low <= high, got [{low}, {high}]")
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is larger than max_side {self.max_side}")
        if self.refiner_steps_range[0] < 1:
            raise ValueError(f"refiner_steps_range starts below 1 ({self.refiner_steps_range[0]})")
        if self.tile_size_range[0] < 16:
            raise ValueError(f"tile_size_range starts below 16 ({self.tile_size_range[0]})")
        return self


class Params(_Strict):
    seed: int
    tracking: TrackingConfig
    ingest: IngestConfig
    synthesize: SynthesizeConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    tiling: TilingConfig
    evaluate: EvaluateConfig
    registration: RegisterConfig = Field(alias="register")  # "register" would shadow BaseModel.register
    serving: ServingConfig
    kernel_aware: KernelAwareConfig

    @model_validator(mode="after")
    def _refiner_fits(self) -> "Params":
        # read through __dict__: validating is not a stage reading these sections (tests/core/test_stage_spec.py)
        model, serving, tiling = (self.__dict__[k] for k in ("model", "serving", "tiling"))
        if model.name != "diffusion_refiner":
            return self
        refiner, (low, high) = model.diffusion_refiner, serving.refiner_steps_range
        if not low <= refiner.sampling_steps <= high:
            raise ValueError(f"model.diffusion_refiner.sampling_steps {refiner.sampling_steps} is outside "
                             f"serving.refiner_steps_range [{low}, {high}]")
        if tiling.tile_size % refiner.size_multiple:
            raise ValueError(f"tiling.tile_size {tiling.tile_size} is not a multiple of {refiner.size_multiple} "
                             f"(model.diffusion_refiner: unshuffle {refiner.unshuffle} x 2^(levels - 1)), "
                             "so refiner tiles would not sit on the UNet's grid")
        return self

    def digest(self) -> str:
        """Short stable hash of the whole resolved config."""
        blob = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def flat(self) -> dict[str, str]:
        """Dotted ``section.key -> value`` pairs, for MLflow params."""
        return {key: json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
                for key, value in flatten_dotted(self.model_dump(mode="json", by_alias=True)).items()}


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read and validate ``path``; ``overrides`` maps dotted keys to values (tests, CLI).

    A file may start with ``extends: <file>`` (relative to itself): it then holds only the
    keys that differ, deep-merged over that base, so a profile never repeats a value.
    """
    raw = _read_layered(Path(path), seen=())
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return params_from_dict(raw, source=str(path))


def _read_yaml_mapping(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: parameter file not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def _read_layered(path: Path, seen: tuple[Path, ...]) -> dict:
    """``path``'s mapping, merged over the chain of files it ``extends``."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{path}: 'extends' loops back on itself ({chain})")
    raw = _read_yaml_mapping(path)
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'extends' must be a file path, got {base!r}")
    merged = _read_layered(path.parent / base, (*seen, resolved))
    _deep_merge(merged, raw, str(path))
    return merged


def _deep_merge(base: dict, overlay: dict, source: str, prefix: str = "") -> None:
    """Overlay ``overlay`` onto ``base`` in place; mappings merge key by key, other values replace."""
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value, source, f"{dotted}.")
        elif isinstance(base.get(key), dict):
            raise ConfigError(f"{source}: {dotted}: a section in the base file cannot be replaced by a value")
        else:
            base[key] = value


def flatten_dotted(tree: dict, prefix: str = "") -> dict:
    """Nested mappings as dotted keys, ``{"a": {"b": 1}} -> {"a.b": 1}``; values are kept as they are
    and an empty mapping leaves no key (the inverse of ``set_dotted``)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_dotted(raw: dict, dotted: str, value) -> None:
    """Set ``a.b.c`` in a nested dict; the parent keys must exist."""
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"override {dotted!r}: no section {key!r}")
        node = node[key]
    node[leaf] = value


def params_from_dict(raw: dict, source: str = "<dict>") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"  {key}: {msg}")
        raise ConfigError(f"{source}: invalid parameters\n" + "\n".join(lines)) from None
