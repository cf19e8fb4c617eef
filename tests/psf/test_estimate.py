"""Blind kernel estimation (deblur.psf.estimate) and kernel comparison (deblur.psf.metrics) on real photo crops."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from conftest import ROOT

from deblur.core.config import load_params
from deblur.data.blur import BlurSpec, apply_blur, gaussian_kernel, motion_kernel
from deblur.psf.estimate import (EstimatorSettings, decode_srgb, encode_srgb, estimate_kernel, psf2otf, pyramid, select_crops)
from deblur.psf.metrics import aligned_shift, centre_kernel, error_ratio, kernel_ncc, support_box, support_size

MAX_KERNEL = 25   # px: the test kernels are at most 15 px, so a smaller pyramid keeps the tests fast


@pytest.fixture(scope="module")
def synthesize():
    return load_params(ROOT / "params.yaml").synthesize


def _photo(name: str, size: int = 320) -> np.ndarray:
    image = getattr(skimage.data, name)()
    image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    size = min(size, *image.shape[:2])
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def _blur(sharp: np.ndarray, kernel: np.ndarray, synthesize, noise_sigma: float = 0.002) -> np.ndarray:
    spec = BlurSpec("motion", kernel, {"noise_sigma": noise_sigma})
    return apply_blur(sharp, spec, synthesize, np.random.default_rng(0))


def _line_kernel(length: int, angle: float) -> np.ndarray:
    """A straight, uniform motion streak of ``length`` px at ``angle`` radians (odd square)."""
    kernel = np.zeros((length, length))
    centre = length // 2
    for t in np.linspace(-centre, centre, 8 * length):
        kernel[int(round(centre + t * np.sin(angle))), int(round(centre + t * np.cos(angle)))] += 1
    return (kernel / kernel.sum()).astype(np.float32)


def _shake_kernel(synthesize, seed: int, low: int, high: int) -> np.ndarray:
    """A camera-shake kernel drawn as the synthesize stage draws them, with its side in [low, high]."""
    rng = np.random.default_rng(seed)
    while True:
        kernel, _ = motion_kernel(rng, synthesize.motion)
        if low <= kernel.shape[0] <= high:
            return kernel


def _settings() -> EstimatorSettings:
    return EstimatorSettings(max_kernel_size=MAX_KERNEL)


# --- metrics ------------------------------------------------------------------------------------

def test_kernel_ncc_is_one_for_a_shifted_copy_and_lower_for_another_shape():
    kernel = _line_kernel(9, 0.4)
    shifted = np.zeros((15, 15), np.float32)
    shifted[4:13, 1:10] = kernel                     # other canvas, content off-centre by (+1, -2)
    assert kernel_ncc(kernel, shifted) == pytest.approx(1.0, abs=1e-9)
    assert kernel_ncc(shifted, kernel) == pytest.approx(1.0, abs=1e-9)
    assert aligned_shift(kernel, shifted) == (1, -2)
    assert aligned_shift(shifted, kernel) == (-1, 2)
    assert kernel_ncc(kernel, _line_kernel(9, 0.4 + np.pi / 2)) < 0.5
    delta = np.ones((1, 1), np.float32)
    assert kernel_ncc(delta, gaussian_kernel(2.0)) == pytest.approx(
        gaussian_kernel(2.0).max() / np.linalg.norm(gaussian_kernel(2.0)), rel=1e-6)


def test_centre_kernel_centres_the_support_box_not_the_centroid():
    kernel = np.zeros((21, 21), np.float32)
    kernel[3, 2:9] = 1.0          # a streak 7 px wide in the top-left corner ...
    kernel[4, 8] = 6.0            # ... with a heavy end: its centroid is far from the box centre
    kernel[15, 15] = 0.01         # a tap under 5 % of the peak: not support
    centred = centre_kernel(kernel)
    assert centred.shape == (7, 7) and centred.dtype == np.float32
    assert centred.sum() == pytest.approx(1.0, abs=1e-6)
    rows, cols = support_box(centred)
    assert (rows.start + rows.stop - 1) / 2 in (2.5, 3.0)      # a 2-row box sits on or just above the centre row
    assert (cols.start + cols.stop - 1) / 2 == 3.0
    assert centred[3, 6] == pytest.approx(6 / 13, rel=1e-5)    # the heavy end stays at the right edge
    assert support_size(centred) == 7


def test_error_ratio_is_one_for_the_true_kernel_and_large_for_a_wrong_one(synthesize):
    sharp = decode_srgb(_photo("astronaut", 160), 2.2) @ np.float32([0.2126, 0.7152, 0.0722])
    truth = _line_kernel(9, 0.0)
    blurred = periodic_blur(sharp, truth)

    def wiener(image, kernel):
        otf = psf2otf(kernel, image.shape)
        return np.fft.irfft2(np.conj(otf) * np.fft.rfft2(image) / (np.abs(otf) ** 2 + 1e-3), image.shape)

    assert error_ratio(sharp, blurred, truth, truth, wiener, max_shift=3) == pytest.approx(1.0)
    moved = np.zeros((13, 13), np.float32)
    moved[8, 2:11] = truth[4]                       # same kernel, 2 px off: the alignment absorbs the shift
    assert error_ratio(sharp, blurred, moved, truth, wiener, max_shift=3) == pytest.approx(1.0, abs=0.05)
    assert error_ratio(sharp, blurred, _line_kernel(9, np.pi / 2), truth, wiener, max_shift=3) > 3


def periodic_blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return np.fft.irfft2(np.fft.rfft2(image) * psf2otf(kernel, image.shape), image.shape)


# --- estimator ----------------------------------------------------------------------------------

def test_pyramid_runs_from_small_windows_to_the_largest_kernel():
    scales, sides = pyramid(EstimatorSettings(max_kernel_size=61))
    assert scales[-1] == 1.0 and sides[-1] == 61 and sides[0] <= 7
    assert all(s % 2 == 1 for s in sides) and sides == sorted(sides)


def test_crops_are_textured_and_apart():
    image = _photo("astronaut", 512)
    luminance = decode_srgb(image, 2.2).mean(axis=2)
    luminance[:, :256] = 0.3                             # flat left half: no crop there
    boxes = select_crops(luminance, 128, 3)
    assert len(boxes) == 3
    assert all(left >= 200 for _, left, _, _ in boxes)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = max(0, 128 - abs(a[0] - b[0])) * max(0, 128 - abs(a[1] - b[1]))
            assert overlap <= 128 * 128 / 2


def test_srgb_round_trip():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    assert np.array_equal(encode_srgb(decode_srgb(values, 2.2), 2.2), values)


@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_a_sharp_photo_gives_a_near_delta_kernel(name):
    estimate = estimate_kernel(_photo(name), MAX_KERNEL, settings=_settings())
    kernel = estimate.kernel
    c = kernel.shape[0] // 2
    centre_mass = kernel[max(0, c - 1):c + 2, max(0, c - 1):c + 2].sum()
    assert kernel.dtype == np.float32 and kernel.shape[0] % 2 == 1 and kernel.sum() == pytest.approx(1.0, abs=1e-5)
    assert centre_mass >= 0.8, (centre_mass, estimate.support)
    assert estimate.support <= 5


CASES = {   # name: (scene, kernel factory)
    "line 11 px on astronaut": ("astronaut", lambda s: _line_kernel(11, 0.5)),
    "line 15 px on grass": ("grass", lambda s: _line_kernel(15, 2.2)),
    "camera shake on astronaut": ("astronaut", lambda s: _shake_kernel(s, 3, 11, 15)),
    "camera shake on coffee": ("coffee", lambda s: _shake_kernel(s, 11, 9, 15)),
    "gaussian sigma 1.5 on grass": ("grass", lambda s: gaussian_kernel(1.5)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_known_kernels_are_recovered(case, synthesize):
    scene, make_kernel = CASES[case]
    truth = make_kernel(synthesize)
    estimate = estimate_kernel(_blur(_photo(scene), truth, synthesize), MAX_KERNEL, settings=_settings())
    ncc = kernel_ncc(estimate.kernel, truth)
    assert ncc >= 0.9, (case, ncc, estimate.support, truth.shape)
    assert abs(estimate.support - support_size(truth)) <= max(3, support_size(truth) // 3)
    assert estimate.kernel.sum() == pytest.approx(1.0, abs=1e-5) and (estimate.kernel >= 0).all()
    assert 0.0 <= estimate.confidence <= 1.0 and estimate.reblur_residual >= 0.0


def test_estimation_is_deterministic_and_reports_crops(synthesize):
    blurred = _blur(_photo("astronaut", 448), _line_kernel(9, 1.0), synthesize)
    settings = EstimatorSettings(max_kernel_size=MAX_KERNEL, crop_size=160, crops=3)
    first, second = estimate_kernel(blurred, MAX_KERNEL, settings=settings), \
        estimate_kernel(blurred, MAX_KERNEL, settings=settings)
    assert np.array_equal(first.kernel, second.kernel)
    assert len(first.crop_kernels) == 3 and len(first.crop_boxes) == 3
    assert max(kernel_ncc(first.kernel, k) for k in first.crop_kernels) >= 0.8   # the medoid, or a mean around it
    assert 0.0 <= first.crop_agreement <= 1.0


def test_latent_fn_is_called_at_coarse_scales_with_srgb_images(synthesize):
    blurred = _blur(_photo("astronaut", 256), _line_kernel(9, 1.0), synthesize)
    seen = []

    def identity(rgb):
        seen.append((rgb.dtype, rgb.shape))
        return rgb

    estimate_kernel(blurred, MAX_KERNEL, latent_fn=identity, settings=_settings())
    assert seen and all(dtype == np.uint8 and shape[2] == 3 for dtype, shape in seen)
    assert max(shape[0] for _, shape in seen) < 256         # coarse scales only
