"""LoRA adapters (``train.lora``): adapt a trained model to a new domain by training low-rank
updates of some of its layers, the rest frozen.

E. J. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
arXiv:2106.09685; the layers are peft's (``inject_adapter_in_model``), so this works on any
``nn.Module``: NAFNet, our U-Net, diffusers' ``UNet2DModel`` (which has no ``add_adapter``).

- ``attach_adapter`` injects an adapter (B = 0 at init, so the model's output is unchanged)
  and leaves only the adapter trainable; ``merge_adapter`` folds it back into plain layers.
- On disk an adapter is peft's layout, ``adapter_config.json`` + ``adapter_model.safetensors``,
  plus ``lora_base.json`` naming the base model (registry URI and version) and how it was trained.
- A LoRA training checkpoint holds the whole model with the adapter injected (peft's state-dict
  keys) and a ``lora`` entry: ``{"settings": ..., "base": ...}``; ``deblur.checkpoints`` rebuilds it.
- The registry gets only the adapter (``log_adapter_model``); whoever loads it fetches the base
  version named in ``lora_base.json`` and merges (``load_adapter_model``).
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow.pyfunc
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from deblur.errors import DeblurError
from deblur.mlflow_model import IMAGE_COLUMN, PIP_REQUIREMENTS, SIGNATURE, DeblurPyfunc, example_png_base64

ADAPTER_NAME = "default"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_FILE = "lora_base.json"
ADAPTABLE_LAYERS = (nn.Conv2d, nn.Linear)


class LoraError(DeblurError, ValueError):
    """An adapter cannot be attached, loaded or merged; the message says which module or file."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    @classmethod
    def of(cls, cfg) -> "LoraSettings":
        """From ``train.lora`` (deblur.config) or the dict a checkpoint stores."""
        raw = cfg if isinstance(cfg, dict) else cfg.model_dump()
        return cls(int(raw["rank"]), float(raw["alpha"]), float(raw["dropout"]), tuple(raw["target_modules"]))

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), init_lora_weights=True)

    def as_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}


@dataclass(frozen=True)
class BaseModelRef:
    """The model an adapter was trained on: ``train.init_from`` as given, and its registry version if any."""

    source: str
    name: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else self.source

    def as_dict(self) -> dict:
        return {"source": self.source, "name": self.name, "version": self.version, "uri": self.uri}


# --- attaching, training, merging ---------------------------------------------------------

def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")   # peft's rule for a list of names


def _short_name(name: str) -> str:
    """A layer's name after its last list index (``encoders.0.1.sca.proj`` -> ``sca.proj``)."""
    parts = name.split(".")
    last_index = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[last_index + 1:]) or name


def check_targets(model: nn.Module, settings: LoraSettings) -> None:
    """LoraError naming a target that matches no layer (with the candidates), or a layer peft
    cannot adapt at this rank (a grouped/depthwise conv whose groups don't divide it)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ADAPTABLE_LAYERS)}
    for target in settings.target_modules:
        hits = {name: m for name, m in layers.items() if _matches(name, target)}
        if not hits:
            candidates = sorted({_short_name(name) for name in layers})
            raise LoraError(f"train.lora.target_modules: {target!r} matches no Conv2d or Linear layer of the "
                            f"{type(model).__name__}; candidates: {candidates}")
        for name, module in hits.items():
            groups = getattr(module, "groups", 1)
            if groups > 1 and settings.rank % groups:
                raise LoraError(f"train.lora.target_modules: {target!r} matches {name}, a grouped conv "
                                f"(groups={groups}, e.g. depthwise); peft's LoRA needs the rank ({settings.rank}) "
                                "to be a multiple of its groups. Target the 1x1 convs and linear layers instead "
                                "(NAFNet: conv1, conv3, conv4, conv5, sca.proj)")


def attach_adapter(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject a LoRA adapter into ``model`` in place (output unchanged: B starts at zero) and
    freeze everything else; returns ``model``."""
    if settings.rank < 1:
        raise LoraError(f"train.lora.rank is {settings.rank}: an adapter needs rank >= 1")
    check_targets(model, settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # peft warns that a bare nn.Module has no config
        inject_adapter_in_model(settings.peft_config(), model, adapter_name=ADAPTER_NAME)
    mark_only_adapter_trainable(model)
    return model


def mark_only_adapter_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def has_adapter(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def parameter_share(model: nn.Module) -> dict[str, float]:
    """Trainable (adapter) and total parameter counts, and the trainable share."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_parameters": trainable, "total_parameters": total, "trainable_share": trainable / total}


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base layer and put the plain layer back (peft's
    ``merge_and_unload`` for an injected model); in place, returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights only, with peft's saved keys (``...conv1.lora_A.weight``)."""
    return {k: v.detach().cpu().contiguous() for k, v in
            get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}


# --- files ---------------------------------------------------------------------------------

def save_adapter(model: nn.Module, settings: LoraSettings, out_dir: str | Path, base: dict | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``lora_base.json`` when
    ``base`` is given) to ``out_dir``; returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings.peft_config().save_pretrained(str(out_dir))
    save_file(adapter_state_dict(model), str(out_dir / WEIGHTS_FILE))
    if base is not None:
        (out_dir / BASE_FILE).write_text(json.dumps(base, indent=2, sort_keys=True) + "\n")
    return out_dir


def read_settings(adapter_dir: str | Path) -> LoraSettings:
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise LoraError(f"{adapter_dir}: not a LoRA adapter ({CONFIG_FILE} not found)")
    raw = json.loads(path.read_text())
    return LoraSettings(int(raw["r"]), float(raw["lora_alpha"]), float(raw["lora_dropout"]),
                        tuple(sorted(raw["target_modules"])))


def read_base(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / BASE_FILE
    if not path.is_file():
        raise LoraError(f"{adapter_dir}: {BASE_FILE} not found, so the base model is unknown; give it (--base)")
    return json.loads(path.read_text())


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Inject the adapter saved in ``adapter_dir`` into ``model`` (in place) and load its weights."""
    adapter_dir = Path(adapter_dir)
    settings = read_settings(adapter_dir)
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        raise LoraError(f"{adapter_dir}: {WEIGHTS_FILE} not found")
    attach_adapter(model, settings)
    weights = load_file(str(adapter_dir / WEIGHTS_FILE))
    expected = set(adapter_state_dict(model))
    if set(weights) != expected:
        odd = sorted(set(weights) ^ expected)
        raise LoraError(f"{adapter_dir / WEIGHTS_FILE}: its keys do not fit the model ({len(odd)} differ, "
                        f"e.g. {odd[:3]}); it was trained on another architecture")
    set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    return model


# --- checkpoints ---------------------------------------------------------------------------

def lora_checkpoint_model(ckpt: dict) -> nn.Module:
    """The model of a LoRA training checkpoint, adapter injected and weights loaded (train mode, fp32)."""
    from deblur.checkpoints import model_from_checkpoint

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
    from deblur.checkpoints import load_checkpoint, model_from_checkpoint

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


# --- the registry ----------------------------------------------------------------------------

def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if not match:
        raise LoraError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return match.group(1), match.group(2), match.group(3)


def download_model_checkpoint(model_uri: str, dest: str | Path) -> Path:
    """A checkpoint file for a registered version: its ``*.pt``, or for an adapter version its
    base (fetched from the registry) with the adapter merged, written to ``dest/merged.pt``."""
    from deblur.checkpoints import save_atomic
    from deblur.tracking import _mlflow

    mlflow = _mlflow()
    dest = Path(dest)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest / "model")))
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
    from deblur.tracking import _mlflow

    name, alias, version = _parse_models_uri(init_from)
    client = _mlflow().MlflowClient()
    try:
        registered = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as err:   # MlflowException: no such model, alias or version
        raise LoraError(f"train.init_from {init_from}: not in the registry ({err})") from err
    ref = BaseModelRef(source=init_from, name=name, version=str(registered.version))
    return download_model_checkpoint(ref.uri, dest), ref


def load_adapter_model(adapter_dir: str | Path) -> tuple[nn.Module, dict]:
    """An adapter folder's base (fetched from the registry) with the adapter merged, ready for
    inference, and its ``lora_base.json``."""
    from deblur.checkpoints import model_from_checkpoint

    base = read_base(adapter_dir)
    if not str(base.get("uri", "")).startswith("models:/"):
        raise LoraError(f"{adapter_dir}: its base {base.get('uri')} is not a registered version; "
                        "merge it with `deblur merge-lora --base <that file>`")
    with tempfile.TemporaryDirectory() as tmp:
        merged = merge_into_checkpoint(adapter_dir, download_model_checkpoint(base["uri"], tmp))
    return model_from_checkpoint(merged), base


with warnings.catch_warnings():   # MLflow suggests type hints on predict(); the signature is explicit
    warnings.simplefilter("ignore", UserWarning)

    class LoraAdapterPyfunc(DeblurPyfunc):
        """A registered adapter as an MLflow pyfunc with ``deblur.mlflow_model``'s contract: its
        artifacts are the adapter files; loading fetches the base version from the registry
        (``MLFLOW_TRACKING_URI``) and merges the adapter into it."""

        def load_context(self, context) -> None:
            from deblur.config import TilingConfig

            config = context.model_config or {}
            self.model, self.base = load_adapter_model(Path(context.artifacts[CONFIG_FILE]).parent)
            self.tiling = TilingConfig.model_validate(config["tiling"])
            self.max_pixels = config.get("max_pixels")


def log_adapter_model(checkpoint: str | Path, tiling, name: str = "model",
                      max_pixels: int | None = None) -> tuple[str, dict]:
    """Log only the adapter of a LoRA checkpoint as a pyfunc model in the active run; returns
    its model URI and the base reference (for the version's tags)."""
    from importlib.metadata import version

    import pandas as pd

    from deblur.checkpoints import load_checkpoint
    from deblur.tracking import _mlflow

    _mlflow()
    ckpt = load_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = adapter_from_checkpoint(ckpt, Path(tmp) / "adapter")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(Path(__file__).resolve().with_name("lora_pyfunc_model.py")),   # from code
                artifacts={f: str(adapter_dir / f) for f in (CONFIG_FILE, WEIGHTS_FILE, BASE_FILE)},
                code_paths=[str(Path(__file__).resolve().parent)],
                signature=SIGNATURE,
                input_example=pd.DataFrame({IMAGE_COLUMN: [example_png_base64()]}),
                model_config={"tiling": tiling.model_dump(), "max_pixels": max_pixels,
                              "base_model_uri": ckpt["lora"]["base"]["uri"]},
                pip_requirements=[*PIP_REQUIREMENTS, f"peft=={version('peft')}", f"safetensors=={version('safetensors')}"],
            )
    return info.model_uri, ckpt["lora"]["base"]


def adapter_size_bytes(adapter_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(adapter_dir).iterdir() if p.is_file())


def merge_command(adapter: str, base: str | None, out: str | Path) -> Path:
    """``deblur merge-lora``: an adapter (registry URI, folder or LoRA training checkpoint) merged
    into its base (``base``, or the one the adapter names) and saved as a plain checkpoint ``out``."""
    from deblur.checkpoints import load_checkpoint, save_atomic

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if adapter.startswith("models:/"):
            from deblur.tracking import _mlflow

            local = Path(_mlflow().artifacts.download_artifacts(artifact_uri=adapter, dst_path=str(tmp / "adapter")))
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
