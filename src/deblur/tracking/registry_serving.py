"""A registered version served straight from the registry (``deblur predict --model models:/...``,
the service's ``--model-uri``), without exporting a serving artifact first."""

from __future__ import annotations

import time

import torch
import yaml

from deblur.artifact.meta import ServingError
from deblur.artifact.torch_model import ServingModel, model_or_serving_error
from deblur.core.config import TilingConfig
from deblur.core.errors import CheckpointError
from deblur.models.lora import LoraError
from deblur.tracking.registry_io import (RegistryError, download_model, load_adapter_model, parse_models_uri,
                                         registered_version)


def load_from_model_uri(uri: str, tiling: TilingConfig | None, threads: int) -> ServingModel:
    """Load the checkpoint inside a registered model (``models:/<name>@<alias>`` or ``models:/<name>/<version>``).

    Downloads the model's artifacts with MLflow (``MLFLOW_TRACKING_URI``) and loads the one
    ``*.pt`` file among them; a LoRA adapter version (no ``*.pt``, an ``adapter_config.json``)
    loads its base version from the registry with the adapter merged in (deblur.models.lora). ``tiling`` is used unless the pyfunc was logged with its own
    (``model_config={"tiling": ...}``, see deblur.tracking.pyfunc); with None the model must carry one.
    """
    started = time.perf_counter()
    try:
        name, alias, _ = parse_models_uri(uri)
    except RegistryError as err:
        raise ServingError(str(err)) from err
    local = download_model(uri)
    weights = sorted(local.rglob("*.pt"))
    adapters = sorted(local.rglob("adapter_config.json"))
    if len(weights) != 1 and not (adapters and not weights):
        raise ServingError(f"{uri}: expected one *.pt checkpoint among the model's artifacts, found {len(weights)}")
    registered = registered_version(uri)
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
        model = model_or_serving_error(weights[0])
    else:   # a LoRA adapter version: its base version from the registry, the adapter merged in
        try:
            model, base = load_adapter_model(adapters[0].parent)
        except (LoraError, FileNotFoundError, CheckpointError) as err:
            raise ServingError(f"{uri}: cannot load the LoRA adapter's base model ({err})") from err
        meta["base_model_uri"] = base["uri"]
    meta["architecture"] = type(model).__name__
    return ServingModel(model=model, meta=meta, tiling=tiling,
                        load_seconds=time.perf_counter() - started, source=uri)
