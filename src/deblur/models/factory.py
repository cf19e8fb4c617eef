"""Models from their config or their checkpoint, through the ``MODELS`` registry.

The registry is filled by ``deblur.models.build``, the one explicit list of architectures: import
models from there. This module sits below the architectures so that a model holding another
(the diffusion predictor) can rebuild it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deblur.core.config import ModelConfig
from deblur.core.errors import CheckpointError
from deblur.models.checkpoint_file import checkpoint_model_config, load_checkpoint
from deblur.models.common import MODELS


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of the architecture ``cfg.name`` selects."""
    return MODELS.get(cfg.name)(**cfg.arch_kwargs())


def configure_inference(model: nn.Module, cfg: ModelConfig, train_patch_size: int) -> nn.Module:
    """Put ``model`` in its inference form in place and return it.

    NAFNet with ``cfg.nafnet.tlc`` switches to the Test-time Local Converter (local pooling
    over ``tlc_factor * train_patch_size`` pixels); other models are unchanged. Use it on
    inference copies only (``NAFNet.use_global_pooling`` reverts). Weights go channels-last:
    oneDNN's CPU convolutions ran 10-25 % faster that way for every architecture here.
    """
    expected = MODELS.get(cfg.name)
    if not isinstance(model, expected):
        raise TypeError(f"model is a {type(model).__name__}, config says {cfg.name!r} ({expected.__name__})")
    model.prepare_inference(train_patch_size)
    return model.to(memory_format=torch.channels_last)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_from_checkpoint(ckpt: dict | str | Path, for_inference: bool = True) -> torch.nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (fp32, CPU, eval mode).

    A LoRA training checkpoint (a ``lora`` entry) gives its base with the adapter injected, or
    merged into plain layers when ``for_inference``."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    cfg = checkpoint_model_config(ckpt["model_config"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    # a model holding another one (the diffusion refiner's predictor) is shaped by its own state dict
    from_state = getattr(MODELS.get(cfg.name), "from_state_dict", None)
    model = from_state(cfg.arch_kwargs(), state) if from_state else build_model(cfg)
    lora = ckpt.get("lora")
    if lora:   # a LoRA run (deblur.models.lora): inject the adapter so its weights load; merged for inference
        from deblur.models.lora import LoraSettings, attach_adapter  # peft: imported only for LoRA checkpoints

        attach_adapter(model, LoraSettings.of(lora["settings"]))
    model.load_state_dict(state)
    if for_inference:
        if lora:
            from deblur.models.lora import merge_adapter  # peft, as above

            merge_adapter(model)
        model.eval()
        configure_inference(model, cfg, int(ckpt.get("train_patch_size", 256)))
    return model


def fitting_checkpoints(cfg: ModelConfig, folder: str | Path) -> list[Path]:
    """Checkpoints in ``folder`` whose weights load into the model ``cfg`` describes."""
    shapes = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    fits = []
    for path in sorted(Path(folder).glob("*.pt")):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError:
            continue
        theirs = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
        if ckpt["model_config"].get("name") == cfg.name and theirs == shapes:
            fits.append(path)
    return fits
