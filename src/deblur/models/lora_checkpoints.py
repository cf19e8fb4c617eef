"""LoRA training checkpoints: their model, merged into a plain checkpoint, their adapter written out."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from deblur.models.checkpoint_file import load_checkpoint
from deblur.models.factory import model_from_checkpoint
from deblur.models.lora import (BASE_FILE, LoraSettings, load_adapter, merge_adapter, read_base, read_settings,
                                save_adapter)


def lora_checkpoint_model(ckpt: dict) -> nn.Module:
    """The model of a LoRA training checkpoint, adapter injected and weights loaded (train mode, fp32)."""
    return model_from_checkpoint(ckpt, for_inference=False)


def merged_checkpoint(ckpt: dict) -> dict:
    """A plain checkpoint (no adapter) with the same outputs as the LoRA checkpoint ``ckpt``."""
    model = merge_adapter(lora_checkpoint_model(ckpt))
    plain = {k: v for k, v in ckpt.items() if k not in ("lora", "state_dict", "optimizer", "scheduler", "scaler",
                                                           "rng", "best_checkpoint", "history")}
    return {**plain, "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "merged_lora": ckpt["lora"]}


def adapter_from_checkpoint(ckpt: dict, out_dir: str | Path) -> Path:
    """Write the adapter of a LoRA training checkpoint in peft's layout (+ ``lora_base.json``)."""
    base = {**ckpt["lora"]["base"], "model_config": ckpt["model_config"],
            "train_patch_size": int(ckpt["train_patch_size"]), "step": ckpt.get("step")}
    return save_adapter(lora_checkpoint_model(ckpt), LoraSettings.of(ckpt["lora"]["settings"]), out_dir, base)


def merge_into_checkpoint(adapter_dir: str | Path, base_checkpoint: str | Path) -> dict:
    """Base checkpoint + adapter folder -> a plain checkpoint dict (``deblur merge-lora``)."""
    base = load_checkpoint(base_checkpoint)
    model = model_from_checkpoint(base, for_inference=False)
    merge_adapter(load_adapter(model, adapter_dir))
    meta = read_base(adapter_dir) if (Path(adapter_dir) / BASE_FILE).is_file() else {}
    return {"model_config": base["model_config"], "state_dict": model.state_dict(),
            "train_patch_size": int(meta.get("train_patch_size") or base.get("train_patch_size", 256)),
            "step": meta.get("step", base.get("step")),
            "merged_lora": {"settings": read_settings(adapter_dir).as_dict(),
                            "base": {k: v for k, v in meta.items() if k != "model_config"} or
                            {"source": str(base_checkpoint)}}}
