"""Evidence against a confident but wrong blind kernel, measured without the sharp image.

``deblur.psf.estimate`` scores its own kernel by crop agreement and reblur residual; both are blind
to a kernel that every crop got wrong the same way (a photo of one region: the crops overlap and
share the coarse scales' initial kernel). These checks look at the deconvolved result instead:

- ``echo_*``: the normalised autocorrelation of the Laplacian of a luminance image at lags
  2..``radius`` px. A blur spreads every edge along the kernel (high positive correlation along
  it); a deconvolution with the right kernel removes that; a kernel too small leaves it, a wrong one
  adds echoes (ringing: negative correlation at the kernel's extent). Measured on the kernel result
  and on the input, the ratio says how much of the input's blur structure is left.
- ``noise_gain``: the noise estimate of the result over that of the input (an oversized kernel
  amplifies noise and 8-bit steps).
- ``lowfreq_shift_px``: the translation between the result and the input at low frequencies
  (phase slope of their cross spectrum). Registration (``restore.register_to_input``) moves the
  result by the estimated kernel's centroid; a kernel that is only part of the true one leaves
  the result shifted against the input's centre of mass.
- ``agree_<candidate>``: the correlation between the kernel result's correction (result - input)
  and a network candidate's correction, after a light blur: both should sharpen the same edges.
- kernel shape: ``kernel_spread`` (effective area over the support box's area), ``kernel_peak``,
  ``kernel_radius`` (rms distance of the mass from its centroid over half the support).
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import fft as sfft

from deblur.psf.deconvolve import QUANTISATION_SIGMA, effective_area, estimate_noise_sigma
from deblur.psf.metrics import support_size

LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)
MIN_ECHO_LAG = 2          # px (Chebyshev): lags 0 and 1 carry the Laplacian's own structure
MIN_CORRECTION = 1e-4     # rms luminance change ([0, 1]) below which a candidate counts as unchanged


def luminance(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 HxWx3 -> float32 luminance in [0, 1] (encoded, not linear: these are image statistics)."""
    return (rgb.astype(np.float32) / 255.0) @ LUMA


def echo_map(gray: np.ndarray, radius: int) -> np.ndarray:
    """The Laplacian's autocorrelation at lags -radius..radius (2 radius + 1 square), 1 at lag 0;
    the image's border (``radius`` px) is left out and the signal zero-padded (no wrap-around)."""
    lap = cv2.Laplacian(gray.astype(np.float32), cv2.CV_32F, ksize=1)
    h, w = lap.shape
    m = min(radius, h // 4, w // 4)
    lap = lap[m:h - m, m:w - m]
    lap = lap - lap.mean()
    shape = (sfft.next_fast_len(lap.shape[0] + radius, real=True), sfft.next_fast_len(lap.shape[1] + radius, real=True))
    spectrum = sfft.rfft2(lap, shape)
    auto = sfft.irfft2(np.abs(spectrum) ** 2, shape)
    auto = np.roll(auto, (radius, radius), axis=(0, 1))[:2 * radius + 1, :2 * radius + 1]
    return (auto / max(float(auto[radius, radius]), 1e-12)).astype(np.float32)


def echo_statistics(gray: np.ndarray, radius: int) -> tuple[float, float, float]:
    """(max, min, mean |.|) of ``echo_map`` away from lag 0 (Chebyshev distance >= ``MIN_ECHO_LAG``)."""
    auto = echo_map(gray, radius)
    ys, xs = np.indices(auto.shape) - radius
    ring = np.maximum(np.abs(ys), np.abs(xs)) >= MIN_ECHO_LAG
    values = auto[ring]
    return float(values.max()), float(values.min()), float(np.abs(values).mean())


def lowfreq_shift(image: np.ndarray, reference: np.ndarray, cutoff: float) -> float:
    """|translation| in px of ``image`` against ``reference`` (2-D float arrays) from the phase slope of their
    cross spectrum at spatial frequencies below ``cutoff`` cycles/px (weighted least squares, Hann window)."""
    h, w = image.shape
    window = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    a = sfft.fft2((image - image.mean()) * window)
    b = sfft.fft2((reference - reference.mean()) * window)
    cross = a * np.conj(b)
    fy, fx = np.meshgrid(sfft.fftfreq(h), sfft.fftfreq(w), indexing="ij")
    radius = np.hypot(fy, fx)
    sel = (radius > 0) & (radius < cutoff)
    if sel.sum() < 4:
        return 0.0
    weight = np.abs(cross[sel])
    phase = np.angle(cross[sel])
    design = -2 * np.pi * np.stack([fy[sel], fx[sel]], axis=1)
    sw = np.sqrt(weight)[:, None]
    shift, *_ = np.linalg.lstsq(design * sw, phase * sw[:, 0], rcond=None)
    return float(np.hypot(*shift))


def correction_agreement(candidate: np.ndarray, reference: np.ndarray, rgb: np.ndarray,
                         sigma: float = 1.0) -> float | None:
    """Correlation of (candidate - rgb) with (reference - rgb) on luminance, both blurred by ``sigma`` px;
    None when either changes nothing (rms under ``MIN_CORRECTION``): no direction to compare."""
    base = luminance(rgb)
    a = cv2.GaussianBlur(luminance(candidate) - base, (0, 0), sigma)
    b = cv2.GaussianBlur(luminance(reference) - base, (0, 0), sigma)
    a, b = a - a.mean(), b - b.mean()
    if min(float(np.sqrt(np.mean(a * a))), float(np.sqrt(np.mean(b * b)))) < MIN_CORRECTION:
        return None
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def kernel_shape(kernel: np.ndarray) -> dict:
    k = np.asarray(kernel, np.float64)
    k = k / k.sum()
    support = max(1, support_size(k))
    ys, xs = np.indices(k.shape)
    cy, cx = float((k * ys).sum()), float((k * xs).sum())
    radius = float(np.sqrt((k * ((ys - cy) ** 2 + (xs - cx) ** 2)).sum()))
    return {"kernel_spread": effective_area(k[None].astype(np.float32)) / support ** 2,
            "kernel_peak": float(k.max()), "kernel_radius": radius / max(support / 2, 0.5)}


def kernel_checks(rgb: np.ndarray, kernel_image: np.ndarray, kernel: np.ndarray,
                  references: dict[str, np.ndarray] | None = None, radius: int = 30) -> dict:
    """All the checks above for the kernel result ``kernel_image`` of the photo ``rgb`` (uint8 HxWx3),
    the estimated ``kernel``, and network candidates ``references`` (name -> uint8 image); JSON-ready."""
    gray_in, gray_out = luminance(rgb), luminance(kernel_image)
    radius = int(min(radius, min(rgb.shape[:2]) // 4))
    in_max, in_min, in_abs = echo_statistics(gray_in, radius)
    out_max, out_min, out_abs = echo_statistics(gray_out, radius)
    support = max(3, support_size(np.asarray(kernel, np.float64)))
    sigma_in = max(estimate_noise_sigma(rgb), QUANTISATION_SIGMA)
    out = {"echo_max_input": in_max, "echo_max": out_max, "echo_min": out_min, "echo_abs_input": in_abs,
           "echo_abs": out_abs, "echo_ratio": out_abs / max(in_abs, 1e-9),
           "noise_gain": max(estimate_noise_sigma(kernel_image), QUANTISATION_SIGMA) / sigma_in,
           "lowfreq_shift_px": lowfreq_shift(gray_out, gray_in, cutoff=min(0.03, 0.5 / support)),
           **kernel_shape(kernel)}
    for name, image in (references or {}).items():
        agreement = correction_agreement(kernel_image, image, rgb)
        if agreement is not None:
            out[f"agree_{name}"] = agreement
    return {k: round(float(v), 4) for k, v in out.items()}
