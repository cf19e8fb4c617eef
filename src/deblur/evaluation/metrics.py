"""PSNR and SSIM in the GoPro community's convention (see documentation/metrics.md).

RGB, full frame, no border crop, no rounding beyond the 8-bit images themselves;
SSIM is scikit-image's ``structural_similarity`` with ``gaussian_weights=True,
use_sample_covariance=False, sigma=1.5, channel_axis=-1, data_range=255``.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; reported as this cap


def psnr(output: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of two uint8 HxWx3 images (data range 255)."""
    _check_pair(output, reference)
    if np.array_equal(output, reference):
        return PSNR_CAP_DB
    return float(peak_signal_noise_ratio(reference, output, data_range=255))


def ssim(output: np.ndarray, reference: np.ndarray) -> float:
    _check_pair(output, reference)
    return float(structural_similarity(reference, output, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=255))


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image sizes differ: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"metrics expect uint8 images, got {a.dtype} and {b.dtype}")
