"""``train.init_from``: the weights a run starts from, a checkpoint file or a registered version.

A ``models:/`` source is downloaded from the registry (resolving an alias to the version it
names now); a LoRA run records that base (``BaseModelRef``) in every checkpoint it writes. A
checkpoint of a smaller model of the same architecture grows into the configured one: the new
blocks start as identities.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import nn

from deblur.core.config import ModelConfig
from deblur.models.build import fitting_checkpoints
from deblur.models.checkpoint_file import check_architecture, load_checkpoint
from deblur.models.common import load_grown
from deblur.training.errors import TrainingError


def load_init_from(model: nn.Module, source: str, model_cfg: ModelConfig, lora: bool, say: Callable[[str], None]):
    """Load ``source`` into ``model``; returns the base a LoRA run records (``BaseModelRef``), else None
    (a full fine-tune from a file records none; from a ``models:/`` URI it records the version)."""
    base_ref = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(source)
        if source.startswith("models:/"):
            # peft (deblur.models.lora, also under registry_io): imported only for LoRA and models:/ bases
            from deblur.models.lora import LoraError
            from deblur.tracking.registry_io import resolve_base

            try:
                path, base_ref = resolve_base(source, tmp)
            except (LoraError, FileNotFoundError) as err:
                raise TrainingError(str(err)) from err
        elif lora:
            from deblur.models.lora import BaseModelRef   # peft, as above

            base_ref = BaseModelRef(source=source)
        load_init_weights(model, path, model_cfg, say)
    return base_ref


def load_init_weights(model: nn.Module, path: Path, model_cfg: ModelConfig, say: Callable[[str], None]) -> None:
    ckpt = load_checkpoint(path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    name = model_cfg.name
    try:
        check_architecture(ckpt["model_config"], model_cfg)   # names both sides when they differ
        grown = load_grown(model, state)
    except RuntimeError as err:
        fits = fitting_checkpoints(model_cfg, path.parent)
        hint = (f"{', '.join(str(p) for p in fits)} fits model.{name} as configured: set train.init_from to it"
                if fits else f"no checkpoint in {path.parent} fits model.{name} as configured")
        raise TrainingError(f"train.init_from {path}: weights do not fit the model in params "
                            f"({str(err).splitlines()[0][:200]}). {hint}, or set train.init_from: null "
                            "to train from random weights") from err
    extra = f" ({len(grown)} new blocks start as identities: {', '.join(grown)})" if grown else ""
    say(f"[train] initialised weights from {path}{extra}")
