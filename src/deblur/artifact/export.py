"""Writing a serving artifact: ``model.pt`` from a checkpoint, ``model.onnx`` beside it when asked,
``model.json`` and ``runtime.json`` (the speed prior measured here, the export time, the run id:
deblur.artifact.meta.RUNTIME_FIELDS); swapped in atomically."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from deblur.artifact.meta import FORMAT_VERSION, WEIGHTS_FILE, write_artifact_meta
from deblur.artifact.onnx_model import ONNX_FILE, export_onnx, exportable, served_onnx_model
from deblur.artifact.torch_model import ServingModel, model_or_serving_error
from deblur.core.config import KernelAwareConfig, ServingConfig, TilingConfig
from deblur.core.files import atomic_directory, sha256_file
from deblur.core.imageio import decode_image, encode_image
from deblur.inference.cost_model import PRIOR_KEY, measure_speed_prior
from deblur.models.checkpoint_file import load_checkpoint

log = logging.getLogger(__name__)


def export_serving_artifact(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    meta: dict,
    *,
    tiling: TilingConfig,
    serving: ServingConfig,
    onnx: bool | None = None,
    kernel_aware: KernelAwareConfig | None = None,
) -> Path:
    """Write ``out_dir/model.pt``, ``out_dir/model.json`` and ``out_dir/runtime.json`` from a checkpoint;
    replaces ``out_dir`` whole.

    ``meta`` is free-form JSON (``name`` or ``model_name``, version, alias, run_id, metrics,
    ...); the keys this function writes itself (format_version, architecture, tiling,
    serving, ...) win. What differs on every export (``exported_at``, ``run_id``, ``speed_prior``,
    ``onnx.export_seconds``) goes to runtime.json, so the same model gives the same model.json
    (deblur.artifact.meta). ``onnx`` (default: ``serving.runtime == "onnx"``) also writes
    ``model.onnx`` (deblur.artifact.onnx_model) for the architectures that have an ONNX form.
    ``kernel_aware`` (params.yaml's section) gives the thorough mode's settings and the default mode.
    """
    ckpt = load_checkpoint(checkpoint_path)
    if ckpt.get("lora"):   # a LoRA run is served merged: plain layers, no adapter overhead (deblur.models.lora)
        from deblur.models.lora_checkpoints import merged_checkpoint  # peft: only for LoRA checkpoints

        ckpt = merged_checkpoint(ckpt)
    dtype = torch.float16 if serving.weights_dtype == "fp16" else torch.float32
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    payload = {
        "model_config": ckpt["model_config"],
        "state_dict": state,
        "train_patch_size": int(ckpt["train_patch_size"]),
        "step": ckpt.get("step"),
    }
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        torch.save(payload, staging / WEIGHTS_FILE)
        full_meta = {
            **meta,
            "format_version": FORMAT_VERSION,
            "architecture": ckpt["model_config"]["name"],
            "weights_dtype": serving.weights_dtype,
            "weights_sha256": sha256_file(staging / WEIGHTS_FILE),
            "train_patch_size": payload["train_patch_size"],
            "step": payload["step"],
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tiling": tiling.model_dump(mode="json"),
            "serving": serving.model_dump(mode="json"),
            **({"kernel_aware": kernel_aware.model_dump(mode="json")} if kernel_aware is not None else {}),
            PRIOR_KEY: measure_torch_speed(staging / WEIGHTS_FILE, tiling, serving),
        }
        if serving.runtime == "onnx" if onnx is None else onnx:
            add_onnx_model(staging, full_meta, tiling, serving)
        write_artifact_meta(staging, full_meta)
    return out_dir


def measure_torch_speed(weights: Path, tiling: TilingConfig, serving: ServingConfig) -> dict:
    """``{"torch": prior}``: a few tile batches of the exported weights timed on this machine with
    ``serving.threads`` (deblur.inference.cost_model.measure_speed_prior); empty for a model that tiles itself."""
    model = model_or_serving_error(weights)
    if getattr(model, "tiles_itself", False):
        return {}
    threads = torch.get_num_threads()
    torch.set_num_threads(serving.threads)
    try:
        prior = measure_speed_prior(ServingModel(model=model, meta={}, tiling=tiling), tiling.tile_size,
                                    tiling.overlap, int(getattr(model, "size_multiple", 1)),
                                    encode_decode=lambda rgb: png_round_trip(rgb, serving))
    finally:
        torch.set_num_threads(threads)
    return {"torch": prior.to_json()}


def png_round_trip(rgb: np.ndarray, serving: ServingConfig) -> None:
    """Encode and decode ``rgb`` as the service does for a PNG request (the per-request cost of a speed prior)."""
    decode_image(encode_image(rgb, "PNG", quality=serving.output_quality), name="speed prior",
                 max_pixels=serving.max_pixels)


def add_onnx_model(model_dir: Path, meta: dict, tiling: TilingConfig, serving: ServingConfig) -> None:
    """Export ``model_dir/model.pt`` to ``model_dir/model.onnx``, record it in ``meta["onnx"]`` and its
    speed prior in ``meta["speed_prior"]["onnx"]`` (needs torch). A torch-only architecture (the
    diffusion models) is logged and left without one: serving.runtime onnx then falls back to torch."""
    if not exportable(str(meta.get("architecture"))):
        log.warning("%s has no ONNX form: no %s exported; serving.runtime onnx falls back to torch",
                    meta.get("architecture"), ONNX_FILE)
        return
    model = model_or_serving_error(Path(model_dir) / WEIGHTS_FILE)
    meta["onnx"] = export_onnx(model, Path(model_dir) / ONNX_FILE, check_tile=tiling.tile_size)
    log.info("exported %s in %.1f s (ONNX Runtime vs torch: %s dB)", ONNX_FILE, meta["onnx"]["export_seconds"],
             meta["onnx"]["check_psnr_db"])
    served = served_onnx_model(model_dir, meta, serving.threads)
    prior = measure_speed_prior(served, tiling.tile_size, tiling.overlap, served.size_multiple,
                                encode_decode=lambda rgb: png_round_trip(rgb, serving))
    meta.setdefault(PRIOR_KEY, {})["onnx"] = prior.to_json()
