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
  keys) and a ``lora`` entry: ``{"settings": ..., "base": ...}``; ``deblur.models.checkpoint_file`` rebuilds it.
- The registry gets only the adapter (``log_adapter_model``); whoever loads it fetches the base
  version named in ``lora_base.json`` and merges (``load_adapter_model``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from deblur.core.errors import DeblurError

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
        """From ``train.lora`` (deblur.core.config) or the dict a checkpoint stores."""
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


def adapter_size_bytes(adapter_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(adapter_dir).iterdir() if p.is_file())
