"""Shared pieces of the architectures: size-agnostic padding and the global residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deblur.core.registry import Registry

MODELS: Registry = Registry("model")
PADDING_MODES = ("reflect", "zeros")


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> torch.Tensor:
    """Pad the bottom and right of ``x`` so H and W are multiples of ``multiple``.

    ``mode="reflect"``: reflect padding where the image is large enough for it, replicate
    padding otherwise (reflection needs the pad to be smaller than the side). ``mode="zeros"``:
    zero padding, as the official NAFNet's ``check_image_size`` (needed to reproduce its
    outputs exactly at sizes that are not multiples).
    """
    if mode not in PADDING_MODES:
        raise ValueError(f"padding mode {mode!r}; known: {list(PADDING_MODES)}")
    h, w = x.shape[-2:]
    pad_h = -h % multiple
    pad_w = -w % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    if mode == "zeros":
        return F.pad(x, (0, pad_w, 0, pad_h))
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def start_near_identity(head: nn.Conv2d, scale: float = 1e-2) -> None:
    """Shrink the last layer so a new model starts close to output = input.

    With the global residual, an untrained model then scores about the blurred input's own
    PSNR instead of far below it, and early training refines rather than repairs.
    """
    with torch.no_grad():
        head.weight.mul_(scale)
        if head.bias is not None:
            head.bias.zero_()


class ResidualRestorer(nn.Module):
    """Base class: pads to ``size_multiple``, predicts a correction, adds the input, crops.

    Subclasses implement ``body(x) -> residual`` on an already padded input.
    """

    size_multiple: int = 1
    padding: str = "reflect"        # how forward pads to size_multiple (pad_to_multiple's mode)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, self.size_multiple, self.padding)
        out = padded + self.body(padded)
        return out[..., :h, :w]

    def prepare_inference(self, train_patch_size: int) -> None:
        """Switch to the inference form in place; most models have none."""

    def identity_at_init(self) -> list[str]:
        """Names of submodules that a fresh model starts as exact identities (residual blocks
        whose output scales are zero): weights for them may be missing when growing a trained
        model (``load_grown``). None by default."""
        return []


def load_grown(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` into ``model``, which may have *more* blocks than the weights came from.

    Every key of ``state`` must fit; a key missing from ``state`` is allowed only when a whole
    submodule listed by ``model.identity_at_init()`` is missing, so the grown model computes
    exactly what the smaller one did. Returns the names of the blocks left at their fresh
    (identity) initialisation; raises RuntimeError (as ``load_state_dict``) otherwise.
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    identity = getattr(model, "identity_at_init", lambda: [])()
    grown = [name for name in identity if any(k.startswith(name + ".") for k in missing)]
    for name in grown:
        present = [k for k in model.state_dict() if k.startswith(name + ".") and k in state]
        if present:
            raise RuntimeError(f"block {name} is only partly in the weights ({present[0]} is there, "
                               f"{next(k for k in missing if k.startswith(name + '.'))} is not)")
    unexplained = [k for k in missing if not any(k.startswith(name + ".") for name in grown)]
    if unexpected or unexplained:
        raise RuntimeError("Error(s) in loading state_dict: "
                           + (f"Missing key(s): {', '.join(unexplained[:5])}. " if unexplained else "")
                           + (f"Unexpected key(s): {', '.join(unexpected[:5])}." if unexpected else ""))
    return grown
