"""Training samples: random patches of blurred/sharp pairs, indexed by a global sample number.

Sample ``i`` is a pure function of ``(seed, i)``: which image, which crop, which flips and
(on the fly) which blur. Step ``s`` of a run with batch ``b`` on ``w`` ranks reads samples
``s*b*w + rank*b ... + b-1``, so resuming at a step, changing ``num_workers`` or
re-running gives the same batches.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from deblur.core.config import SynthesizeConfig
from deblur.data.blur import blur_pair
from deblur.data.pairs import PairRecord
from deblur.core.imageio import read_rgb


@lru_cache(maxsize=256)
def _cached_rgb(path: str) -> np.ndarray:
    return read_rgb(path)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float CHW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div_(255.0)


def to_uint8(chw: torch.Tensor) -> np.ndarray:
    """float CHW in [0, 1] (values outside are clamped) -> uint8 HxWx3."""
    arr = chw.detach().float().clamp(0, 1).mul(255.0).round().byte().cpu().numpy()
    return arr.transpose(1, 2, 0)


def augment(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flip / rot90 for every array."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k)
        out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
    return out


def random_crop(arrays: list[np.ndarray], size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The same random ``size`` crop of every array; images smaller than ``size`` are reflect-padded."""
    h, w = arrays[0].shape[:2]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        arrays = [np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="reflect") for a in arrays]
        h, w = arrays[0].shape[:2]
    y = int(rng.integers(h - size + 1))
    x = int(rng.integers(w - size + 1))
    return [a[y:y + size, x:x + size] for a in arrays]


class PairPatches(Dataset):
    """Patches from synthesized (or real GoPro) blurred/sharp pairs.

    With probability ``identity_fraction`` a sample is (sharp, sharp): the model must learn
    to leave already-sharp content alone (the sharp-in check).
    """

    def __init__(self, records: list[PairRecord], patch_size: int, seed: int, length: int,
                 identity_fraction: float = 0.0) -> None:
        if not records:
            raise ValueError("no training pairs: the synthesize stage produced an empty train split")
        self.records = records
        self.patch_size = patch_size
        self.seed = seed
        self.length = length
        self.identity_fraction = identity_fraction

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        rec = self.records[int(rng.integers(len(self.records)))]
        sharp = _cached_rgb(str(rec.clear_path))
        identity = rng.random() < self.identity_fraction
        blurred = sharp if identity else _cached_rgb(str(rec.blur_path))
        if blurred.shape != sharp.shape:
            raise ValueError(f"{rec.blur_path}: size {blurred.shape} differs from its sharp image {sharp.shape}")
        blurred, sharp = augment(random_crop([blurred, sharp], self.patch_size, rng), rng)
        return to_tensor(blurred), to_tensor(sharp)


class OnTheFlyPatches(Dataset):
    """Sharp crops blurred anew for every sample with the synthesize stage's blur code."""

    def __init__(self, sharp_paths: list[Path], synth: SynthesizeConfig, patch_size: int, seed: int, length: int,
                 identity_fraction: float = 0.0) -> None:
        if not sharp_paths:
            raise ValueError("no sharp training images for on-the-fly blurring")
        self.sharp_paths = [str(p) for p in sharp_paths]
        self.synth = synth
        self.patch_size = patch_size
        self.seed = seed
        self.length = length
        self.identity_fraction = identity_fraction
        # blur a larger crop, keep its centre: no border effects from the kernel
        self.margin = synth.motion.max_kernel_size // 2 + 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        sharp_full = _cached_rgb(self.sharp_paths[int(rng.integers(len(self.sharp_paths)))])
        big = self.patch_size + 2 * self.margin
        (crop,) = random_crop([sharp_full], big, rng)
        blurred = crop if rng.random() < self.identity_fraction else blur_pair(crop, rng, self.synth)[0]
        m, p = self.margin, self.patch_size
        blurred, sharp = augment([blurred[m:m + p, m:m + p], crop[m:m + p, m:m + p]], rng)
        return to_tensor(blurred), to_tensor(sharp)


class StepSampler(Sampler[int]):
    """Yields the global sample numbers of steps ``start_step..max_steps-1`` for one rank."""

    def __init__(self, start_step: int, max_steps: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start_step, self.max_steps = start_step, max_steps
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            base = (step * self.world_size + self.rank) * self.batch_size
            yield from range(base, base + self.batch_size)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.batch_size
