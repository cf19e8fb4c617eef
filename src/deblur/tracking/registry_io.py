"""The model registry: ``models:/`` URIs and downloading a registered version's checkpoint (a LoRA
adapter version comes with its base merged in)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from torch import nn

from deblur.models.checkpoint_file import save_atomic
from deblur.models.factory import model_from_checkpoint
from deblur.models.lora import CONFIG_FILE, BaseModelRef, LoraError, read_base
from deblur.models.lora_checkpoints import merge_into_checkpoint
from deblur.tracking.runs import _mlflow


class RegistryError(LoraError):
    """A malformed ``models:/`` URI."""


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if not match:
        raise RegistryError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return match.group(1), match.group(2), match.group(3)


def registered_version(uri: str):
    """The ModelVersion a ``models:/`` URI names (its alias resolved)."""
    name, alias, version = parse_models_uri(uri)
    client = _mlflow().MlflowClient()
    return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)


def download_model(uri: str, dest: str | Path | None = None) -> Path:
    """The folder holding a registered (or logged) model's files, downloaded."""
    return Path(_mlflow().artifacts.download_artifacts(artifact_uri=uri, dst_path=None if dest is None else str(dest)))


def download_model_checkpoint(model_uri: str, dest: str | Path) -> Path:
    """A checkpoint file for a registered version: its ``*.pt``, or for an adapter version its
    base (fetched from the registry) with the adapter merged, written to ``dest/merged.pt``."""
    dest = Path(dest)
    local = download_model(model_uri, dest / "model")
    found = sorted(local.rglob("*.pt"))
    if found:
        return found[0]
    configs = sorted(local.rglob(CONFIG_FILE))
    if not configs:
        raise FileNotFoundError(f"{model_uri}: neither a checkpoint (*.pt) nor a LoRA adapter ({CONFIG_FILE}) "
                                "among the model's artifacts")
    adapter_dir = configs[0].parent
    base_uri = read_base(adapter_dir)["uri"]
    if not base_uri.startswith("models:/"):
        raise LoraError(f"{model_uri}: its base {base_uri} is a file, not a registered version; merge it with "
                        "`deblur merge-lora --base <that file>`")
    base_file = download_model_checkpoint(base_uri, dest / "base")
    merged = merge_into_checkpoint(adapter_dir, base_file)
    save_atomic(merged, dest / "merged.pt")
    return dest / "merged.pt"


def resolve_base(init_from: str, dest: str | Path) -> tuple[Path, BaseModelRef]:
    """``train.init_from`` as a local checkpoint file and a reference to it: a path, or a
    registered version (``models:/name@alias`` resolved to its version number, then downloaded)."""
    if not init_from.startswith("models:/"):
        path = Path(init_from)
        if not path.is_file():
            raise LoraError(f"train.init_from {init_from}: checkpoint not found")
        return path, BaseModelRef(source=init_from)
    name, _, _ = parse_models_uri(init_from)
    try:
        registered = registered_version(init_from)
    except Exception as err:   # MlflowException: no such model, alias or version
        raise LoraError(f"train.init_from {init_from}: not in the registry ({err})") from err
    ref = BaseModelRef(source=init_from, name=name, version=str(registered.version))
    return download_model_checkpoint(ref.uri, dest), ref


def load_adapter_model(adapter_dir: str | Path) -> tuple[nn.Module, dict]:
    """An adapter folder's base (fetched from the registry) with the adapter merged, ready for
    inference, and its ``lora_base.json``."""
    base = read_base(adapter_dir)
    if not str(base.get("uri", "")).startswith("models:/"):
        raise LoraError(f"{adapter_dir}: its base {base.get('uri')} is not a registered version; "
                        "merge it with `deblur merge-lora --base <that file>`")
    with tempfile.TemporaryDirectory() as tmp:
        merged = merge_into_checkpoint(adapter_dir, download_model_checkpoint(base["uri"], tmp))
    return model_from_checkpoint(merged), base

