"""Checkpoint files: atomic writes, and rebuilding a model from what a checkpoint holds.

A checkpoint is a dict saved by ``torch.save`` with at least:
``model_config`` (ModelConfig as a dict), ``state_dict``, ``train_patch_size`` and ``step``.
Training checkpoints add ``optimizer``, ``scheduler``, ``rng``, ``best_psnr`` and
``params_digest``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from deblur.config import ModelConfig
from deblur.errors import DeblurError


class CheckpointError(DeblurError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    missing = {"model_config", "state_dict"} - set(ckpt)
    if missing:
        raise CheckpointError(f"{path}: not a deblur checkpoint (missing {sorted(missing)})")
    return ckpt


def model_from_checkpoint(ckpt: dict | str | Path, for_inference: bool = True) -> torch.nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (fp32, CPU, eval mode)."""
    from deblur.models import build_model, configure_inference

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    cfg = ModelConfig.model_validate(ckpt["model_config"])
    model = build_model(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)
    if for_inference:
        model.eval()
        configure_inference(model, cfg, int(ckpt.get("train_patch_size", 256)))
    return model


def fitting_checkpoints(cfg: ModelConfig, folder: str | Path) -> list[Path]:
    """Checkpoints in ``folder`` whose weights load into the model ``cfg`` describes."""
    from deblur.models import build_model

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
