"""When ``last.pt`` may be resumed: the resume key and how two keys differ.

A run's resume key is what its result depends on: the params the train stage reads (less
``RESUME_NEUTRAL_TRAIN_KEYS``), a digest of its train/val pairs and the digests of the stage's
code files. ``last.pt`` is resumed only when its key matches; ``--resume-from`` overlooks code.
A key saved before a param existed reads as if it held the value that matches what the code did
then (``PARAMS_ADDED_SINCE``), so a long run survives the update.
"""

from __future__ import annotations

from pathlib import Path

from deblur.core.config import Params, flatten_dotted
from deblur.core.stage_spec import RESUME_NEUTRAL_TRAIN_KEYS, STAGES, code_digests, params_subset
from deblur.tracking import runs as tracking

# Params added after runs were saved, with the value that matches what the code did before they
# existed: a resume key without them reads as if it held these (a multi-day run survives the update).
PARAMS_ADDED_SINCE = {"model.nafnet.padding": "reflect", "train.deterministic": False, "train.cpu_threads": 0,
                      "train.lora.rank": 0, "train.lora.alpha": 4.0, "train.lora.dropout": 0.0,
                      "train.lora.target_modules": ["conv1", "conv3", "conv4", "conv5", "sca.proj"],
                      "synthesize.noise.sigma_min": 0.02, "synthesize.noise.sigma_max": 0.1}


def train_data_hash(pairs_dir: Path) -> str:
    """Digest of every file of the train and val splits (the pairs the run learns and validates on)."""
    files = sorted(p for split in ("train", "val") for p in (Path(pairs_dir) / split).rglob("*") if p.is_file())
    return tracking.files_digest(files)


def resume_key(params: Params, pairs_dir: Path) -> dict:
    """What a training run's result depends on: the params it reads, its data, its code."""
    relevant = params_subset(params.model_dump(mode="json", by_alias=True), STAGES["train"].params)
    relevant["train"] = {k: v for k, v in relevant["train"].items() if k not in RESUME_NEUTRAL_TRAIN_KEYS}
    return {"params": relevant, "data": train_data_hash(pairs_dir), "code": code_digests("train")}


def resume_mismatch(saved: dict | None, current: dict) -> list[str]:
    """Why a checkpoint with resume key ``saved`` is not a run of ``current``; empty when it is."""
    if not saved:
        return ["it has no resume key (written by an older version)"]
    def changed(old: dict, new: dict, what: str, shown: int) -> list[str]:
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        return [f"{what} changed: " + ", ".join(keys[:shown]) + (" ..." if len(keys) > shown else "")] if keys else []

    old_params = _selected_model_only(flatten_dotted(saved.get("params", {})))
    new_params = _selected_model_only(flatten_dotted(current["params"]))
    for key, legacy in PARAMS_ADDED_SINCE.items():
        if key in new_params and key not in old_params:
            old_params[key] = legacy
    reasons = changed(old_params, new_params, "params", 6)
    if saved.get("data") != current["data"]:
        reasons.append("the training data changed")
    return reasons + changed(saved.get("code", {}), current["code"], "code", 4)


def _selected_model_only(flat: dict) -> dict:
    """``flat`` without the sections of architectures ``model.name`` does not select (they change nothing)."""
    name = flat.get("model.name")
    return {k: v for k, v in flat.items()
            if not (k.startswith("model.") and k.count(".") >= 2 and not k.startswith(f"model.{name}."))}
