"""Synthetic blur: point-spread functions (PSFs) and their application in linear light.

Kernel models (``BLUR_TYPES``):
- ``motion``: camera shake after Boracchi & Foi, "Modeling the performance of image restoration
  from motion blur" (IEEE TIP 2012): a random walk with inertia, Gaussian jitter, a centripetal
  pull and rare abrupt shakes, scaled by an ``anxiety`` factor; speed varies along the path; the
  path is rasterised with sub-pixel (bilinear) accumulation.
- ``gaussian``: isotropic Gaussian.
- ``defocus``: uniform disk, anti-aliased by supersampling.
- ``lens``: disk with a soft edge plus chromatic aberration: each channel has its own radius
  (axial) and centre (lateral), so the kernel is (3, k, k).
- ``noise`` (not a blur): the identity kernel (1, 1) and Gaussian noise with std uniform in
  ``synthesize.noise`` instead of the sensor noise: a denoising pair.

Every kernel is float32, non-negative, odd-sized and sums to 1 (per channel). Motion, gaussian
and defocus kernels have their centre of mass on the centre pixel, so blurring does not shift the
image; lens kernels shift red and blue on purpose (lateral chromatic aberration).

Nothing here reads or writes files: ``blur_pair`` is also used to blur training crops on the fly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from deblur.core import portable_math as pm
from deblur.core.config import DEGRADATION_TYPES, NOISE, LensConfig, MotionConfig, SynthesizeConfig

TRAJECTORY_STEPS = 1000
SUPERSAMPLING = 8


@dataclass(frozen=True)
class BlurSpec:
    """One degradation: the PSF and a JSON-serialisable description of how it was drawn."""

    blur_type: str
    kernel: np.ndarray                          # float32 (k, k) or (3, k, k); each channel sums to 1
    params: dict = field(default_factory=dict)  # kernel parameters and "noise_sigma"


def sample_blur(rng: np.random.Generator, cfg: SynthesizeConfig, blur_type: str | None = None) -> BlurSpec:
    """Draw a blur of ``blur_type`` (default: by the ``cfg.blur_mix`` proportions) and a noise level."""
    if blur_type is None:
        blur_type = choose_blur_type(rng, cfg.blur_mix)
    if blur_type == "motion":
        kernel, params = motion_kernel(rng, cfg.motion)
    elif blur_type == "gaussian":
        sigma = float(rng.uniform(cfg.gaussian.sigma_min, cfg.gaussian.sigma_max))
        kernel, params = gaussian_kernel(sigma), {"sigma": round(sigma, 4)}
    elif blur_type == "defocus":
        radius = float(rng.uniform(cfg.defocus.radius_min, cfg.defocus.radius_max))
        kernel, params = disk_kernel(radius), {"radius": round(radius, 4)}
    elif blur_type == "lens":
        kernel, params = lens_kernel(rng, cfg.lens)
    elif blur_type == NOISE:
        kernel, params = np.ones((1, 1), np.float32), {}
    else:
        raise ValueError(f"unknown blur type {blur_type!r}; known: {list(DEGRADATION_TYPES)}")
    low, high = (cfg.noise.sigma_min, cfg.noise.sigma_max) if blur_type == NOISE else (0.0, cfg.noise_sigma_max)
    noise_sigma = float(rng.uniform(low, high))
    params = {**params, "size": int(kernel.shape[-1]), "noise_sigma": round(noise_sigma, 6)}
    return BlurSpec(blur_type, kernel, params)


def choose_blur_type(rng: np.random.Generator, blur_mix: dict[str, float]) -> str:
    """A blur type drawn with the (normalised) ``blur_mix`` proportions, in ``DEGRADATION_TYPES`` order.

    ``noise`` comes last, so a mix without it draws exactly as before it existed.
    """
    weights = np.array([blur_mix.get(t, 0.0) for t in DEGRADATION_TYPES], np.float64)
    return DEGRADATION_TYPES[int(rng.choice(len(DEGRADATION_TYPES), p=weights / weights.sum()))]


def apply_blur(sharp: np.ndarray, spec: BlurSpec, cfg: SynthesizeConfig, rng: np.random.Generator) -> np.ndarray:
    """Blur uint8 HxWx3 ``sharp`` with ``spec`` in linear light, add sensor noise, round to uint8.

    Steps: decode with ``cfg.gamma`` (v/255)^gamma, convolve (reflected borders), encode back,
    add Gaussian noise of std ``spec.params["noise_sigma"]`` (in [0, 1] units), round to 8 bits.
    """
    if sharp.dtype != np.uint8 or sharp.ndim != 3 or sharp.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {sharp.dtype} {sharp.shape}")
    linear = _decode_lut(cfg.gamma)[sharp]
    blurred = convolve(linear, spec.kernel)
    encoded = pm.power(np.clip(blurred, 0.0, 1.0), float(np.float32(1.0 / cfg.gamma))).astype(np.float32)
    noise_sigma = spec.params.get("noise_sigma", 0.0)
    if noise_sigma > 0:
        encoded += rng.normal(0.0, noise_sigma, encoded.shape).astype(np.float32)
    return np.clip(np.round(encoded * 255.0), 0, 255).astype(np.uint8)


def blur_pair(sharp: np.ndarray, rng: np.random.Generator, cfg: SynthesizeConfig,
              blur_type: str | None = None) -> tuple[np.ndarray, BlurSpec]:
    """(blurred uint8 image, its BlurSpec) for a uint8 sharp image; pure function of ``rng`` (and ``blur_type``)."""
    spec = sample_blur(rng, cfg, blur_type)
    return apply_blur(sharp, spec, cfg, rng), spec


def convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """True convolution of float32 HxWx3 ``image`` with a (k, k) or (3, k, k) kernel, reflected borders."""
    image = image.astype(np.float32, copy=False)
    if kernel.ndim == 2:
        return cv2.filter2D(image, -1, np.ascontiguousarray(kernel[::-1, ::-1]), borderType=cv2.BORDER_REFLECT)
    channels = [cv2.filter2D(np.ascontiguousarray(image[..., c]), -1, np.ascontiguousarray(kernel[c, ::-1, ::-1]),
                             borderType=cv2.BORDER_REFLECT) for c in range(3)]
    return np.stack(channels, axis=-1)


def motion_kernel(rng: np.random.Generator, cfg: MotionConfig) -> tuple[np.ndarray, dict]:
    """A camera-shake PSF (Boracchi & Foi 2012) and its parameters.

    The kernel side is log-uniform in [min, max] (odd); the path, ``trajectory_length`` times that
    long, is centred on its weighted centroid and shrunk if needed to fit, then cropped to support.
    """
    low, high = math.log(cfg.min_kernel_size), math.log(cfg.max_kernel_size)
    side = _odd(math.exp(rng.uniform(low, high)), cfg.min_kernel_size, cfg.max_kernel_size)
    anxiety = float(cfg.anxiety_max * rng.random())
    path = shake_trajectory(rng, cfg.trajectory_length * side, anxiety)
    weights = _dwell_weights(rng, len(path))
    kernel = _crop_to_support(_rasterise(path, weights, side))
    return kernel, {"anxiety": round(anxiety, 5), "path_length": round(cfg.trajectory_length * side, 3),
                    "canvas": side}


def shake_trajectory(rng: np.random.Generator, length: float, anxiety: float,
                     steps: int = TRAJECTORY_STEPS) -> np.ndarray:
    """Complex positions of a camera-shake path of total ``length`` pixels (B&F's createTrajectory)."""
    centripetal = 0.7 * rng.random()
    big_shake_probability = 0.2 * rng.random()
    gaussian_shake = 10.0 * rng.random()
    direction = _unit_complex(2 * np.pi * rng.random())
    step = length / (steps - 1)
    big = rng.random(steps - 1) < big_shake_probability * anxiety
    turn = _unit_complex(np.pi + (rng.random(steps - 1) - 0.5))
    jitter = rng.standard_normal(steps - 1) + 1j * rng.standard_normal(steps - 1)
    velocity = direction * (anxiety if anxiety > 0 else step)
    positions = np.zeros(steps, np.complex128)
    x = 0j
    for t in range(steps - 1):
        dv = anxiety * (gaussian_shake * jitter[t] - centripetal * x) * step
        if big[t]:
            dv += 2 * velocity * turn[t]
        velocity += dv
        velocity *= step / max(abs(velocity), 1e-12)
        x += velocity
        positions[t + 1] = x
    return positions


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Isotropic Gaussian sampled on a (2*ceil(3 sigma)+1)^2 grid, normalised to sum 1."""
    half = max(1, math.ceil(3 * sigma))
    axis = np.arange(-half, half + 1, dtype=np.float64)
    g = pm.exp(-(axis * axis) / (2 * sigma ** 2))
    kernel = np.outer(g, g)
    return (kernel / kernel.sum()).astype(np.float32)


def disk_kernel(radius: float, edge_width: float = 0.0, centre: tuple[float, float] = (0.0, 0.0),
                half_size: int | None = None) -> np.ndarray:
    """Disk PSF of ``radius`` pixels, anti-aliased by supersampling, normalised to sum 1.

    ``edge_width`` > 0 replaces the hard edge by a linear ramp that wide (soft lens edge);
    ``centre`` offsets the disk (dx, dy) in pixels; ``half_size`` fixes the kernel to 2*half+1.
    """
    reach = radius + edge_width / 2 + max(abs(centre[0]), abs(centre[1]))
    half = half_size if half_size is not None else max(1, math.ceil(reach + 0.5))
    sub = (np.arange(SUPERSAMPLING) + 0.5) / SUPERSAMPLING - 0.5
    axis = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
    dy = axis[:, None] - centre[1]
    dx = axis[None, :] - centre[0]
    distance = np.hypot(dx, dy)
    if edge_width > 0:
        inside = np.clip((radius - distance) / edge_width + 0.5, 0.0, 1.0)
    else:
        inside = (distance <= radius).astype(np.float64)
    side = 2 * half + 1
    coverage = inside.reshape(side, SUPERSAMPLING, side, SUPERSAMPLING).mean(axis=(1, 3))
    if coverage.sum() <= 0:
        coverage[half, half] = 1.0
    return (coverage / coverage.sum()).astype(np.float32)


def lens_kernel(rng: np.random.Generator, cfg: LensConfig) -> tuple[np.ndarray, dict]:
    """Soft-edged defocus with chromatic aberration: a (3, k, k) kernel and its parameters.

    Red and blue differ from green in radius by +/- up to ``chromatic_shift / 2`` pixels (axial)
    and are displaced in opposite directions by up to ``chromatic_shift`` pixels (lateral).
    """
    radius = float(rng.uniform(cfg.radius_min, cfg.radius_max))
    edge_width = cfg.edge_softness * radius
    axial = float(rng.uniform(-0.5, 0.5) * cfg.chromatic_shift)
    lateral = float(rng.uniform(0.0, 1.0) * cfg.chromatic_shift)
    angle = float(rng.uniform(0, 2 * np.pi))
    radii = [max(0.5, radius + axial), radius, max(0.5, radius - axial)]
    offsets = [(lateral * math.cos(angle) * s, lateral * math.sin(angle) * s) for s in (1, 0, -1)]
    reach = max(radii) + edge_width / 2 + lateral
    half = max(1, math.ceil(reach + 0.5))
    kernel = np.stack([disk_kernel(r, edge_width, c, half) for r, c in zip(radii, offsets)])
    return kernel, {"radius": round(radius, 4), "edge_width": round(edge_width, 4),
                    "channel_radii": [round(r, 4) for r in radii],
                    "channel_offsets": [[round(dx, 4), round(dy, 4)] for dx, dy in offsets]}


def kernel_image(kernel: np.ndarray, side: int = 96) -> np.ndarray:
    """A kernel as a uint8 RGB picture (brightest tap white), nearest-neighbour scaled to ``side``."""
    planes = np.stack([kernel] * 3) if kernel.ndim == 2 else kernel
    peak = planes.max()
    rgb = np.transpose(planes / peak if peak > 0 else planes, (1, 2, 0))
    rgb = np.round(np.sqrt(np.clip(rgb, 0, 1)) * 255).astype(np.uint8)
    return cv2.resize(rgb, (side, side), interpolation=cv2.INTER_NEAREST)


def _decode_lut(gamma: float) -> np.ndarray:
    return pm.power(np.arange(256, dtype=np.float64) / 255.0, gamma).astype(np.float32)


def _unit_complex(angle):
    """exp(1j * angle), from the portable sine and cosine."""
    return pm.cos(angle) + 1j * pm.sin(angle)


def _odd(value: float, low: int, high: int) -> int:
    n = 2 * int(round((value - 1) / 2)) + 1
    return int(min(max(n, low), high))


def _dwell_weights(rng: np.random.Generator, count: int) -> np.ndarray:
    """Relative exposure time per path sample: the camera slows and speeds up smoothly."""
    t = np.linspace(0.0, 1.0, count)
    wobble = sum(rng.normal() * pm.sin(2 * np.pi * rng.uniform(0.5, 3.0) * t + rng.uniform(0, 2 * np.pi))
                 for _ in range(3))
    return pm.exp(rng.uniform(0.0, 0.7) * wobble)


def _rasterise(path: np.ndarray, weights: np.ndarray, side: int) -> np.ndarray:
    """Bilinear splat of weighted path samples into a side x side kernel, centroid on the centre."""
    centred = path - np.sum(weights * path) / weights.sum()
    reach = max(np.abs(centred.real).max(), np.abs(centred.imag).max(), 1e-9)
    limit = (side - 1) / 2 - 1
    if reach > limit:
        centred *= limit / reach
    x = centred.real + (side - 1) / 2
    y = centred.imag + (side - 1) / 2
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    kernel = np.zeros(side * side)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        kernel += np.bincount((y0 + dy) * side + x0 + dx, weights=weights * w, minlength=side * side)
    kernel = kernel.reshape(side, side)
    return kernel / kernel.sum()


def _crop_to_support(kernel: np.ndarray) -> np.ndarray:
    """Smallest odd centred crop holding every non-zero tap, renormalised to float32."""
    centre = kernel.shape[0] // 2
    ys, xs = np.nonzero(kernel > 0)
    half = max(1, int(max(np.abs(ys - centre).max(), np.abs(xs - centre).max())))
    crop = kernel[centre - half:centre + half + 1, centre - half:centre + half + 1]
    return (crop / crop.sum()).astype(np.float32)
