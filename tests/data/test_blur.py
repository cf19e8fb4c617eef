"""Blur synthesis: valid kernels of every type, blur in linear light, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT

from deblur.core.config import BLUR_TYPES, load_params
from deblur.data.blur import (BlurSpec, apply_blur, blur_pair, choose_blur_type, disk_kernel, kernel_image, sample_blur)
from deblur.data.deadleaves import dead_leaves
from deblur.data.synthesize import psnr_uint8


@pytest.fixture(scope="module")
def sharp() -> np.ndarray:
    cfg = load_params(ROOT / "params.yaml").ingest.embedded.dead_leaves
    return dead_leaves(np.random.default_rng(0), cfg, size=96)


def _centroid(kernel: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[0:kernel.shape[0], 0:kernel.shape[1]]
    return float((kernel * ys).sum() / kernel.sum()), float((kernel * xs).sum() / kernel.sum())


@pytest.mark.parametrize("blur_type", BLUR_TYPES)
def test_kernels_are_valid_psfs(tiny_params, blur_type):
    cfg = tiny_params.synthesize
    rng = np.random.default_rng(1)
    for _ in range(25):
        spec = sample_blur(rng, cfg, blur_type)
        k = spec.kernel
        assert spec.blur_type == blur_type and k.dtype == np.float32
        assert k.ndim == (3 if blur_type == "lens" else 2)
        assert k.shape[-1] == k.shape[-2] and k.shape[-1] % 2 == 1 and k.shape[-1] == spec.params["size"]
        assert (k >= 0).all()
        np.testing.assert_allclose(k.sum(axis=(-2, -1)), 1.0, atol=1e-5)
        assert 0 <= spec.params["noise_sigma"] <= cfg.noise_sigma_max
        json.dumps(spec.params)                                  # JSON-serialisable
        if blur_type == "motion":
            assert k.shape[0] <= cfg.motion.max_kernel_size
        if blur_type != "lens":                                  # no shift of the image
            centre = (k.shape[0] - 1) / 2
            np.testing.assert_allclose(_centroid(k), (centre, centre), atol=0.05)


def test_lens_kernel_has_chromatic_aberration(tiny_params):
    cfg = tiny_params.synthesize.model_copy(update={"lens": tiny_params.synthesize.lens.model_copy(
        update={"chromatic_shift": 2.0})})
    specs = [sample_blur(np.random.default_rng(s), cfg, "lens") for s in range(5)]
    assert any(not np.allclose(s.kernel[0], s.kernel[2], atol=1e-4) for s in specs)


def test_motion_kernels_vary_in_size_and_shape(tiny_params):
    rng = np.random.default_rng(2)
    sizes = {sample_blur(rng, tiny_params.synthesize, "motion").kernel.shape[0] for _ in range(40)}
    assert len(sizes) >= 4


@pytest.mark.parametrize("blur_type", BLUR_TYPES)
def test_blurring_lowers_psnr_and_is_deterministic(tiny_params, sharp, blur_type):
    cfg = tiny_params.synthesize
    spec = sample_blur(np.random.default_rng(3), cfg, blur_type)
    blurred = apply_blur(sharp, spec, cfg, np.random.default_rng(4))
    assert blurred.shape == sharp.shape and blurred.dtype == np.uint8
    assert np.isfinite(psnr_uint8(blurred, sharp)) and psnr_uint8(blurred, sharp) < 40.0
    again = apply_blur(sharp, sample_blur(np.random.default_rng(3), cfg, blur_type), cfg, np.random.default_rng(4))
    assert np.array_equal(blurred, again)


def test_blur_pair_is_a_pure_function_of_the_generator(tiny_params, sharp):
    a, spec_a = blur_pair(sharp, np.random.default_rng(9), tiny_params.synthesize)
    b, spec_b = blur_pair(sharp.copy(), np.random.default_rng(9), tiny_params.synthesize)
    assert np.array_equal(a, b) and np.array_equal(spec_a.kernel, spec_b.kernel) and spec_a.params == spec_b.params
    c, _ = blur_pair(sharp, np.random.default_rng(10), tiny_params.synthesize)
    assert not np.array_equal(a, c)


def test_identity_kernel_round_trips_exactly(tiny_params, sharp):
    spec = BlurSpec("gaussian", np.ones((1, 1), np.float32), {"noise_sigma": 0.0})
    assert np.array_equal(apply_blur(sharp, spec, tiny_params.synthesize, np.random.default_rng(0)), sharp)


def test_blur_happens_in_linear_light(tiny_params):
    edge = np.zeros((8, 8, 3), np.uint8)
    edge[:, 4:] = 255
    box = np.zeros((3, 3), np.float32)
    box[1, 1:] = 0.5                                  # averages each pixel with its right-hand neighbour
    spec = BlurSpec("gaussian", box, {"noise_sigma": 0.0})
    out = apply_blur(edge, spec, tiny_params.synthesize, np.random.default_rng(0))
    expected = round(255 * 0.5 ** (1 / tiny_params.synthesize.gamma))    # 186 for gamma 2.2, not 128
    assert sorted(set(out[0, :, 0].tolist())) == [0, expected, 255]


def test_noise_is_added_with_the_drawn_sigma(tiny_params):
    flat = np.full((64, 64, 3), 128, np.uint8)
    spec = BlurSpec("gaussian", np.ones((1, 1), np.float32), {"noise_sigma": 0.02})
    out = apply_blur(flat, spec, tiny_params.synthesize, np.random.default_rng(0)).astype(np.float64)
    assert abs(out.std() / 255 - 0.02) < 0.003


def test_blur_mix_proportions_are_followed(tiny_params):
    rng = np.random.default_rng(0)
    draws = [choose_blur_type(rng, {"motion": 3.0, "defocus": 1.0, "gaussian": 0.0}) for _ in range(2000)]
    assert set(draws) == {"motion", "defocus"}
    assert abs(draws.count("motion") / 2000 - 0.75) < 0.04
    with pytest.raises(ValueError, match="unknown blur type 'zoom'"):
        sample_blur(rng, tiny_params.synthesize, "zoom")


def test_disk_kernel_is_antialiased_and_kernel_image_renders():
    k = disk_kernel(2.5)
    assert len(np.unique(np.round(k, 6))) > 2                       # partial coverage at the rim
    picture = kernel_image(np.stack([k, k, k]), side=48)
    assert picture.shape == (48, 48, 3) and picture.dtype == np.uint8 and picture.max() == 255
