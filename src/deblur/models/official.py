"""Official NAFNet checkpoints (megvii-research/NAFNet) as deblur checkpoints.

The official ``.pth`` files are BasicSR's layout: ``{"params": state_dict}`` and, for runs
trained with an EMA of the weights, ``"params_ema"`` too. ``deblur.models.nafnet.NAFNet`` is the
official architecture under two other names: ``middle_blks`` is ``middle`` and the channel
attention's ``sca.1`` (a Sequential of pooling and 1x1 conv) is ``sca.proj``. The official
``check_image_size`` pads bottom/right with zeros: ``model.nafnet.padding: zeros`` reproduces
its outputs exactly at every size (``reflect`` only differs near the bottom/right border of
sizes that are not multiples of 16).

Which weights: ``params`` when the file has it, else ``params_ema``. BasicSR's
``load_network`` reads ``params`` unless told otherwise and the official test options do not
tell it otherwise, so ``params`` are the weights behind the published scores. Pass
``param_key`` to take the EMA weights instead.

The architecture (width and blocks per stage) is read from the key names and shapes;
``train_patch_size`` defaults to 256, the official GoPro training patches (the TLC window is
``tlc_factor`` times it, as the official ``NAFNetLocal``'s ``base_size = 1.5 x train_size``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from deblur.core.config import NAFNetConfig
from deblur.core.errors import CheckpointError
from deblur.core.files import sha256_file
from deblur.models.nafnet import NAFNet

PARAM_KEYS = ("params", "params_ema")
OFFICIAL_TRAIN_PATCH_SIZE = 256
# official name -> ours, applied to every key (after a DataParallel "module." prefix is dropped)
RENAMES = ((re.compile(r"^middle_blks\."), "middle."), (re.compile(r"\.sca\.1\."), ".sca.proj."))
TOP_LEVEL = ("intro", "ending", "encoders", "downs", "middle", "ups", "decoders")


class OfficialCheckpointError(CheckpointError):
    """An official-layout file whose weights are not a NAFNet this code can rebuild."""


@dataclass(frozen=True)
class Origin:
    """Where imported weights came from; stored as the checkpoint's ``origin``."""

    file: str
    sha256: str
    licence: str = "unknown"
    source: str = "official NAFNet checkpoint (megvii-research/NAFNet, BasicSR layout)"

    @classmethod
    def of_file(cls, path: str | Path, licence: str = "unknown") -> "Origin":
        return cls(file=Path(path).name, sha256=sha256_file(path), licence=licence)


def is_official(obj: object) -> bool:
    """BasicSR layout: a dict holding ``params`` or ``params_ema`` (a state dict), no ``model_config``."""
    return (isinstance(obj, dict) and "model_config" not in obj
            and any(isinstance(obj.get(key), dict) for key in PARAM_KEYS))


def select_weights(obj: dict, param_key: str | None = None) -> tuple[str, dict]:
    """``(key, state_dict)``: ``param_key`` if given, else ``params``, else ``params_ema``."""
    keys = [param_key] if param_key else [k for k in PARAM_KEYS if isinstance(obj.get(k), dict)][:1]
    if not keys or not isinstance(obj.get(keys[0]), dict):
        raise OfficialCheckpointError(f"no {param_key or ' / '.join(PARAM_KEYS)} weights in the file "
                                      f"(keys found: {sorted(map(str, obj))[:10]})")
    return keys[0], obj[keys[0]]


def rename_keys(state: dict) -> dict:
    """Official key names -> ours; OfficialCheckpointError naming keys that are not NAFNet's."""
    out = {}
    for key, value in state.items():
        new = key.removeprefix("module.")
        for pattern, repl in RENAMES:
            new = pattern.sub(repl, new)
        out[new] = value
    foreign = [k for k in state if k.removeprefix("module.").split(".")[0] not in (*TOP_LEVEL, "middle_blks")]
    if foreign:
        raise OfficialCheckpointError(f"not a NAFNet: unknown keys {foreign[:5]} (expected "
                                      f"{', '.join(TOP_LEVEL[:-1])} and {TOP_LEVEL[-1]}, official names)")
    return out


def infer_architecture(state: dict) -> dict:
    """``width``, ``enc_blocks``, ``middle_blocks``, ``dec_blocks`` of a NAFNet state dict (our key names)."""
    if "intro.weight" not in state:
        raise OfficialCheckpointError(f"not a NAFNet: no intro.weight (keys found: {sorted(state)[:5]} ...)")

    def count(prefix: str, levels: int | None = None) -> list[int]:
        # blocks are numbered 0..n-1 inside each stage: count distinct (level, block) indices
        pattern = re.compile(rf"^{prefix}\.(\d+)\.(\d+)\." if levels is not None else rf"^{prefix}\.(\d+)\.")
        found: dict[int, set[int]] = {}
        for key in state:
            match = pattern.match(key)
            if match and levels is not None:
                found.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
            elif match:
                found.setdefault(0, set()).add(int(match.group(1)))
        if levels is None:
            return [len(found.get(0, ()))]
        return [len(found.get(level, ())) for level in range(levels)]

    levels = len({k.split(".")[1] for k in state if k.startswith("downs.")})
    if len({k.split(".")[1] for k in state if k.startswith("ups.")}) != levels:
        raise OfficialCheckpointError("not a NAFNet: as many ups as downs expected")
    return {"width": int(state["intro.weight"].shape[0]), "enc_blocks": count("encoders", levels),
            "middle_blocks": count("middle")[0], "dec_blocks": count("decoders", levels)}


def convert(obj: dict, origin: Origin, *, param_key: str | None = None, padding: str = "zeros",
            tlc: bool = True, tlc_factor: float = 1.5,
            train_patch_size: int = OFFICIAL_TRAIN_PATCH_SIZE) -> dict:
    """A deblur checkpoint dict from an official one (``obj`` as ``torch.load`` returns it).

    Defaults reproduce the official test setting: zero padding and TLC over 1.5 x 256 pixels.
    """
    key, weights = select_weights(obj, param_key)
    state = rename_keys(weights)
    arch = infer_architecture(state)
    cfg = NAFNetConfig(**arch, tlc=tlc, tlc_factor=tlc_factor, padding=padding)
    model = NAFNet(**cfg.model_dump())
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    wrong = [k for k in set(ours) & set(state) if tuple(ours[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise OfficialCheckpointError(
            f"weights do not form the NAFNet their keys suggest ({_describe(arch)}): "
            + "; ".join(f"{what} {keys[:3]}" for what, keys in
                        (("missing", missing), ("unexpected", unexpected), ("wrong shape", sorted(wrong))) if keys))
    state = {k: v.detach().float().clone() for k, v in state.items()}
    return {
        "model_config": {"name": "nafnet", "nafnet": cfg.model_dump(mode="json")},
        "state_dict": state,
        "train_patch_size": int(train_patch_size),
        "step": 0,
        "origin": {**asdict(origin), "param_key": key},
    }


def _describe(arch: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in arch.items())
