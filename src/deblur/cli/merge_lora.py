"""``deblur merge-lora``: an adapter merged into its base, saved as a plain checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path

from deblur.models.checkpoint_file import load_checkpoint, save_atomic
from deblur.models.lora import CONFIG_FILE, LoraError, read_base
from deblur.models.lora_checkpoints import adapter_from_checkpoint, merge_into_checkpoint, merged_checkpoint
from deblur.tracking.registry_io import download_model, download_model_checkpoint


def merge_command(adapter: str, base: str | None, out: str | Path) -> Path:
    """``deblur merge-lora``: an adapter (registry URI, folder or LoRA training checkpoint) merged
    into its base (``base``, or the one the adapter names) and saved as a plain checkpoint ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if adapter.startswith("models:/"):
            local = download_model(adapter, tmp / "adapter")
            configs = sorted(local.rglob(CONFIG_FILE))
            if not configs:
                raise LoraError(f"{adapter}: not a LoRA adapter version ({CONFIG_FILE} not among its artifacts)")
            adapter_dir = configs[0].parent
        elif Path(adapter).is_file():
            ckpt = load_checkpoint(adapter)
            if not ckpt.get("lora"):
                raise LoraError(f"{adapter}: not a LoRA training checkpoint (no 'lora' entry)")
            if base is None:
                merged = merged_checkpoint(ckpt)   # it holds its base's weights too
                save_atomic(merged, out)
                print(f"[merge-lora] wrote {out} ({ckpt['lora']['base']['uri']} + adapter, merged)")
                return Path(out)
            adapter_dir = adapter_from_checkpoint(ckpt, tmp / "adapter")
        else:
            adapter_dir = Path(adapter)
        base = base or read_base(adapter_dir)["uri"]
        base_file = download_model_checkpoint(base, tmp / "base") if base.startswith("models:/") else Path(base)
        merged = merge_into_checkpoint(adapter_dir, base_file)
        save_atomic(merged, out)
    print(f"[merge-lora] wrote {out} ({base} + {adapter}, merged)")
    return Path(out)
