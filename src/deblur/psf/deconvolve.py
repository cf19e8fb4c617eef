"""Non-blind deconvolution: a known PSF, a hyper-Laplacian gradient prior, in linear light.

Krishnan & Fergus, "Fast image deconvolution using hyper-Laplacian priors" (NIPS 2009) solve

    min_x  lambda/2 ||k * x - y||^2 + sum |grad x|^alpha        (alpha = 2/3; 1 is total variation)

by half-quadratic splitting: auxiliary gradients w with a penalty beta/2 ||w - grad x||^2, beta
raised geometrically from ``beta_start`` to ``beta_max``; at each beta, w has a closed form per
pixel (a lookup table for alpha < 1, soft thresholding for alpha = 1) and x is a division in the
Fourier domain.

Borders: the image is mirror-padded by a kernel side and edge-tapered (as MATLAB's ``edgetaper``),
which starts the periodic FFT model without ringing; the data term then covers only the observed
pixels, so the padding is estimated rather than trusted (Almeida & Figueiredo, "Deconvolving images
with unknown boundaries using ADMM", IEEE TIP 2013: a split u = k * x with penalty mu and a scaled
dual, each step still one FFT division). On 320 px crops this is worth +2.0 dB over the taper alone.

``lambda`` follows the noise and the kernel (``regularisation_weight``); the noise std is estimated
by ``estimate_noise_sigma`` unless given. Details and measurements: documentation/kernel_aware.md.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.fft

from deblur.psf.io import PsfError

DEFAULT_GAMMA = 2.2
QUANTISATION_SIGMA = 1.0 / (255.0 * math.sqrt(12.0))   # std of 8-bit rounding, [0, 1] units
# lambda = LAMBDA_AT_REFERENCE * (REFERENCE_SIGMA / sigma)^NOISE_EXPONENT * (REFERENCE_AREA / area)^AREA_EXPONENT,
# fitted on scikit-image photos (camera, rocket, coins, immunohistochemistry, gravel; documentation/kernel_aware.md)
REFERENCE_SIGMA = 0.005       # linear-light noise std
REFERENCE_AREA = 25.0         # px, effective_area of the kernel
LAMBDA_AT_REFERENCE = {2 / 3: 10000.0, 1.0: 5000.0}
NOISE_EXPONENT = 1.0
AREA_EXPONENT = 0.5
MIN_LINEAR_SIGMA = 2e-4       # a floor: noise_sigma = 0 would make lambda infinite
HALF_NORMAL_LOWER_HALF_MEAN = 0.32466                 # E[|z| given |z| < median |z|], z ~ N(0, 1)


@dataclass(frozen=True)
class Settings:
    """The prior and the iteration schedule (defaults tuned on scikit-image photos, documentation/kernel_aware.md)."""

    alpha: float = 2 / 3          # gradient prior exponent: 2/3 (hyper-Laplacian) or 1 (total variation)
    beta_start: float = 3.0
    beta_max: float = 4096.0
    iterations: int = 16          # (w, x, u) updates, beta geometric from beta_start to beta_max
    unknown_boundary: bool = True  # False: plain Krishnan-Fergus, the data term also covers the tapered padding
    mu_ratio: float = 0.15        # penalty of the split u = k * x, times lambda (unknown_boundary only)

    def betas(self) -> np.ndarray:
        return np.geomspace(self.beta_start, self.beta_max, self.iterations)


def deconvolve(rgb: np.ndarray, psf: np.ndarray, *, gamma: float = DEFAULT_GAMMA, noise_sigma: float | None = None,
               lam: float | None = None, settings: Settings = Settings(), workers: int | None = None) -> np.ndarray:
    """Deconvolve uint8 HxWx3 sRGB-ish ``rgb`` with ``psf`` ((k, k) or (3, k, k)) in linear light; uint8 out.

    ``noise_sigma`` is the sensor noise std of ``rgb`` in [0, 1] units (estimated when None);
    ``lam`` overrides the noise-derived regularisation weight.
    """
    return deconvolve_with_overshoot(rgb, psf, gamma=gamma, noise_sigma=noise_sigma, lam=lam, settings=settings,
                                     workers=workers)[0]


def deconvolve_with_overshoot(rgb: np.ndarray, psf: np.ndarray, *, gamma: float = DEFAULT_GAMMA,
                              noise_sigma: float | None = None, lam: float | None = None,
                              settings: Settings = Settings(), workers: int | None = None) -> tuple[np.ndarray, float]:
    """``deconvolve``'s image and the share of its linear values outside [-0.01, 1.01] before clipping:
    ringing, which a wrong kernel makes (measured: 0.10-0.14 for wrong camera-shake estimates, below 0.04
    for right ones)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {rgb.dtype} {rgb.shape}")
    encoded = rgb.astype(np.float32) / 255.0
    linear = encoded ** np.float32(gamma)
    sigma = estimate_noise_sigma(encoded) if noise_sigma is None else noise_sigma
    sigma = linear_noise_sigma(encoded, max(sigma, QUANTISATION_SIGMA), gamma)
    restored = deconvolve_linear(linear, psf, noise_sigma=sigma, lam=lam, settings=settings, workers=workers)
    overshoot = float(np.mean((restored < -0.01) | (restored > 1.01)))
    return np.round(np.clip(restored, 0.0, 1.0) ** (1.0 / gamma) * 255.0).astype(np.uint8), overshoot


def deconvolve_linear(linear: np.ndarray, psf: np.ndarray, *, noise_sigma: float | None = None,
                      lam: float | None = None, settings: Settings = Settings(),
                      workers: int | None = None) -> np.ndarray:
    """Deconvolve a linear-light float HxW or HxWxC image with ``psf`` ((k, k) or (C, k, k)); float32, not clipped.

    ``noise_sigma``: noise std of ``linear`` (estimated when None); ``lam`` overrides the weight it gives.
    The output is registered to the input: the PSF's centre pixel is the origin.
    """
    planes = _channels_first(linear)
    kernels = _channel_kernels(psf, planes.shape[0])
    if lam is None:
        sigma = estimate_noise_sigma(linear) if noise_sigma is None else noise_sigma
        lam = regularisation_weight(sigma, effective_area(kernels), settings.alpha)
    workers = workers or os.cpu_count() or 1
    pad = max(kernels.shape[1:])
    padded, crop = _pad_for_fft(planes, pad)
    otf = psf_to_otf(kernels, padded.shape[1:], workers)
    tapered = edge_taper(padded, otf, kernels, workers)
    def restore(c: int) -> np.ndarray:
        if settings.unknown_boundary:
            return _half_quadratic_splitting(tapered[c], otf[c], lam, settings, crop[1:])
        return _krishnan_fergus(tapered[c], otf[c], lam, settings)

    with ThreadPoolExecutor(max_workers=workers) as pool:   # numpy and pocketfft release the GIL
        restored = list(pool.map(restore, range(len(tapered))))
    out = np.moveaxis(np.stack(restored)[crop], 0, -1)
    return out[..., 0] if linear.ndim == 2 else np.ascontiguousarray(out)


def estimate_noise_sigma(image: np.ndarray) -> float:
    """Std of white Gaussian noise in ``image`` (uint8 -> [0, 1] units, float as is), all channels pooled.

    Donoho's robust scale of the finest detail, with two changes: the detail is the unit-norm
    second difference [1 -2 1]^T [1 -2 1] / 6 (a 3x3 Laplacian-like filter that cancels smooth
    shading better than the diagonal Haar wavelet), and the scale is the mean of the lower half of
    its magnitudes rather than their median (the median of 8-bit data moves in 0.003 steps).
    0 for images under 3x3 px: nothing to measure.
    """
    planes = _channels_first(image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image)
    if min(planes.shape[1:]) < 3:
        return 0.0
    detail = np.abs(np.diff(np.diff(planes, 2, axis=2), 2, axis=1)).ravel() / 6.0
    lower_half = np.partition(detail, detail.size // 2)[:detail.size // 2]
    return float(lower_half.mean(dtype=np.float64) / HALF_NORMAL_LOWER_HALF_MEAN)


def linear_noise_sigma(encoded: np.ndarray, sigma: float, gamma: float = DEFAULT_GAMMA) -> float:
    """The std in linear light of noise ``sigma`` added to ``encoded`` ([0, 1]): sigma times the image's rms slope
    of v -> v^gamma (noise in dark pixels shrinks, in bright ones grows)."""
    slope = gamma * np.power(np.clip(encoded, 1e-6, 1.0, dtype=np.float32), np.float32(gamma - 1.0))
    return float(sigma * np.sqrt(np.mean(np.square(slope, dtype=np.float64))))


def regularisation_weight(noise_sigma: float, kernel_area: float, alpha: float = 2 / 3) -> float:
    """The data-term weight lambda for linear-light noise std ``noise_sigma`` and a kernel of
    ``effective_area``: ``LAMBDA_AT_REFERENCE`` scaled by (reference / value) ** exponent for each."""
    reference = LAMBDA_AT_REFERENCE.get(alpha)
    if reference is None:
        raise ValueError(f"no lambda mapping for alpha={alpha}; known: {sorted(LAMBDA_AT_REFERENCE)} (or pass lam=)")
    sigma = max(noise_sigma, MIN_LINEAR_SIGMA)
    return (reference * (REFERENCE_SIGMA / sigma) ** NOISE_EXPONENT
            * (REFERENCE_AREA / max(kernel_area, 1.0)) ** AREA_EXPONENT)


def effective_area(kernels: np.ndarray) -> float:
    """1 / sum(k^2) in px, mean over channels: the area a kernel spreads a point over, whatever its support box."""
    return float(np.mean(1.0 / np.sum(np.square(kernels, dtype=np.float64), axis=(-2, -1))))


def psf_to_otf(kernels: np.ndarray, shape: tuple[int, int], workers: int = 1) -> np.ndarray:
    """The real-FFT optical transfer functions (C, H, W//2+1) of (C, kh, kw) kernels, centre pixel at the origin."""
    c, kh, kw = kernels.shape
    canvas = np.zeros((c, *shape), np.float32)
    canvas[:, :kh, :kw] = kernels
    canvas = np.roll(canvas, (-(kh // 2), -(kw // 2)), axis=(1, 2))
    return scipy.fft.rfft2(canvas, workers=workers)


def edge_taper(planes: np.ndarray, otf: np.ndarray, kernels: np.ndarray, workers: int = 1) -> np.ndarray:
    """Blend (C, H, W) ``planes`` towards their circular blur near the borders, as MATLAB's ``edgetaper``:
    the weight of the sharp side is 1 minus the kernel's normalised autocorrelation, per axis."""
    h, w = planes.shape[1:]
    blurred = scipy.fft.irfft2(scipy.fft.rfft2(planes, workers=workers) * otf, s=(h, w), workers=workers)
    out = np.empty_like(planes)
    for c, kernel in enumerate(kernels):
        weight = np.outer(_taper_profile(kernel.sum(axis=1), h), _taper_profile(kernel.sum(axis=0), w))
        out[c] = weight * planes[c] + (1.0 - weight) * blurred[c]
    return out


def _taper_profile(projection: np.ndarray, length: int) -> np.ndarray:
    """1 - circular autocorrelation of a kernel projection, normalised: 0 at both ends, 1 inside."""
    spectrum = np.abs(np.fft.rfft(projection, length - 1)) ** 2
    autocorrelation = np.fft.irfft(spectrum, length - 1)
    autocorrelation = np.append(autocorrelation, autocorrelation[0])
    return (1.0 - autocorrelation / autocorrelation.max()).astype(np.float32)


def _half_quadratic_splitting(blurred: np.ndarray, otf: np.ndarray, lam: float, settings: Settings,
                              crop: tuple[slice, slice]) -> np.ndarray:
    """Krishnan-Fergus iterations on one padded, tapered (H, W) plane with the data term on ``crop``, the
    observed pixels, only: ADMM on the split u = k * x (penalty mu, scaled dual), so the padding is estimated."""
    h, w = blurred.shape
    gradient_gain = _gradient_gain((h, w))
    mu = lam * settings.mu_ratio
    observed = lam * blurred[crop]
    x, u, dual = blurred, blurred.copy(), np.zeros_like(blurred)
    conj_otf = np.conj(otf)
    data_gain = mu * np.abs(otf) ** 2
    for beta in settings.betas().tolist():   # Python floats keep the arrays float32
        numerator = mu * conj_otf * scipy.fft.rfft2(u - dual) + beta * _prior_numerator(x, beta, settings.alpha)
        spectrum = numerator / (data_gain + beta * gradient_gain)
        x = scipy.fft.irfft2(spectrum, s=(h, w)).astype(np.float32, copy=False)
        kx = scipy.fft.irfft2(spectrum * otf, s=(h, w)).astype(np.float32, copy=False)
        u = kx + dual
        u[crop] = (observed + mu * u[crop]) / (lam + mu)   # outside the observed pixels u is just k * x
        dual += kx - u
    return x


def _krishnan_fergus(blurred: np.ndarray, otf: np.ndarray, lam: float, settings: Settings) -> np.ndarray:
    """The plain Krishnan-Fergus iterations on one (H, W) plane: the data term covers the tapered padding too."""
    h, w = blurred.shape
    gradient_gain = _gradient_gain((h, w))
    data_numerator = lam * np.conj(otf) * scipy.fft.rfft2(blurred)
    data_gain = lam * np.abs(otf) ** 2
    x = blurred
    for beta in settings.betas().tolist():
        spectrum = ((data_numerator + beta * _prior_numerator(x, beta, settings.alpha))
                    / (data_gain + beta * gradient_gain))
        x = scipy.fft.irfft2(spectrum, s=(h, w)).astype(np.float32, copy=False)
    return x


def _prior_numerator(x: np.ndarray, beta: float, alpha: float) -> np.ndarray:
    """The w step and its share of the x step: F(grad^T w) with w = the shrunk gradients of ``x``."""
    dx, dy = _gradients(x)
    return scipy.fft.rfft2(_gradients_adjoint(_shrink(dx, beta, alpha), _shrink(dy, beta, alpha)))


def _gradients(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Circular forward differences along x and y."""
    return np.roll(x, -1, axis=-1) - x, np.roll(x, -1, axis=-2) - x


def _gradients_adjoint(wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    """The adjoint of ``_gradients`` applied to (wx, wy): minus the divergence."""
    return (np.roll(wx, 1, axis=-1) - wx) + (np.roll(wy, 1, axis=-2) - wy)


def _gradient_gain(shape: tuple[int, int]) -> np.ndarray:
    """|F(dx)|^2 + |F(dy)|^2 on the real-FFT grid of ``shape``."""
    h, w = shape
    fy = 2.0 - 2.0 * np.cos(2 * np.pi * np.fft.fftfreq(h))
    fx = 2.0 - 2.0 * np.cos(2 * np.pi * np.fft.rfftfreq(w))
    return (fy[:, None] + fx[None, :]).astype(np.float32)


def _shrink(v: np.ndarray, beta: float, alpha: float) -> np.ndarray:
    """argmin_w |w|^alpha + beta/2 (w - v)^2, elementwise."""
    if alpha == 1.0:
        return np.sign(v) * np.maximum(np.abs(v) - 1.0 / beta, 0.0)
    # w = s u(v / s) with s = beta^(-1 / (2 - alpha)) reduces every beta to the table of beta = 1
    scale = beta ** (-1.0 / (2.0 - alpha))
    step, values, slopes = _shrinkage_table(alpha)
    position = np.abs(v)
    position *= np.float32(1.0 / (scale * step))
    below = np.minimum(position, np.float32(len(values) - 1))
    np.floor(below, out=below)
    index = below.astype(np.int32)
    position -= below                                    # the fraction of a step above the grid point
    u = np.take(slopes, index)
    u *= position
    u += np.take(values, index)
    beyond = index == len(values) - 1
    if beyond.any():   # far from 0: the stationary point's expansion u = t - alpha t^(alpha - 1)
        t = (position[beyond] + below[beyond]) * step
        u[beyond] = t - alpha * t ** (alpha - 1.0)
    u *= np.float32(scale)
    return np.copysign(u, v, out=u)


@functools.lru_cache(maxsize=4)
def _shrinkage_table(alpha: float, t_max: float = 64.0, size: int = 16385) -> tuple[float, np.ndarray, np.ndarray]:
    """u*(t) = argmin_{u >= 0} u^alpha + (u - t)^2 / 2 on t in [0, t_max]: the larger root of
    alpha u^(alpha-1) + u - t = 0 (by bisection; the function is convex in u) where it beats u = 0.
    Returns the grid step, the table and its slope per step (for linear interpolation)."""
    t = np.linspace(0.0, t_max, size)
    low = np.full_like(t, (alpha * (1.0 - alpha)) ** (1.0 / (2.0 - alpha)))   # where the derivative is smallest
    high = np.maximum(t, low)
    for _ in range(60):
        mid = (low + high) / 2
        positive = alpha * mid ** (alpha - 1.0) + mid - t > 0
        high = np.where(positive, mid, high)
        low = np.where(positive, low, mid)
    root = (low + high) / 2
    better_than_zero = root ** alpha + (root - t) ** 2 / 2 < t ** 2 / 2
    values = np.where(better_than_zero, root, 0.0)
    slopes = np.append(np.diff(values), 0.0)
    return t[1], values.astype(np.float32), slopes.astype(np.float32)


def _pad_for_fft(planes: np.ndarray, pad: int) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Mirror-pad (C, H, W) by ``pad`` per side, then at the bottom/right up to fast FFT sizes; and the crop back."""
    h, w = planes.shape[1:]
    fast_h = scipy.fft.next_fast_len(h + 2 * pad, real=True)
    fast_w = scipy.fft.next_fast_len(w + 2 * pad, real=True)
    widths = ((0, 0), (pad, fast_h - h - pad), (pad, fast_w - w - pad))
    padded = np.pad(planes, widths, mode="symmetric") if min(h, w) > 1 else np.pad(planes, widths, mode="edge")
    return padded, (slice(None), slice(pad, pad + h), slice(pad, pad + w))


def _channels_first(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image[None].astype(np.float32)
    if image.ndim == 3:
        return np.moveaxis(image, -1, 0).astype(np.float32)
    raise ValueError(f"expected an HxW or HxWxC image, got shape {image.shape}")


def _channel_kernels(psf: np.ndarray, channels: int) -> np.ndarray:
    """(C, kh, kw) float32 kernels, each normalised to sum 1: one kernel for all channels or one per channel."""
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim == 2:
        psf = np.broadcast_to(psf, (channels, *psf.shape))
    if psf.ndim != 3 or psf.shape[0] != channels:
        raise PsfError(f"psf: expected (k, k) or ({channels}, k, k), got shape {psf.shape}")
    if psf.shape[1] % 2 == 0 or psf.shape[2] % 2 == 0:
        raise PsfError(f"psf: shape {psf.shape} has an even side; sides must be odd (the centre pixel is the origin)")
    if not np.all(np.isfinite(psf)) or psf.min() < 0:
        raise PsfError("psf: weights must be finite and non-negative")
    sums = psf.sum(axis=(1, 2), keepdims=True)
    if np.any(sums <= 0):
        raise PsfError("psf: every channel's kernel needs a positive sum")
    return (psf / sums).astype(np.float32)
