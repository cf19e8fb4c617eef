"""The serving artifact's files and metadata, readable without torch (deblur.artifact.torch_model builds and loads it).

A serving artifact is a folder with ``model.json`` (metadata: tiling and serving settings at
export, architecture, weights hash, ...) and the weights (``model.pt``; see deblur.artifact.torch_model).
"""

from __future__ import annotations

import json
from pathlib import Path

from deblur.core.config import TilingConfig
from deblur.core.stage_spec import DEFAULT_MODEL_DIR  # noqa: F401 (the artifact's default folder, named there once)

WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"
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


class ServingError(RuntimeError):
    """A serving artifact or registry model is missing or cannot be loaded; the message says which."""


def read_artifact_meta(model_dir: str | Path) -> dict:
    """The parsed ``model.json`` of a serving artifact (cheap: no weights are read)."""
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
    return meta


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
