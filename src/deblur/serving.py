"""The serving artifact: what the register stage exports and the HTTP service loads.

A serving artifact is a folder with two files, written together atomically:

- ``model.pt``: ``model_config``, ``state_dict`` (fp32 or fp16, per ``serving.weights_dtype``),
  ``train_patch_size`` and ``step``: a minimal checkpoint that ``deblur.checkpoints`` loads.
- ``model.json``: the caller's metadata (registered name, version, alias, run id, metrics)
  plus what the service needs without reading params.yaml: the ``tiling`` and ``serving``
  sections as they were at export, the architecture and a hash of the weights file.

Loading one needs torch and this package only, never MLflow. ``load_from_model_uri`` is the
one path that talks to an MLflow registry; it imports mlflow when called.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deblur.artifact import (  # noqa: F401  (re-exported: the artifact's names live in deblur.artifact)
    DEFAULT_MODEL_DIR,
    FORMAT_VERSION,
    META_FILE,
    UNREGISTERED,
    ServedModelInfo,
    WEIGHTS_FILE,
    ServingError,
    read_artifact_meta,
    sha256_file,
)
from deblur.checkpoints import CheckpointError, load_checkpoint, model_from_checkpoint
from deblur.config import KernelAwareConfig, ServingConfig, TilingConfig
from deblur.imageio import DecodedImage, decode_image, encode_image
from deblur.speed import PRIOR_KEY, measure_speed_prior
from deblur.tiling import BatchCallback, deblur_array


@dataclass
class ServingModel(ServedModelInfo):
    """A model ready for CPU inference, with the metadata the service reports."""

    model: torch.nn.Module
    meta: dict
    tiling: TilingConfig
    load_seconds: float = 0.0
    source: str = ""

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def samples(self) -> bool:
        """True for a diffusion refiner: its output depends on a seed and a number of steps."""
        return bool(getattr(self.model, "tiles_itself", False))

    def sampling_for(self, seed: int | None = None, steps: int | None = None) -> dict[str, int]:
        """A refiner's seed and steps for one call: the given ones, else the model's defaults."""
        default_steps = getattr(self.model, "sampling_steps", None) or getattr(self.model, "steps", None)
        return {"seed": self.model.seed if seed is None else int(seed),
                "steps": default_steps if steps is None else int(steps)}

    def deblur(self, image: DecodedImage | np.ndarray, tile_size: int | None = None,
               overlap: int | None = None, sampling: dict[str, int] | None = None,
               on_batch: BatchCallback | None = None) -> np.ndarray:
        """Deblur an HxWx3 uint8 RGB array (or a DecodedImage's RGB); alpha is the caller's.
        ``sampling`` (seed, steps) is for a diffusion refiner only; ``on_batch``: see deblur.tiling."""
        rgb = image.rgb if isinstance(image, DecodedImage) else image
        return deblur_array(self.model, rgb, self.tiling_for(tile_size, overlap), sampling=sampling, on_batch=on_batch)


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
    """Write ``out_dir/model.pt`` and ``out_dir/model.json`` from a checkpoint; replaces ``out_dir`` whole.

    ``meta`` is free-form JSON (``name`` or ``model_name``, version, alias, run_id, metrics,
    ...); the keys this function writes itself (format_version, architecture, tiling,
    serving, ...) win. ``onnx`` (default: ``serving.runtime == "onnx"``) also writes
    ``model.onnx`` (deblur.onnx_runtime) for the architectures that have an ONNX form.
    ``kernel_aware`` (params.yaml's section) gives the thorough mode's settings and the default mode.
    """
    ckpt = load_checkpoint(checkpoint_path)
    if ckpt.get("lora"):   # a LoRA run is served merged: plain layers, no adapter overhead (deblur.lora)
        from deblur.lora import merged_checkpoint

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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    staging.chmod(0o755)
    try:
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
            from deblur.onnx_runtime import add_onnx_model

            add_onnx_model(staging, full_meta, tiling, serving)
        (staging / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def measure_torch_speed(weights: Path, tiling: TilingConfig, serving: ServingConfig) -> dict:
    """``{"torch": prior}``: a few tile batches of the exported weights timed on this machine with
    ``serving.threads`` (deblur.speed.measure_speed_prior); empty for a model that tiles itself."""
    model = _model_or_serving_error(weights)
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


def load_serving_model(model_dir: str | Path, threads: int | None = None) -> ServingModel:
    """Load a serving artifact onto the CPU in eval mode; sets torch's thread count."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    meta = read_artifact_meta(model_dir)
    torch.set_num_threads(threads or int(meta["serving"]["threads"]))
    model = _model_or_serving_error(model_dir / WEIGHTS_FILE)
    return ServingModel(
        model=model,
        meta=meta,
        tiling=TilingConfig.model_validate(meta["tiling"]),
        load_seconds=time.perf_counter() - started,
        source=str(model_dir),
    )


def load_from_model_uri(uri: str, tiling: TilingConfig | None, threads: int) -> ServingModel:
    """Load the checkpoint inside a registered model (``models:/<name>@<alias>`` or ``models:/<name>/<version>``).

    Downloads the model's artifacts with MLflow (``MLFLOW_TRACKING_URI``) and loads the one
    ``*.pt`` file among them; a LoRA adapter version (no ``*.pt``, an ``adapter_config.json``)
    loads its base version from the registry with the adapter merged in (deblur.lora). ``tiling`` is used unless the pyfunc was logged with its own
    (``model_config={"tiling": ...}``, see deblur.mlflow_model); with None the model must carry one.
    """
    import mlflow
    import yaml

    started = time.perf_counter()
    name, alias, version = _parse_models_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    weights = sorted(local.rglob("*.pt"))
    adapters = sorted(local.rglob("adapter_config.json"))
    if len(weights) != 1 and not (adapters and not weights):
        raise ServingError(f"{uri}: expected one *.pt checkpoint among the model's artifacts, found {len(weights)}")
    client = mlflow.MlflowClient()
    registered = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        logged = flavor.get("config") or {}
        if "tiling" in logged:
            tiling = TilingConfig.model_validate(logged["tiling"])
    if tiling is None:
        raise ServingError(f"{uri}: the model was logged without a tiling; give one (a params.yaml with a tiling section)")
    torch.set_num_threads(threads)
    meta = {"name": name, "alias": alias, "version": registered.version, "run_id": registered.run_id,
            "architecture": None, "tiling": tiling.model_dump()}
    if weights:
        model = _model_or_serving_error(weights[0])
    else:   # a LoRA adapter version: its base version from the registry, the adapter merged in
        from deblur.lora import LoraError, load_adapter_model

        try:
            model, base = load_adapter_model(adapters[0].parent)
        except (LoraError, FileNotFoundError, CheckpointError) as err:
            raise ServingError(f"{uri}: cannot load the LoRA adapter's base model ({err})") from err
        meta["base_model_uri"] = base["uri"]
    meta["architecture"] = type(model).__name__
    return ServingModel(model=model, meta=meta, tiling=tiling,
                        load_seconds=time.perf_counter() - started, source=uri)


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if not match:
        raise ServingError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return match.group(1), match.group(2), match.group(3)


def _model_or_serving_error(weights: Path) -> torch.nn.Module:
    try:
        return model_from_checkpoint(weights)
    except (CheckpointError, KeyError, RuntimeError, ValueError) as err:
        raise ServingError(f"{weights}: cannot build the model ({type(err).__name__}: {err})") from err


def _replace_dir(staging: Path, target: Path) -> None:
    """Swap ``staging`` in as ``target``; the old folder (if any) is removed after the swap."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old)
