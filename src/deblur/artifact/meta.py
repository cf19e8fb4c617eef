"""The serving artifact's files and metadata, readable without torch (deblur.artifact.torch_model builds and loads it).

A serving artifact is a folder with ``model.json`` (metadata: tiling and serving settings at
export, architecture, weights hash, ...) and the weights (``model.pt``; see deblur.artifact.torch_model).

What differs on every export of the same model (``RUNTIME_FIELDS``: the export time, the MLflow run
id, the speed prior timed on the exporting machine, the ONNX export's duration) goes to
``runtime.json`` beside ``model.json`` instead. DVC (``.dvcignore``) and git ignore it, so
``model.json`` and the folder's DVC hash depend on the model alone: a fresh ``make demo`` writes
the committed ``dvc.lock``. ``read_artifact_meta`` merges it back; an artifact without it (a
``dvc pull``: DVC never stores it) reads as one exported before these fields existed (no run id,
the built-in speed prior).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from deblur.core.config import TilingConfig
from deblur.core.stage_spec import DEFAULT_MODEL_DIR  # noqa: F401 (the artifact's default folder, named there once)

WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"
RUNTIME_FILE = "runtime.json"
# model.json fields that differ on every export of the same model (dotted: nested), kept in RUNTIME_FILE
RUNTIME_FIELDS = ("exported_at", "run_id", "speed_prior", "onnx.export_seconds")
FORMAT_VERSION = 1
UNREGISTERED = "unregistered"
# serving settings added after format_version 1 artifacts were first exported
SERVING_DEFAULTS_OF_OLD_ARTIFACTS = {
    "refiner_steps_range": [1, 1],     # no refiner then: no steps apply
    "runtime": "torch",                # only model.pt then
    "max_buffered_mb": 640,
    "header_timeout_seconds": 10,
    "body_timeout_seconds": 120,
    "shutdown_grace_seconds": 20,
}


log = logging.getLogger(__name__)


class ServingError(RuntimeError):
    """A serving artifact or registry model is missing or cannot be loaded; the message says which."""


def split_runtime_fields(meta: dict) -> tuple[dict, dict]:
    """``meta`` as (what goes to model.json, the ``RUNTIME_FIELDS`` it holds, for runtime.json); ``meta`` is left alone."""
    kept, runtime = copy.deepcopy(meta), {}
    for dotted in RUNTIME_FIELDS:
        *parents, key = dotted.split(".")
        source = kept
        for part in parents:
            source = source.get(part) if isinstance(source, dict) else None
        if not isinstance(source, dict) or key not in source:
            continue
        target = runtime
        for part in parents:
            target = target.setdefault(part, {})
        target[key] = source.pop(key)
    return kept, runtime


def merge_runtime_fields(meta: dict, runtime: dict) -> dict:
    """``meta`` with runtime.json's fields added (nested dicts merged, runtime.json's values win); a new dict."""
    out = dict(meta)
    for key, value in runtime.items():
        out[key] = merge_runtime_fields(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def write_artifact_meta(model_dir: str | Path, meta: dict) -> None:
    """Write ``meta`` as ``model_dir/model.json`` less its ``RUNTIME_FIELDS``, which go to ``runtime.json``
    (written only when ``meta`` has any)."""
    kept, runtime = split_runtime_fields(meta)
    model_dir = Path(model_dir)
    (model_dir / META_FILE).write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")
    if runtime:
        (model_dir / RUNTIME_FILE).write_text(json.dumps(runtime, indent=2, sort_keys=True) + "\n")


def read_runtime_fields(model_dir: str | Path) -> dict:
    """``runtime.json`` of a serving artifact; ``{}`` when there is none or it is unreadable (logged): the
    model still serves, with the built-in speed prior and no run id."""
    path = Path(model_dir) / RUNTIME_FILE
    if not path.is_file():
        return {}
    try:
        runtime = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("%s: unreadable (%s); serving without it (built-in speed prior, no run id)", path, err)
        return {}
    if not isinstance(runtime, dict):
        log.warning("%s: not a JSON object; serving without it (built-in speed prior, no run id)", path)
        return {}
    return runtime


def read_artifact_meta(model_dir: str | Path) -> dict:
    """The parsed ``model.json`` of a serving artifact with its ``runtime.json`` merged in when there is one
    (cheap: no weights are read)."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise ServingError(f"{model_dir}: no serving model here ({META_FILE} not found); "
                           "export one with the register stage or set DEBLUR_MODEL_DIR")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ServingError(f"{path}: unreadable ({err})") from err
    missing = {"tiling", "serving", "format_version"} - set(meta)
    if missing:
        raise ServingError(f"{path}: not a serving artifact (missing {sorted(missing)})")
    if isinstance(meta["serving"], dict):   # exported before these settings existed: what that code did
        meta["serving"] = {**SERVING_DEFAULTS_OF_OLD_ARTIFACTS, **meta["serving"]}
    if meta["format_version"] != FORMAT_VERSION:
        raise ServingError(f"{path}: format_version {meta['format_version']}, this code reads {FORMAT_VERSION}")
    return merge_runtime_fields(meta, read_runtime_fields(model_dir))


class ServedModelInfo:
    """What every served model (torch or ONNX Runtime) reports from its ``meta`` and ``tiling``."""

    meta: dict
    tiling: TilingConfig

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.meta.get("model_name") or UNREGISTERED)

    @property
    def version(self) -> str:
        return str(self.meta.get("version") or "none")

    @property
    def alias(self) -> str:
        return str(self.meta.get("alias") or "none")

    def tiling_for(self, tile_size: int | None = None, overlap: int | None = None) -> TilingConfig:
        """The default tiling with optional overrides (validated: overlap < tile_size / 2)."""
        update = {k: v for k, v in (("tile_size", tile_size), ("overlap", overlap)) if v is not None}
        return TilingConfig.model_validate({**self.tiling.model_dump(), **update})
