"""Blind kernel estimation: one camera-shake PSF from one blurred photo, coarse to fine.

Method (documentation/kernel_aware.md), on linear-light luminance:
- a pyramid with a sqrt(2) step from a scale where the largest kernel is ``coarsest_kernel`` px to full
  resolution; coarse scales see the whole (downscaled) photo, finer ones several crops chosen by
  gradient energy, each refining its own copy of the kernel;
- at each scale, a few alternations of an x-step (L0-gradient deconvolution, Xu et al. CVPR 2013 /
  Pan et al. TPAMI 2017, half-quadratic splitting in the Fourier domain; optionally pulled towards the
  trained network's output, ``latent_fn``, at the scales where the blur is small in its pixels) and a
  k-step (least squares on the salient gradients of the latent, Cho & Lee 2009, in the Fourier
  domain, solved by conjugate gradients on the kernel window, with a Tikhonov weight that grows away
  from the centre), then positivity, small taps cut, the largest connected component, sum 1;
- the support is estimated, not fixed: each scale's window is the previous support, upsampled, plus a
  margin (up to ``max_kernel_size``); taps below ``tap_threshold`` of the peak are dropped and the kernel
  is returned on its support box, centred by the project convention (``deblur.psf.metrics.centre_kernel``);
- two final alternations at full resolution with a weaker L0 weight (a latent with more texture); the
  crops' kernels are compared (NCC), and the medoid averaged with those that agree.

Only numpy/scipy/OpenCV here; the network comes in as a callable (``bench_quality_speed.network_latent_fn`` builds one
from a checkpoint), so this package imports nothing above it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Callable

import cv2
import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from deblur.psf.metrics import aligned_shift, centre_kernel, kernel_ncc, support_box, support_size

LatentFn = Callable[[np.ndarray], np.ndarray]   # sRGB uint8 HxWx3 -> its sharp estimate, same shape
LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)   # Rec. 709 weights, applied in linear light


@dataclass(frozen=True)
class EstimatorSettings:
    """Parameters of ``estimate_kernel`` (defaults tuned on synthetic camera shake, see the docs)."""

    max_kernel_size: int = 61       # px, the largest kernel side looked for (the finest window)
    crop_size: int = 256            # px, side of each crop at the fine scales
    crops: int = 3                  # crops at the fine scales (their kernels are compared)
    scale_step: float = math.sqrt(0.5)
    coarsest_kernel: int = 5        # px, the window side at the coarsest scale
    iterations: int = 6             # x-step / k-step alternations per scale
    l0_weight: float = 4e-3         # L0 gradient weight of the x-step (luminance normalised to its 99.5th percentile)
    kernel_weight: float = 0.02     # Tikhonov weight of the k-step, relative to the latent's gradient energy
    spread_weight: float = 1.0      # extra Tikhonov weight at the window's edge (x (r/R)^2): favours compact kernels
    edge_pixels: float = 50.0       # salient gradients kept per orientation, per px of window side
    polish_iterations: int = 2      # extra alternations at full resolution ...
    polish_l0_weight: float = 5e-4  # ... with this weaker L0 weight: a latent with more texture
    agreement_to_average: float = 0.8   # crop kernels this close (NCC) to the medoid are averaged with it
    tap_threshold: float = 0.08     # taps below this share of the peak are dropped
    window_margin: float = 0.3      # the next scale's window: the upsampled support plus this share per side
    min_window_margin: int = 3      # ... and at least this many px per side
    cg_iterations: int = 20
    l0_kappa: float = 2.0           # x-step: beta grows by this factor ...
    l0_beta_max: float = 1e3        # ... up to this
    network_weight: float = 1.0     # pull of the x-step towards the network's latent (relative to beta)
    network_max_kernel: int = 23    # use ``latent_fn`` at scales whose window is at most this many px
    gamma: float = 2.2              # sRGB decoding, as the blur synthesis does (deblur.data.blur)


@dataclass(frozen=True)
class KernelEstimate:
    """A blind estimate: the kernel and the evidence a selector can weigh it by."""

    kernel: np.ndarray               # float32, odd square, sum 1, centred on its support box
    support: int                     # px, longer side of the support box
    crop_kernels: tuple[np.ndarray, ...]   # one per fine-scale crop (centred); ``kernel`` is the aligned mean
                                           # of the medoid and those agreeing with it
    crop_boxes: tuple[tuple[int, int, int, int], ...]   # (top, left, height, width) in the input image
    crop_agreement: float            # median pairwise kernel NCC between the crops' kernels (1 with one crop)
    reblur_residual: float           # |latent * kernel - blurred| / |blurred - mean|, on the chosen crop
    confidence: float                # in [0, 1]: crop agreement, lowered by a large reblur residual
    seconds: float
    scales: tuple[float, ...] = field(default=())


@dataclass
class _Region:
    """One image region refined at one scale: linear luminance (normalised) and its kernel."""

    luminance: np.ndarray
    rgb_linear: np.ndarray | None
    kernel: np.ndarray
    centre: tuple[float, float]      # full-resolution (y, x) of the region's centre
    latent: np.ndarray | None = None


def estimate_kernel(image: np.ndarray, max_kernel_size: int = 61, latent_fn: LatentFn | None = None,
                    settings: EstimatorSettings | None = None) -> KernelEstimate:
    """Estimate the (spatially uniform) blur kernel of an sRGB uint8 HxWx3 photo.

    ``latent_fn`` (e.g. the served model's fast mode) gives a sharp estimate of an sRGB uint8
    image; it is used at the coarse scales only (``settings.network_max_kernel``).
    """
    start = time.perf_counter()
    settings = replace(settings or EstimatorSettings(), max_kernel_size=max_kernel_size)
    rgb_linear = decode_srgb(_check_rgb(image), settings.gamma)
    luminance = rgb_linear @ LUMA
    boxes = select_crops(luminance, min(settings.crop_size, *luminance.shape), settings.crops)
    scales, sides = pyramid(settings)
    regions: list[_Region] = []
    for scale, side in zip(scales, sides):
        use_network = latent_fn is not None and side <= settings.network_max_kernel
        regions = _regions_at(scale, side, rgb_linear, luminance, boxes, regions, settings, use_network)
        for region in regions:
            region.latent = latent_fn_luminance(latent_fn, region.rgb_linear, settings.gamma,
                                                region.luminance) if use_network else None
            region.kernel = refine(region, settings)
    for region in regions:
        region.kernel = refine(region, settings, settings.polish_iterations, settings.polish_l0_weight)
    crop_kernels = tuple(centre_kernel(r.kernel, settings.tap_threshold) for r in regions)
    chosen = _medoid(crop_kernels)
    kernel = combine(crop_kernels, chosen, settings)
    agreement = _agreement(crop_kernels)
    residual = reblur_residual(regions[chosen].luminance, kernel, settings)
    return KernelEstimate(
        kernel=kernel, support=support_size(kernel, settings.tap_threshold),
        crop_kernels=crop_kernels, crop_boxes=tuple(boxes) if len(regions) > 1 else ((0, 0, *luminance.shape),),
        crop_agreement=agreement, reblur_residual=residual, confidence=_confidence(agreement, residual),
        seconds=time.perf_counter() - start, scales=tuple(scales))


# --- pyramid and regions ------------------------------------------------------------------------

def pyramid(settings: EstimatorSettings) -> tuple[list[float], list[int]]:
    """Scales (coarse to fine, the last 1.0) and the kernel window side at each."""
    ratio = settings.coarsest_kernel / settings.max_kernel_size
    levels = max(0, math.floor(math.log(ratio) / math.log(settings.scale_step))) if ratio < 1 else 0
    scales = [settings.scale_step ** j for j in range(levels, -1, -1)]
    sides = [max(3, _odd_up(settings.max_kernel_size * s)) for s in scales]
    sides[-1] = _odd_up(settings.max_kernel_size)
    return scales, sides


def select_crops(luminance: np.ndarray, side: int, count: int) -> list[tuple[int, int, int, int]]:
    """Up to ``count`` (top, left, side, side) windows with the most gradient energy, overlapping
    each other by at most half a side. Energy is the log gradient magnitude above the median, so a
    few very bright edges do not outweigh texture."""
    h, w = luminance.shape
    gy, gx = np.gradient(np.sqrt(np.clip(luminance, 0, None)))
    magnitude = np.hypot(gx, gy)
    energy = np.log1p(magnitude / (np.median(magnitude) + 1e-6))
    integral = cv2.integral(energy.astype(np.float64))
    step = max(8, side // 8)
    tops, lefts = np.arange(0, h - side + 1, step), np.arange(0, w - side + 1, step)
    tops = np.unique(np.append(tops, h - side))
    lefts = np.unique(np.append(lefts, w - side))
    t, l = np.meshgrid(tops, lefts, indexing="ij")
    scores = integral[t + side, l + side] - integral[t, l + side] - integral[t + side, l] + integral[t, l]
    chosen: list[tuple[int, int, int, int]] = []
    for index in np.argsort(-scores, axis=None, kind="stable"):
        top, left = int(t.flat[index]), int(l.flat[index])
        if all(_overlap(top, left, c[0], c[1], side) <= 0.5 for c in chosen):
            chosen.append((top, left, side, side))
            if len(chosen) == count:
                break
    return chosen


def _overlap(top_a, left_a, top_b, left_b, side) -> float:
    dy, dx = max(0, side - abs(top_a - top_b)), max(0, side - abs(left_a - left_b))
    return dy * dx / side ** 2


def _regions_at(scale, side, rgb_linear, luminance, boxes, previous: list[_Region], settings,
                use_network) -> list[_Region]:
    """The regions refined at ``scale``: the whole photo while it fits the crop budget, else one
    region per crop; each starts from its predecessor's kernel, resized to this scale."""
    h, w = luminance.shape
    fits = max(h, w) * scale <= 1.5 * settings.crop_size
    if fits:
        centres = [((h - 1) / 2, (w - 1) / 2)]
        windows = [(0, 0, h, w)]
    else:
        centres = [(top + (bh - 1) / 2, left + (bw - 1) / 2) for top, left, bh, bw in boxes]
        half = settings.crop_size / scale / 2
        windows = [_window(cy, cx, half, h, w) for cy, cx in centres]
    regions = []
    for centre, (top, left, bottom, right) in zip(centres, windows):
        parent = _nearest(previous, centre)
        window = side if parent is None else min(side, _grown_window(parent.kernel, settings))
        kernel = _delta(window) if parent is None else resize_kernel(parent.kernel, window, 1 / settings.scale_step)
        lum = _downscale(luminance[top:bottom, left:right], scale)
        rgb = _downscale(rgb_linear[top:bottom, left:right], scale) if use_network else None
        regions.append(_Region(luminance=lum, rgb_linear=rgb, kernel=kernel, centre=centre))
    return regions


def _grown_window(kernel: np.ndarray, settings: EstimatorSettings) -> int:
    """The window side at the next scale: the kernel's support, upsampled, with room to grow."""
    support = support_size(kernel, settings.tap_threshold) / settings.scale_step
    margin = max(settings.min_window_margin, settings.window_margin * support)
    return _odd_up(support + 2 * margin)


def _window(cy, cx, half, h, w) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a window of half-side ``half`` around (cy, cx), moved inside the image."""
    size_y, size_x = min(h, round(2 * half)), min(w, round(2 * half))
    top = int(min(max(0, round(cy - size_y / 2)), h - size_y))
    left = int(min(max(0, round(cx - size_x / 2)), w - size_x))
    return top, left, top + size_y, left + size_x


def _nearest(regions: list[_Region], centre) -> _Region | None:
    if not regions:
        return None
    return min(regions, key=lambda r: (r.centre[0] - centre[0]) ** 2 + (r.centre[1] - centre[1]) ** 2)


def _downscale(image: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1:
        return np.ascontiguousarray(image, np.float32)
    h, w = image.shape[:2]
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return cv2.resize(np.ascontiguousarray(image, np.float32), size, interpolation=cv2.INTER_AREA)


# --- one scale: alternating x- and k-steps ------------------------------------------------------

def refine(region: _Region, settings: EstimatorSettings, iterations: int | None = None,
           l0_weight: float | None = None) -> np.ndarray:
    """Alternations of x- and k-steps on ``region`` from its kernel (default: ``settings.iterations``,
    ``settings.l0_weight``); the new kernel."""
    iterations = settings.iterations if iterations is None else iterations
    l0_weight = settings.l0_weight if l0_weight is None else l0_weight
    side = region.kernel.shape[0]
    scale = 1.0 / max(float(np.percentile(region.luminance, 99.5)), 1e-3)
    blurred = periodic_extend(region.luminance * scale, side)
    prior = None if region.latent is None else periodic_extend(region.latent * scale, side)
    inside = (slice(0, region.luminance.shape[0]), slice(0, region.luminance.shape[1]))
    kernel = region.kernel
    blurred_gradients = gradients(blurred)
    for _ in range(iterations):
        latent = l0_deconvolve(blurred, kernel, l0_weight, prior, settings.network_weight, settings.l0_kappa,
                               settings.l0_beta_max)
        latent_gradients = salient_gradients(latent, side, settings.edge_pixels, inside)
        kernel = fit_kernel(latent_gradients, blurred_gradients, side, settings)
        kernel = recentre(_clean(kernel, settings.tap_threshold))
    return kernel


def periodic_extend(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` with at least ``side`` px appended below and right, blending linearly back into the
    first row/column, so the result is continuous when wrapped (FFT-friendly size)."""
    h, w = image.shape
    big_h, big_w = sfft.next_fast_len(h + side, real=True), sfft.next_fast_len(w + side, real=True)
    out = np.empty((big_h, big_w), np.float32)
    out[:h, :w] = image
    ramp_y = (np.arange(1, big_h - h + 1) / (big_h - h + 1))[:, None]
    out[h:, :w] = (1 - ramp_y) * image[-1:, :] + ramp_y * image[:1, :]
    ramp_x = (np.arange(1, big_w - w + 1) / (big_w - w + 1))[None, :]
    out[:, w:] = (1 - ramp_x) * out[:, w - 1:w] + ramp_x * out[:, :1]
    return out


def gradients(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Circular forward differences (x, y)."""
    return np.roll(image, -1, axis=1) - image, np.roll(image, -1, axis=0) - image


def l0_deconvolve(blurred: np.ndarray, kernel: np.ndarray, weight: float, prior: np.ndarray | None = None,
                  prior_weight: float = 0.0, kappa: float = 2.0, beta_max: float = 1e3) -> np.ndarray:
    """argmin_x |k * x - y|^2 + weight |grad x|_0 (+ prior_weight beta |x - prior|^2), by half-quadratic
    splitting with beta doubling (Xu et al. 2013), on a periodic image."""
    shape = blurred.shape
    otf = psf2otf(kernel, shape)
    # convolution kernels of the forward differences in ``gradients``
    dx = psf2otf(np.array([[0, 0, 0], [1, -1, 0], [0, 0, 0]]), shape)
    dy = psf2otf(np.array([[0, 1, 0], [0, -1, 0], [0, 0, 0]]), shape)
    blurred = blurred.astype(np.float32)
    otf, dx, dy = otf.astype(np.complex64), dx.astype(np.complex64), dy.astype(np.complex64)
    numerator = np.conj(otf) * sfft.rfft2(blurred)
    denominator = np.abs(otf) ** 2
    difference_energy = np.abs(dx) ** 2 + np.abs(dy) ** 2
    prior_spectrum = None if prior is None else sfft.rfft2(prior.astype(np.float32))
    latent = blurred
    beta = 2 * weight
    while beta < beta_max:
        gx, gy = gradients(latent)
        small = gx ** 2 + gy ** 2 < weight / beta
        gx[small], gy[small] = 0, 0
        divergence = np.conj(dx) * sfft.rfft2(gx) + np.conj(dy) * sfft.rfft2(gy)
        top, bottom = numerator + beta * divergence, denominator + beta * difference_energy
        if prior_spectrum is not None:
            top, bottom = top + prior_weight * beta * prior_spectrum, bottom + prior_weight * beta
        latent = sfft.irfft2(top / bottom, shape)
        beta *= kappa
    return latent


def salient_gradients(latent: np.ndarray, side: int, edge_pixels: float,
                      inside: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """The latent's gradients where they are strong (Cho & Lee 2009): a magnitude threshold keeping at
    least ``edge_pixels * side`` pixels in each of 4 orientation bins; zero outside ``inside``."""
    gx, gy = gradients(latent)
    magnitude = np.hypot(gx, gy)
    mask = np.zeros_like(magnitude, bool)
    mask[inside] = True
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    keep = max(10, int(edge_pixels * side))
    threshold = np.inf
    for b in range(4):
        values = magnitude[mask & (angle >= b * np.pi / 4) & (angle < (b + 1) * np.pi / 4)]
        if values.size:
            threshold = min(threshold, np.partition(values, -min(keep, values.size))[-min(keep, values.size)])
    strong = mask & (magnitude >= threshold)
    return np.where(strong, gx, 0.0), np.where(strong, gy, 0.0)


def fit_kernel(latent_gradients, blurred_gradients, side: int, settings: EstimatorSettings) -> np.ndarray:
    """argmin_k sum_d |k * latent_d - blurred_d|^2 + lambda |(1 + spread_weight (r / R)^2)^(1/2) k|^2 on a
    ``side`` window, lambda = kernel_weight * the latent's gradient energy: the unconstrained Fourier
    solution cropped to the window, refined by conjugate gradients with the window constraint."""
    shape = latent_gradients[0].shape
    spectra = [sfft.rfft2(g) for g in latent_gradients]
    gram = sum(np.abs(s) ** 2 for s in spectra)
    correlation = sum(np.conj(s) * sfft.rfft2(b) for s, b in zip(spectra, blurred_gradients))
    energy = float(sum(np.sum(g ** 2) for g in latent_gradients))
    if energy <= 0:
        return _delta(side)
    weight = settings.kernel_weight * energy
    radius = np.hypot(*(np.indices((side, side)) - side // 2)) / max(side // 2, 1)
    tikhonov = weight * (1 + settings.spread_weight * radius ** 2)

    def apply(k):
        return otf2psf(gram * psf2otf(k, shape), side) + tikhonov * k

    start = otf2psf(correlation / (gram + weight), side)
    return conjugate_gradients(apply, otf2psf(correlation, side), start, settings.cg_iterations)


def conjugate_gradients(apply, rhs: np.ndarray, x: np.ndarray, iterations: int) -> np.ndarray:
    """Solve apply(x) = rhs for a symmetric positive definite ``apply``."""
    residual = rhs - apply(x)
    direction = residual.copy()
    norm = float(np.sum(residual ** 2))
    for _ in range(iterations):
        if norm < 1e-20:
            break
        image = apply(direction)
        step = norm / float(np.sum(direction * image))
        x = x + step * direction
        residual = residual - step * image
        new_norm = float(np.sum(residual ** 2))
        direction = residual + new_norm / norm * direction
        norm = new_norm
    return x


def psf2otf(kernel: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Real FFT of ``kernel`` zero-padded to ``shape``, its centre moved to the origin."""
    padded = np.zeros(shape, np.float32)
    kh, kw = kernel.shape
    padded[:kh, :kw] = kernel
    return sfft.rfft2(np.roll(padded, (-(kh // 2), -(kw // 2)), axis=(0, 1)))


def otf2psf(spectrum: np.ndarray, side: int) -> np.ndarray:
    """The centred ``side`` x ``side`` window of the inverse real FFT of ``spectrum``."""
    full = sfft.irfft2(spectrum)
    half = side // 2
    return np.roll(full, (half, half), axis=(0, 1))[:side, :side]


# --- kernel clean-up ----------------------------------------------------------------------------

def _clean(kernel: np.ndarray, threshold: float) -> np.ndarray:
    """Non-negative, taps under ``threshold`` of the peak dropped, the largest 8-connected component
    (by mass) kept, sum 1."""
    kernel = np.clip(kernel, 0.0, None)
    if kernel.max() <= 0:
        return _delta(kernel.shape[0])
    above = kernel >= threshold * kernel.max()
    labels, count = ndimage.label(above, structure=np.ones((3, 3)))
    if count > 1:
        mass = ndimage.sum_labels(kernel, labels, index=np.arange(1, count + 1))
        above = labels == 1 + int(np.argmax(mass))
    kernel = np.where(above, kernel, 0.0)
    return kernel / kernel.sum()


def _delta(side: int) -> np.ndarray:
    kernel = np.zeros((side, side))
    kernel[side // 2, side // 2] = 1.0
    return kernel


def recentre(kernel: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """The kernel moved by whole pixels so its support box is centred in the (unchanged) window."""
    rows, cols = support_box(kernel, fraction)
    centre = kernel.shape[0] // 2
    dy = centre - (rows.start + rows.stop - 1) // 2
    dx = centre - (cols.start + cols.stop - 1) // 2
    moved = np.zeros_like(kernel)
    src_r = slice(max(0, -dy), kernel.shape[0] - max(0, dy))
    src_c = slice(max(0, -dx), kernel.shape[1] - max(0, dx))
    dst_r = slice(max(0, dy), kernel.shape[0] - max(0, -dy))
    dst_c = slice(max(0, dx), kernel.shape[1] - max(0, -dx))
    moved[dst_r, dst_c] = kernel[src_r, src_c]
    return moved / moved.sum() if moved.sum() > 0 else kernel


def resize_kernel(kernel: np.ndarray, side: int, factor: float) -> np.ndarray:
    """``kernel`` magnified by ``factor`` about its centre into a ``side`` x ``side`` window, sum 1."""
    centre_in, centre_out = kernel.shape[0] // 2, side // 2
    matrix = np.array([[factor, 0, centre_out - factor * centre_in], [0, factor, centre_out - factor * centre_in]])
    out = cv2.warpAffine(kernel.astype(np.float64), matrix, (side, side), flags=cv2.INTER_LINEAR)
    out = np.clip(out, 0.0, None)
    if out.sum() <= 0:
        out[centre_out, centre_out] = 1.0
    return out / out.sum()


# --- evidence -----------------------------------------------------------------------------------

def reblur_residual(luminance: np.ndarray, kernel: np.ndarray, settings: EstimatorSettings) -> float:
    """|latent * kernel - blurred| / |blurred - mean| on the region (borders of a kernel side left out),
    the latent from the x-step with ``kernel``."""
    side = kernel.shape[0]
    scale = 1.0 / max(float(np.percentile(luminance, 99.5)), 1e-3)
    blurred = periodic_extend(luminance * scale, side)
    latent = l0_deconvolve(blurred, kernel, settings.l0_weight, kappa=settings.l0_kappa, beta_max=settings.l0_beta_max)
    reblurred = sfft.irfft2(sfft.rfft2(latent) * psf2otf(kernel, blurred.shape), blurred.shape)
    h, w = luminance.shape
    m = min(side, h // 4, w // 4)
    inner = (slice(m, h - m), slice(m, w - m))
    target = blurred[inner]
    return float(np.linalg.norm(reblurred[inner] - target) / max(np.linalg.norm(target - target.mean()), 1e-12))


def combine(kernels: tuple[np.ndarray, ...], chosen: int, settings: EstimatorSettings) -> np.ndarray:
    """The mean of ``kernels[chosen]`` and the crop kernels that agree with it (NCC at least
    ``agreement_to_average``), each aligned to it first; cleaned and centred."""
    reference = kernels[chosen]
    side = 2 * max(k.shape[0] for k in kernels) + 1
    total = np.zeros((side, side))
    for k in kernels:
        if k is not reference and kernel_ncc(k, reference) < settings.agreement_to_average:
            continue
        dy, dx = aligned_shift(k, reference)
        top, left = side // 2 - k.shape[0] // 2 + dy, side // 2 - k.shape[1] // 2 + dx
        if 0 <= top and 0 <= left and top + k.shape[0] <= side and left + k.shape[1] <= side:
            total[top:top + k.shape[0], left:left + k.shape[1]] += k
    return centre_kernel(_clean(total, settings.tap_threshold), settings.tap_threshold)


def _agreement(kernels: tuple[np.ndarray, ...]) -> float:
    if len(kernels) < 2:
        return 1.0
    return float(np.median([kernel_ncc(a, b) for a, b in combinations(kernels, 2)]))


def _medoid(kernels: tuple[np.ndarray, ...]) -> int:
    """Index of the kernel most similar (summed NCC) to the others."""
    if len(kernels) < 3:
        return 0
    totals = [sum(kernel_ncc(a, b) for j, b in enumerate(kernels) if j != i) for i, a in enumerate(kernels)]
    return int(np.argmax(totals))


def _confidence(agreement: float, residual: float) -> float:
    return float(np.clip(agreement * (1.0 - min(residual, 1.0)), 0.0, 1.0))


# --- inputs, the network latent -------------------------------------------------------------------

def decode_srgb(image: np.ndarray, gamma: float) -> np.ndarray:
    """sRGB uint8 -> linear float32 in [0, 1] by (v / 255)^gamma (as ``deblur.data.blur.apply_blur``)."""
    lut = ((np.arange(256, dtype=np.float64) / 255.0) ** gamma).astype(np.float32)
    return lut[image]


def encode_srgb(linear: np.ndarray, gamma: float) -> np.ndarray:
    """Linear float in [0, 1] -> sRGB uint8, the inverse of ``decode_srgb``."""
    return np.clip(np.round(np.power(np.clip(linear, 0.0, 1.0), 1.0 / gamma) * 255.0), 0, 255).astype(np.uint8)


def latent_fn_luminance(latent_fn: LatentFn, rgb_linear: np.ndarray, gamma: float, luminance: np.ndarray) -> np.ndarray:
    """The network's sharp estimate of a linear RGB region, as linear luminance of the same shape."""
    sharp = np.asarray(latent_fn(encode_srgb(rgb_linear, gamma)))
    if sharp.shape[:2] != luminance.shape:
        raise ValueError(f"latent_fn returned {sharp.shape}, expected {luminance.shape} x 3")
    return decode_srgb(sharp, gamma) @ LUMA if sharp.dtype == np.uint8 else \
        np.power(np.clip(sharp, 0.0, 1.0), gamma).astype(np.float32) @ LUMA


def _check_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an sRGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 32:
        raise ValueError(f"image too small for kernel estimation: {image.shape[:2]}")
    return image


def _odd_up(value: float) -> int:
    n = math.ceil(value)
    return n if n % 2 else n + 1

