"""Image grids for humans: contact sheets and triptychs with a zoomed crop."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def _fit(img: np.ndarray, height: int) -> np.ndarray:
    h, w = img.shape[:2]
    width = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS))


def label(img: np.ndarray, text: str) -> np.ndarray:
    """Draw ``text`` on a dark band at the top-left of a copy of ``img``."""
    pil = Image.fromarray(img.copy())
    draw = ImageDraw.Draw(pil)
    w = 7 * len(text) + 8
    draw.rectangle([0, 0, w, 14], fill=(0, 0, 0))
    draw.text((4, 1), text, fill=(255, 255, 255))
    return np.asarray(pil)


def hstack(images: list[np.ndarray], height: int, labels: list[str] | None = None, gap: int = 4) -> np.ndarray:
    tiles = [_fit(im, height) for im in images]
    if labels:
        tiles = [label(t, s) for t, s in zip(tiles, labels)]
    parts = []
    for i, t in enumerate(tiles):
        parts.append(t)
        if i < len(tiles) - 1:
            parts.append(np.full((height, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def vstack(rows: list[np.ndarray], gap: int = 4) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    padded = []
    for i, r in enumerate(rows):
        pad = np.full((r.shape[0], width - r.shape[1], 3), 255, np.uint8)
        padded.append(np.concatenate([r, pad], axis=1))
        if i < len(rows) - 1:
            padded.append(np.full((gap, width, 3), 255, np.uint8))
    return np.concatenate(padded, axis=0)


def contact_sheet(rows: list[list[np.ndarray]], row_labels: list[list[str]] | None = None, height: int = 160) -> np.ndarray:
    """One row per sample (e.g. [blurred, sharp]); each row scaled to ``height``."""
    return vstack([hstack(r, height, row_labels[i] if row_labels else None) for i, r in enumerate(rows)])


def triptych(blurred: np.ndarray, output: np.ndarray, sharp: np.ndarray, titles=("blurred", "deblurred", "sharp"),
             height: int = 256, zoom: int = 96) -> np.ndarray:
    """blurred / output / sharp side by side, and below them a zoomed centre crop of each."""
    h, w = sharp.shape[:2]
    z = min(zoom, h, w)
    y0, x0 = (h - z) // 2, (w - z) // 2
    crops = [im[y0:y0 + z, x0:x0 + z] for im in (blurred, output, sharp)]
    top = hstack([blurred, output, sharp], height, list(titles))
    bottom = hstack(crops, height, [f"{t} (zoom)" for t in titles])
    return vstack([top, bottom])


def kernel_picture(kernel: np.ndarray, side: int) -> np.ndarray:
    """A PSF as a uint8 RGB square: square-root scaled (faint taps visible), brightest tap white."""
    planes = kernel.reshape(-1, *kernel.shape[-2:]).mean(axis=0)
    peak = planes.max()
    grey = np.round(np.sqrt(np.clip(planes / peak if peak > 0 else planes, 0, 1)) * 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(grey).resize((side, side), Image.Resampling.NEAREST))
    return np.stack([big] * 3, axis=-1)


def with_kernels(sheet: np.ndarray, true_psf: np.ndarray, estimated_psf: np.ndarray, note: str = "",
                 side: int = 128) -> np.ndarray:
    """``sheet`` with the true and the estimated PSF beside it (thorough mode shows the blur it removed)."""
    kernels = vstack([label(kernel_picture(true_psf, side), "true PSF"),
                      label(kernel_picture(estimated_psf, side), f"estimated {note}".strip())])
    return hstack([sheet, kernels], sheet.shape[0])
