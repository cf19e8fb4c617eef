"""Comparing blur kernels: similarity up to a shift, Levin's error ratio, and centring by the support box.

Conventions (documentation/kernel_aware.md):
- ``kernel_ncc`` is the kernel similarity of Hu & Yang (ECCV 2012): the largest normalised
  cross-correlation <a shifted, b> / (|a| |b|) over every shift, kernels zero-padded. Kernels are
  non-negative, so it lies in [0, 1]; 1 means equal up to a shift and a factor.
- ``error_ratio`` is Levin et al.'s (CVPR 2009) success measure: the SSD to the sharp image of a
  deconvolution with the estimated kernel over that of a deconvolution with the true kernel, each
  aligned to the sharp image first (their ``comp_upto_shift``); <= 3 counts as a success.
- A PSF array's centre pixel is its origin, and a kernel is centred on its support box (the taps above
  ``SUPPORT_FRACTION`` of the peak), not on its centroid (documentation/data.md).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

SUPPORT_FRACTION = 0.05   # taps above this share of the peak make the support box


def kernel_ncc(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Largest normalised cross-correlation of two 2-D kernels over all shifts (zero padding)."""
    return float(_shifted_correlation(estimate, truth).max())


def aligned_shift(estimate: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """(dy, dx): moving ``estimate``'s array centre by this, in pixels, best matches ``truth``'s centre.

    A kernel whose content sits ``(dy, dx)`` off the true one shifts a deconvolved image by ``-(dy, dx)``.
    """
    scores = _shifted_correlation(estimate, truth)
    peak = np.unravel_index(int(np.argmax(scores)), scores.shape)
    # scores[i, j] pairs estimate[y, x] with truth[y + i - (h_e - 1), x + j - (w_e - 1)]
    dy = peak[0] - (estimate.shape[0] - 1) + (estimate.shape[0] // 2 - truth.shape[0] // 2)
    dx = peak[1] - (estimate.shape[1] - 1) + (estimate.shape[1] // 2 - truth.shape[1] // 2)
    return int(dy), int(dx)


def _shifted_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full cross-correlation of ``b`` against ``a``, divided by both norms (a 'full'-sized map)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"expected 2-D kernels, got {a.shape} and {b.shape}")
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if norm == 0:
        return np.zeros((1, 1))
    shape = (a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1)
    spectrum = np.fft.rfft2(b, shape) * np.conj(np.fft.rfft2(a, shape))
    corr = np.fft.irfft2(spectrum, shape)
    # entry (i, j) holds shift (i, j) modulo the shape; roll so index (h_a - 1, w_a - 1) is shift 0
    corr = np.roll(corr, (a.shape[0] - 1, a.shape[1] - 1), axis=(0, 1))
    return corr / norm


def support_box(kernel: np.ndarray, fraction: float = SUPPORT_FRACTION) -> tuple[slice, slice]:
    """Row and column slices of the smallest box holding every tap above ``fraction`` of the peak."""
    above = kernel > fraction * kernel.max()
    rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def support_size(kernel: np.ndarray, fraction: float = SUPPORT_FRACTION) -> int:
    """The longer side of the support box, in pixels."""
    rows, cols = support_box(kernel, fraction)
    return max(rows.stop - rows.start, cols.stop - cols.start)


def centre_kernel(kernel: np.ndarray, fraction: float = SUPPORT_FRACTION) -> np.ndarray:
    """The kernel cropped to its support box, placed at the centre of the smallest odd square holding
    it, renormalised to sum 1 (float32). An even box extent puts the extra pixel above/left of the centre."""
    kernel = np.clip(np.asarray(kernel, np.float64), 0.0, None)
    if kernel.max() <= 0:
        raise ValueError("a kernel needs at least one positive tap")
    rows, cols = support_box(kernel, fraction)
    box = kernel[rows, cols]
    side = max(box.shape) | 1
    out = np.zeros((side, side))
    top, left = (side - box.shape[0]) // 2, (side - box.shape[1]) // 2
    out[top:top + box.shape[0], left:left + box.shape[1]] = box
    return (out / out.sum()).astype(np.float32)


def error_ratio(sharp: np.ndarray, blurred: np.ndarray, estimate: np.ndarray, truth: np.ndarray,
                deconvolve_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], max_shift: int = 15,
                margin: int | None = None) -> float:
    """Levin's error ratio: SSD(deconvolved with ``estimate``) / SSD(deconvolved with ``truth``).

    ``deconvolve_fn(blurred, kernel)`` returns an image like ``sharp``; each result is aligned to
    ``sharp`` by the best integer shift within ``max_shift`` px, and SSDs skip a ``margin`` px border
    (default: ``max_shift`` plus the larger kernel side).
    """
    sharp = np.asarray(sharp, np.float64)
    margin = max_shift + max(estimate.shape[0], truth.shape[0]) if margin is None else margin
    with_estimate = aligned_ssd(np.asarray(deconvolve_fn(blurred, estimate), np.float64), sharp, max_shift, margin)
    with_truth = aligned_ssd(np.asarray(deconvolve_fn(blurred, truth), np.float64), sharp, max_shift, margin)
    return float(with_estimate / max(with_truth, 1e-12))


def aligned_ssd(image: np.ndarray, reference: np.ndarray, max_shift: int, margin: int) -> float:
    """Smallest sum of squared differences over integer shifts of ``image`` within ``max_shift`` px,
    on ``reference``'s interior (a ``margin`` px border left out, ``margin`` >= ``max_shift``)."""
    if image.shape != reference.shape:
        raise ValueError(f"shapes differ: {image.shape} vs {reference.shape}")
    if margin < max_shift or 2 * margin >= min(reference.shape[:2]):
        raise ValueError(f"margin {margin} must be >= max_shift {max_shift} and leave an interior")
    h, w = reference.shape[:2]
    inner = reference[margin:h - margin, margin:w - margin]
    shifts = range(-max_shift, max_shift + 1)
    return min(_ssd_at(image, inner, margin, (dy, dx)) for dy in shifts for dx in shifts)


def _ssd_at(image, inner, margin, shift) -> float:
    top, left = margin + shift[0], margin + shift[1]
    window = image[top:top + inner.shape[0], left:left + inner.shape[1]]
    return float(np.sum((window - inner) ** 2))
