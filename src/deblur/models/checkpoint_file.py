"""Checkpoint files: what they hold, reading and atomic writing (rebuilding the model: ``deblur.models.factory``).

A checkpoint is a dict saved by ``torch.save`` with at least:
``model_config`` (ModelConfig as a dict), ``state_dict``, ``train_patch_size`` and ``step``.
Training checkpoints add ``optimizer``, ``scheduler``, ``rng``, ``best_psnr`` and
``params_digest``. Imported checkpoints (``deblur.models.official``) add ``origin`` and record in
``model_config`` only ``name`` and the section of their architecture.

``load_checkpoint`` also reads official NAFNet files (BasicSR layout, ``params`` /
``params_ema``), converted on the fly, and brings every ``model_config`` up to date
(``upgrade_model_config``), so checkpoints written before a config field existed keep loading
as they were trained.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from deblur.core.config import (ControlNetSDConfig, DiffusionRefinerConfig, ModelConfig, NAFNetConfig, StackedConvConfig, UNetConfig)
from deblur.core.errors import CheckpointError
from deblur.core.files import write_atomically
from deblur.models import official


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, then rename: never a half-written file.

    Saved through a file object: torch names the zip archive inside after the file it is given by
    name, which here is a random temporary name, so the same checkpoint came out as different bytes
    (and a different DVC hash) on every run; through a file object the name is always ``archive``."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    write_atomically(path, write)


def upgrade_model_config(raw: dict) -> dict:
    """A checkpoint's ``model_config`` dict with the fields added since it was written, set to
    what the code did before they existed (a new dict; ``raw`` is left alone):

    - ``nafnet.padding`` (added with official-weight imports): ``reflect``, the only padding before.
    """
    out = dict(raw)
    if isinstance(out.get("nafnet"), dict) and "padding" not in out["nafnet"]:
        out["nafnet"] = {**out["nafnet"], "padding": "reflect"}
    return out


class CheckpointModelConfig(BaseModel):
    """A checkpoint's architecture: ``name`` and its section. Checkpoints written by training
    hold every section of ``ModelConfig`` (the others unused); imported ones hold only their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    unet: UNetConfig | None = None
    nafnet: NAFNetConfig | None = None
    stacked_conv: StackedConvConfig | None = None
    diffusion_refiner: DiffusionRefinerConfig | None = None
    controlnet_sd: ControlNetSDConfig | None = None

    @model_validator(mode="after")
    def _section_present(self) -> "CheckpointModelConfig":
        if self.name not in ModelConfig.model_fields or self.name == "name":
            raise ValueError(f"unknown architecture {self.name!r}")
        if getattr(self, self.name) is None:
            raise ValueError(f"no {self.name!r} section")
        return self

    def arch_kwargs(self) -> dict:
        return getattr(self, self.name).model_dump()

    def describe(self) -> str:
        """One line: the architecture and its settings, e.g. ``nafnet width=32 enc_blocks=[1, 1, 1, 28] ...``."""
        return f"{self.name} " + " ".join(f"{k}={list(v) if isinstance(v, tuple) else v}"
                                          for k, v in self.arch_kwargs().items())


def checkpoint_model_config(raw: dict) -> CheckpointModelConfig:
    """Validate a checkpoint's ``model_config`` (upgraded first); CheckpointError if it is invalid."""
    try:
        return CheckpointModelConfig.model_validate(upgrade_model_config(raw))
    except ValidationError as err:
        raise CheckpointError(f"invalid model_config in checkpoint: {err}") from err


def check_architecture(raw: dict, cfg: ModelConfig) -> None:
    """RuntimeError naming both sides when a checkpoint's weights cannot initialise the model
    ``cfg`` describes: another architecture, or (NAFNet) another width, number of levels or
    more blocks in a stage than ``cfg`` has (fewer is fine: ``load_grown`` adds identities)."""
    theirs = checkpoint_model_config(raw)
    if theirs.name != cfg.name:
        raise RuntimeError(f"it holds a {theirs.name!r} model, but model.name is {cfg.name!r}")
    if cfg.name != "nafnet":
        return
    a, b = theirs.nafnet, cfg.nafnet
    stages = [(a.enc_blocks, b.enc_blocks), (a.dec_blocks, b.dec_blocks), ((a.middle_blocks,), (b.middle_blocks,))]
    if (a.width != b.width or len(a.enc_blocks) != len(b.enc_blocks)
            or any(x > y for ours, params in stages for x, y in zip(ours, params))):
        keys = ("width", "enc_blocks", "middle_blocks", "dec_blocks")
        show = lambda c: ", ".join(f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in c.model_dump().items()
                                   if k in keys)
        raise RuntimeError(f"it holds nafnet {show(a)}; model.nafnet has {show(b)}")


def read_checkpoint_file(path: str | Path, trusted: bool = False) -> dict:
    """The dict a checkpoint file holds, as saved (deblur or official layout); CheckpointError
    for a missing, unreadable or non-dict file.

    Only tensors and plain values are unpickled (``weights_only``): a checkpoint can come from a
    registry download or a colleague. ``trusted`` (a training run resuming its own ``last.pt``,
    whose optimiser and RNG states need full unpickling) lifts that.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):   # not a refused object: a file that is no checkpoint
            raise CheckpointError(f"{path}: unreadable checkpoint (UnpicklingError: {err})") from err
        raise CheckpointError(f"{path}: holds objects other than tensors and plain values, which are unpickled only "
                              "when a training run resumes its own last.pt; for inference, init_from or import, "
                              f"use a weights checkpoint such as best.pt ({_refused_global(err)})") from err
    except Exception as err:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


def _refused_global(err: Exception) -> str:
    """The object torch's weights-only unpickler refused, from its message."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    return f"it pickles {found.group(1)}" if found else "it pickles an object that is not a tensor or a plain value"


def load_checkpoint(path: str | Path, trusted: bool = False) -> dict:
    """Read a deblur checkpoint, or an official NAFNet one (converted, see ``deblur.models.official``);
    ``trusted``: see ``read_checkpoint_file``."""
    path = Path(path)
    ckpt = read_checkpoint_file(path, trusted=trusted)
    if official.is_official(ckpt):
        ckpt = official.convert(ckpt, official.Origin.of_file(path))
    missing = {"model_config", "state_dict"} - set(ckpt)
    if missing:
        found = sorted(map(str, ckpt))
        raise CheckpointError(f"{path}: not a deblur checkpoint (missing {sorted(missing)}) nor an official NAFNet "
                              f"one (no {' / '.join(official.PARAM_KEYS)}); keys found: "
                              f"{found[:10]}{' ...' if len(found) > 10 else ''}")
    return {**ckpt, "model_config": upgrade_model_config(ckpt["model_config"])}
