"""Thorough mode (deblur.psf.restore): candidates, the evidence-based choice, registration to the input,
its place in evaluation, and the pyfunc's ``mode`` param and ``psf`` column. Real photos, real kernels."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import skimage.data
from conftest import ROOT
from mlflow.exceptions import MlflowException
from PIL import Image

from deblur.core.config import load_params
from deblur.data.blur import BlurSpec, apply_blur, motion_kernel
from deblur.data.pairs import PairRecord
from deblur.evaluation.scoring import evaluate_model
from deblur.core.imageio import write_png
from deblur.evaluation.metrics import psnr
from deblur.psf.estimate import KernelEstimate
from deblur.psf.restore import blur_rms, centroid_offset, choose, network_at_scale, register_to_input, restore_thorough, \
    restore_with_psf, shrink_weight

PARAMS = load_params(ROOT / "params.yaml")
CFG = PARAMS.kernel_aware
UNSHRUNK = CFG.model_copy(update={"input_shrink": 0.0})


def identity(rgb: np.ndarray) -> np.ndarray:
    """A network that changes nothing: the thorough mode's own work is then all that moves pixels."""
    return rgb.copy()


def shaken(sharp: np.ndarray, seed: int, low: int = 11, high: int = 17) -> tuple[np.ndarray, np.ndarray]:
    """``sharp`` blurred (linear light, noise 0.002) by a seeded camera-shake kernel with a side in [low, high]."""
    rng = np.random.default_rng(seed)
    motion = PARAMS.synthesize.motion.model_copy(update={"min_kernel_size": low, "max_kernel_size": high})
    kernel, _ = motion_kernel(rng, motion)
    return apply_blur(sharp, BlurSpec("motion", kernel, {"noise_sigma": 0.002}), PARAMS.synthesize, rng), kernel


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut()[40:296, 120:376])


def test_thorough_mode_estimates_the_shake_and_deconvolves_it(astronaut):
    blurred, kernel = shaken(astronaut, seed=3)
    result, made = restore_thorough(blurred, identity, CFG, all_candidates=True)
    assert result.chosen == "kernel", result.evidence
    gain = psnr(made["deconvolved"], astronaut) - psnr(blurred, astronaut)
    assert gain >= 3.0, (gain, result.evidence)
    assert psnr(result.image, astronaut) > psnr(blurred, astronaut) + 1.0   # the hedge keeps most of it
    assert result.psf is not None and result.psf.shape[0] % 2 == 1 and abs(result.psf.sum() - 1) < 1e-5
    assert set(made) == {"kernel", "deconvolved", "network", "network_half", "network_quarter", "input"}
    # registered to the input: no integer shift of the output scores better
    shifts = {(dy, dx): psnr(np.roll(result.image, (dy, dx), axis=(0, 1))[8:-8, 8:-8], astronaut[8:-8, 8:-8])
              for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert max(shifts, key=shifts.get) == (0, 0), shifts


def test_the_kernel_result_is_the_deconvolution_hedged_with_the_half_scale_network(astronaut):
    blurred, _ = shaken(astronaut, seed=3)
    darker = lambda rgb: (rgb // 2).astype(np.uint8)   # a network whose share is easy to see  # noqa: E731
    result, made = restore_thorough(blurred, darker, UNSHRUNK)
    assert CFG.kernel_weight == 0.7 and result.chosen == "kernel"
    assert result.evidence["blend"] == {"kernel_weight": 0.7, "with": "network_half"}
    assert "blended with the network_half result (0.7 kernel)" in result.evidence["reason"]
    expected = 0.7 * made["deconvolved"].astype(np.float32) + 0.3 * network_at_scale(blurred, darker, 2).astype(np.float32)
    assert np.array_equal(result.image, np.clip(np.round(expected), 0, 255).astype(np.uint8))

    alone, made = restore_thorough(blurred, darker, UNSHRUNK.model_copy(update={"kernel_weight": 1.0}))
    assert "deconvolved" not in made and "blend" not in alone.evidence
    assert np.array_equal(alone.image, made["kernel"])
    assert alone.image.mean() - result.image.mean() > 10   # the half-dark network's 0.3 share is in the blend


def test_input_shrink_is_validated_and_old_settings_mean_no_shrink():
    from pydantic import ValidationError

    from deblur.core.config import KernelAwareConfig

    settings = CFG.model_dump()
    with pytest.raises(ValidationError, match="input_shrink"):
        KernelAwareConfig.model_validate({**settings, "input_shrink": -1.0})
    del settings["input_shrink"]   # an artifact logged before the setting existed
    assert KernelAwareConfig.model_validate(settings).input_shrink == 0.0


def test_kernel_weight_is_validated_and_old_settings_mean_the_deconvolution_alone():
    from pydantic import ValidationError

    from deblur.core.config import KernelAwareConfig

    settings = CFG.model_dump()
    for bad in (0.0, 1.5):
        with pytest.raises(ValidationError, match="kernel_weight"):
            KernelAwareConfig.model_validate({**settings, "kernel_weight": bad})
    del settings["kernel_weight"]   # an artifact logged before the setting existed
    assert KernelAwareConfig.model_validate(settings).kernel_weight == 1.0


def test_a_sharp_photo_is_left_to_the_network(astronaut):
    result, _ = restore_thorough(astronaut, identity, CFG)
    assert result.chosen != "kernel", result.evidence
    assert psnr(result.image, astronaut) >= 40.0


def test_blur_rms_measures_how_much_the_kernel_would_change_the_photo(astronaut):
    delta = np.zeros((15, 15), np.float32)
    delta[7, 7] = 1.0
    line = np.zeros((15, 15), np.float32)
    line[7, :] = 1.0 / 15
    assert blur_rms(astronaut, delta) < 1e-6
    sharp_line = blur_rms(astronaut, line)
    blurred = np.clip(np.round(cv2.filter2D(astronaut.astype(np.float32), -1, line, borderType=cv2.BORDER_REFLECT)),
                      0, 255).astype(np.uint8)
    soft = cv2.GaussianBlur(astronaut, (0, 0), 2.0)
    assert 15.0 < sharp_line < 25.0                             # 18.8 levels
    assert 3.0 < blur_rms(blurred, line) < 8.0                  # 5.2: blurring again changes less
    assert blur_rms(soft, line) < 0.6 * sharp_line              # 9.3: soft content has less to lose


def test_shrink_weight_keeps_what_exceeds_the_constant():
    assert shrink_weight(4.0, 0.0) == 1.0 and shrink_weight(0.0, 0.0) == 1.0
    assert shrink_weight(4.0, 2.0) == pytest.approx(0.5)
    assert shrink_weight(20.0, 2.0) == pytest.approx(0.9)
    assert shrink_weight(1.5, 2.0) == 0.0 and shrink_weight(0.0, 2.0) == 0.0


def test_the_result_is_shrunk_toward_the_input_by_the_blur_size(astronaut):
    """The shipped result is input + w x (unshrunk result - input), w = shrink_weight(blur_rms(input, PSF))."""
    blurred, _ = shaken(astronaut, seed=3)
    darker = lambda rgb: (rgb // 2).astype(np.uint8)   # noqa: E731
    unshrunk, _ = restore_thorough(blurred, darker, UNSHRUNK)
    shrunk, _ = restore_thorough(blurred, darker, CFG)
    assert CFG.input_shrink == 2.0 and "shrink" not in unshrunk.evidence
    blur = blur_rms(blurred, shrunk.psf)
    weight = 1.0 - CFG.input_shrink / blur
    assert shrunk.evidence["shrink"] == {"blur_rms": round(blur, 3), "weight": round(weight, 4)}
    assert 0.5 < weight < 1.0
    expected = weight * unshrunk.image.astype(np.float32) + (1 - weight) * blurred.astype(np.float32)
    assert np.array_equal(shrunk.image, np.clip(np.round(expected), 0, 255).astype(np.uint8))


def test_a_soft_photo_with_little_blur_stays_near_its_input():
    """Depth-of-field-soft content (gaussian 1.5 px, as bench_input_shrink.py's soft set) shaken by a 7-9 px kernel;
    the 'network' adds streaks of +-3 levels. The estimate comes out oversized (10 px) and the unshrunk kernel result
    loses 4.5 dB; the blur is small (4.3 levels), so about half the change is kept and the result is above the input."""
    soft = cv2.GaussianBlur(np.ascontiguousarray(skimage.data.coffee()[100:356, 150:406]), (0, 0), 1.5)
    blurred, _ = shaken(soft, seed=5, low=7, high=9)
    stripes = (3 * np.sign(np.sin(np.arange(blurred.shape[1]) / 2.0)))[None, :, None]
    streaky = lambda rgb: np.clip(rgb.astype(np.float32) + stripes[:, :rgb.shape[1]], 0, 255).astype(np.uint8)  # noqa: E731
    unshrunk, _ = restore_thorough(blurred, streaky, UNSHRUNK)
    shrunk, _ = restore_thorough(blurred, streaky, CFG)
    before = psnr(blurred, soft)
    assert psnr(unshrunk.image, soft) < before - 3.0
    assert shrunk.evidence["shrink"]["weight"] < 0.6
    assert psnr(shrunk.image, soft) > before


def test_small_photos_get_the_network_only():
    small = np.ascontiguousarray(skimage.data.astronaut()[:40, :40])
    result, made = restore_thorough(small, lambda rgb: rgb // 2, CFG)
    assert result.chosen == "network" and result.estimate is None and np.array_equal(result.image, small // 2)


def test_a_coarse_scale_carries_the_network_residual_up():
    rgb = np.full((64, 96, 3), 100, np.uint8)
    out = network_at_scale(rgb, lambda small: small + 10, 2)
    assert out.shape == rgb.shape and np.all(out == 110)
    assert np.array_equal(network_at_scale(rgb, lambda small: small + 3, 1), rgb + 3)


def test_the_output_is_moved_by_the_kernels_centroid_offset(astronaut):
    blurred, kernel = shaken(astronaut, seed=5)
    moved = np.roll(np.pad(kernel, 4), 3, axis=1)   # the same blur, its array centre 3 px off
    assert centroid_offset(moved)[1] == pytest.approx(3.0 + centroid_offset(kernel)[1], abs=1e-4)
    plain = restore_with_psf(blurred, moved)
    registered = register_to_input(plain, moved)
    truth = restore_with_psf(blurred, kernel)
    assert psnr(registered[8:-8, 8:-8], truth[8:-8, 8:-8]) > psnr(plain[8:-8, 8:-8], truth[8:-8, 8:-8]) + 10


def _estimate(support: int, confidence: float) -> KernelEstimate:
    return KernelEstimate(kernel=np.ones((1, 1), np.float32), support=support, crop_kernels=(), crop_boxes=(),
                          crop_agreement=confidence, reblur_residual=0.0, confidence=confidence, seconds=0.0)


@pytest.mark.parametrize(("support", "confidence", "overshoot", "chosen"), [
    (1, 0.99, None, "network"),                     # near-delta: a sharp photo
    (15, CFG.min_confidence, None, "kernel"),       # confident
    (15, CFG.min_confidence, CFG.max_overshoot, "kernel"),
    (15, CFG.min_confidence - 0.01, None, "network"),
    (15, 0.99, CFG.max_overshoot + 0.01, "network"),          # its deconvolution rings
    (CFG.max_kernel_size, 0.99, 0.0, "network_quarter"),      # fills the search window
    (CFG.half_scale_from, 0.1, None, "network_half"),
    (CFG.quarter_scale_from, 0.1, None, "network_quarter"),
])
def test_the_choice_follows_the_evidence(support, confidence, overshoot, chosen):
    picked, evidence = choose(_estimate(support, confidence), CFG, overshoot)
    assert picked == chosen and evidence["reason"] and evidence["support_px"] == support


def test_evaluation_scores_the_served_mode_and_the_kernel(tmp_path, astronaut):
    blurred, kernel = shaken(astronaut, seed=3)
    write_png(tmp_path / "sharp.png", astronaut)
    write_png(tmp_path / "blur.png", blurred)
    np.save(tmp_path / "k.npy", kernel)
    record = PairRecord("a_0", tmp_path / "sharp.png", tmp_path / "blur.png", "motion", tmp_path / "k.npy",
                        "skimage", "a", kernel.shape[0])
    import torch

    scores = {}
    for mode in ("fast", "thorough"):
        cfg = CFG.model_copy(update={"default_mode": mode})
        result = evaluate_model(torch.nn.Identity(), [record], PARAMS.tiling, PARAMS.evaluate, PARAMS.synthesize.gamma,
                                with_baseline=False, kernel_aware=cfg)
        scores[mode] = result.images[0].scores
    fast, thorough = scores["fast"], scores["thorough"]
    assert fast["model_psnr"] == pytest.approx(fast["input_psnr"], abs=0.05)       # the identity network
    assert thorough["model_psnr"] == pytest.approx(thorough["thorough_psnr"])      # served = thorough
    assert fast["thorough_psnr"] == pytest.approx(thorough["thorough_psnr"])       # scored in both modes
    assert thorough["thorough_psnr"] > thorough["input_psnr"] + 3
    assert thorough["nonblind_psnr"] > thorough["input_psnr"] + 4                  # the true-PSF ceiling
    assert thorough["kernel_ncc"] >= 0.85


@pytest.mark.slow
def test_the_pyfunc_takes_a_mode_and_a_psf_column(tmp_path, mlflow_uri, astronaut):
    from serving_support import make_checkpoint

    from deblur.core.config import TilingConfig
    from deblur.core.imageio import encode_image
    from deblur.tracking.pyfunc import log_deblur_model
    from deblur.psf.io import psf_to_png_bytes

    ckpt = make_checkpoint(tmp_path / "ckpt.pt", "stacked_conv", channels=8, depth=2)
    tiling = TilingConfig.model_validate({"tile_size": 128, "overlap": 16, "batch_size": 2})
    mlflow.set_tracking_uri(mlflow_uri)   # the fluent API keeps an earlier test's store otherwise
    mlflow.set_experiment("kernel-aware")
    with mlflow.start_run():
        uri = log_deblur_model(ckpt, tiling, max_pixels=4_000_000, kernel_aware=CFG)
    model = mlflow.pyfunc.load_model(uri)
    blurred, kernel = shaken(astronaut, seed=3)
    png = base64.b64encode(encode_image(blurred, "PNG")).decode("ascii")
    npy = io.BytesIO()
    np.save(npy, kernel)
    for psf_bytes in (npy.getvalue(), psf_to_png_bytes(kernel)):
        psf = base64.b64encode(psf_bytes).decode("ascii")
        rows = model.predict(pd.DataFrame({"image": [png]}), params={"psf": psf})["image"]
        with_psf = np.asarray(Image.open(io.BytesIO(base64.b64decode(rows[0]))))
        assert psnr(with_psf, astronaut) > psnr(blurred, astronaut) + 4   # non-blind with the user's PSF
    fast = model.predict(blurred, params={"mode": "fast"})
    assert abs(psnr(fast, astronaut) - psnr(blurred, astronaut)) < 3     # a random tiny net: no deconvolution
    thorough = model.predict(blurred, params={"mode": "thorough"})
    assert psnr(thorough, astronaut) > psnr(blurred, astronaut) + 3
    with pytest.raises(MlflowException, match="mode"):
        model.predict(blurred, params={"mode": "slow"})
    with pytest.raises(MlflowException, match="params psf"):
        model.predict(blurred, params={"psf": base64.b64encode(b"not a psf").decode("ascii")})
