"""Non-blind deconvolution with a known PSF: PSF files, noise estimation, the engine, ``deblur predict --psf``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from deblur.core.config import load_params
from deblur.data.blur import BlurSpec, apply_blur, convolve, gaussian_kernel, motion_kernel
from deblur.evaluation.metrics import psnr
from deblur.psf.deconvolve import deconvolve, deconvolve_linear, estimate_noise_sigma, linear_noise_sigma
from deblur.psf.io import PsfError, load_psf, psf_from_bytes, psf_to_png_bytes, write_psf

ROOT = Path(__file__).resolve().parents[2]
SYNTHESIZE = load_params(ROOT / "params.yaml").synthesize


def crop(rgb: np.ndarray, side: int = 256) -> np.ndarray:
    h, w = rgb.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    return np.ascontiguousarray(rgb[top:top + side, left:left + side, :3])


def blurred_photo(name: str, seed: int, noise_sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sharp crop, its camera shake blur as the synthesize stage makes it, the kernel)."""
    sharp = crop(getattr(skimage.data, name)())
    rng = np.random.default_rng(seed)
    kernel, _ = motion_kernel(rng, SYNTHESIZE.motion)
    spec = BlurSpec("motion", kernel, {"noise_sigma": noise_sigma})
    return sharp, apply_blur(sharp, spec, SYNTHESIZE, rng), kernel


def correlation_peak(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """The (dy, dx) shift of ``a`` against ``b`` at the peak of their circular cross-correlation (greys)."""
    fa, fb = (np.fft.fft2(x.astype(np.float64).mean(axis=2) - x.mean()) for x in (a, b))
    corr = np.real(np.fft.ifft2(fa * np.conj(fb)))
    dy, dx = np.unravel_index(np.argmax(corr), corr.shape)
    h, w = corr.shape
    return int((dy + h // 2) % h - h // 2), int((dx + w // 2) % w - w // 2)


# --- PSF files -----------------------------------------------------------------------------------------------

def test_psf_from_npy_is_normalised_float(tmp_path):
    kernel = np.zeros((5, 7), np.float32)
    kernel[2, 1:6] = [1, 2, 3, 2, 1]
    np.save(tmp_path / "k.npy", kernel)
    psf = load_psf(tmp_path / "k.npy")
    assert psf.shape == (5, 7) and psf.dtype == np.float64
    np.testing.assert_allclose(psf, kernel / 9.0)
    np.testing.assert_allclose(psf_from_bytes((tmp_path / "k.npy").read_bytes(), "upload"), kernel / 9.0)


def test_psf_from_grey_png_8_and_16_bit(tmp_path):
    levels = np.zeros((3, 3), np.uint8)
    levels[1, :] = [50, 255, 100]
    Image.fromarray(levels).save(tmp_path / "k8.png")
    np.testing.assert_allclose(load_psf(tmp_path / "k8.png"), levels / 405.0)

    kernel, _ = motion_kernel(np.random.default_rng(3), SYNTHESIZE.motion)
    write_psf(tmp_path / "k16.png", kernel)
    assert Image.open(tmp_path / "k16.png").mode.startswith("I")          # 16-bit greyscale, not 8-bit
    back = load_psf(tmp_path / "k16.png")
    assert back.shape == kernel.shape
    assert np.abs(back - kernel / kernel.sum()).max() < 1e-4 * kernel.max()   # 16-bit precision survives
    assert psf_from_bytes(psf_to_png_bytes(kernel), "upload.png").shape == kernel.shape


def test_psf_from_rgb_png_is_its_luminance(tmp_path):
    rgb = np.zeros((3, 5, 3), np.uint8)
    rgb[1, 1] = [255, 0, 0]
    rgb[1, 2] = [0, 255, 0]
    rgb[1, 3] = [0, 0, 255]
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    psf = load_psf(tmp_path / "colour.png")
    np.testing.assert_allclose(psf[1, 1:4], np.array([0.2126, 0.7152, 0.0722]))   # Rec. 709 weights, sum 1
    assert psf.sum() == pytest.approx(1.0)


def test_write_psf_npy_is_float32_and_round_trips(tmp_path):
    kernel = gaussian_kernel(1.5).astype(np.float64) * 3.0
    write_psf(tmp_path / "out" / "k.npy", kernel)
    stored = np.load(tmp_path / "out" / "k.npy")
    assert stored.dtype == np.float32 and stored.sum() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(PsfError, match=r"k\.txt.*\.npy or \.png"):
        write_psf(tmp_path / "k.txt", kernel)


def _bad_psfs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the words its error must contain)."""
    cases = {"even.npy": (np.ones((4, 5)), r"\(4, 5\) has an even side"),
             "negative.npy": (np.array([[0.0, -0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), "negative"),
             "zero.npy": (np.zeros((3, 3)), "sums to zero"),
             "nan.npy": (np.array([[0.0, np.nan, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), "NaN"),
             "cube.npy": (np.ones((3, 5, 5)), r"2-D.*\(3, 5, 5\)"),
             "huge.npy": (np.ones((257, 257)), "limit of 255")}
    files = {}
    for name, (array, words) in cases.items():
        np.save(tmp_path / name, array)
        files[name] = (tmp_path / name, words)
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "even.png")
    files["even.png"] = (tmp_path / "even.png", r"\(4, 4\) has an even side")
    (tmp_path / "notes.png").write_text("not a kernel")
    files["notes.png"] = (tmp_path / "notes.png", "not a recognised image format")
    files["missing.npy"] = (tmp_path / "missing.npy", "not found")
    return files


def test_bad_psf_files_are_refused_naming_file_and_problem(tmp_path):
    for name, (path, words) in _bad_psfs(tmp_path).items():
        with pytest.raises(PsfError, match=words) as caught:
            load_psf(path)
        assert str(path) in str(caught.value), name
        assert isinstance(caught.value, ValueError)


# --- noise ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.003, 0.01, 0.03])
def test_noise_estimate_within_20_percent_on_a_blurred_photo(sigma):
    sharp = crop(skimage.data.astronaut()).astype(np.float32) / 255.0
    kernel, _ = motion_kernel(np.random.default_rng(5), SYNTHESIZE.motion)
    blurred = np.clip(convolve(sharp ** 2.2, kernel), 0.0, 1.0) ** (1 / 2.2)   # (the FFT filter leaves -1e-8s)
    noisy = blurred + np.random.default_rng(0).normal(0.0, sigma, blurred.shape).astype(np.float32)
    assert estimate_noise_sigma(noisy) == pytest.approx(sigma, rel=0.2)
    quantised = np.round(np.clip(noisy, 0, 1) * 255).astype(np.uint8)          # 8-bit: rounding adds 0.0011
    assert estimate_noise_sigma(quantised) == pytest.approx(np.hypot(sigma, 1 / (255 * 12 ** 0.5)), rel=0.2)
    grey = np.random.default_rng(1).normal(0.5, sigma, (200, 300))             # flat grey, 2-D
    assert estimate_noise_sigma(grey) == pytest.approx(sigma, rel=0.05)


def test_linear_noise_follows_the_decode_slope():
    mid = np.full((8, 8, 3), 0.5, np.float32)
    assert linear_noise_sigma(mid, 0.01, 2.2) == pytest.approx(0.01 * 2.2 * 0.5 ** 1.2, rel=1e-4)


# --- the engine ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, seed, noise, min_gain", [("astronaut", 0, 0.005, 6.5), ("chelsea", 4, 0.01, 4.5)])
def test_deconvolution_of_camera_shake_gains_over_the_blurred_photo(name, seed, noise, min_gain):
    sharp, blurred, kernel = blurred_photo(name, seed, noise)
    restored = deconvolve(blurred, kernel, gamma=SYNTHESIZE.gamma)
    assert restored.dtype == np.uint8 and restored.shape == sharp.shape
    # measured: astronaut, 29 px kernel, 16.98 -> 25.15 dB (+8.2); chelsea, 33 px, 23.89 -> 29.12 dB (+5.2)
    assert psnr(restored, sharp) - psnr(blurred, sharp) >= min_gain


def test_a_delta_psf_leaves_a_sharp_photo_alone():
    sharp = crop(skimage.data.astronaut())
    assert psnr(deconvolve(sharp, np.ones((1, 1))), sharp) >= 40.0           # measured 48.6 dB
    delta = np.zeros((5, 5))
    delta[2, 2] = 1.0
    assert psnr(deconvolve(sharp, delta), sharp) >= 40.0


def test_no_global_shift_with_symmetric_and_one_sided_kernels():
    sharp = crop(skimage.data.chelsea())
    one_sided = np.zeros((15, 15))
    one_sided[7, 7:] = 1.0                      # a streak to the right of the origin: shifts the image by 3.5 px
    for kernel in (gaussian_kernel(2.0), one_sided / one_sided.sum()):
        blurred = apply_blur(sharp, BlurSpec("motion", kernel.astype(np.float32), {"noise_sigma": 0.002}),
                             SYNTHESIZE, np.random.default_rng(0))
        assert correlation_peak(deconvolve(blurred, kernel), sharp) == (0, 0)
    assert correlation_peak(blurred, sharp) != (0, 0)   # the one-sided blur does shift: the check can see it


def test_per_channel_psf_and_grey_linear_input():
    sharp, blurred, kernel = blurred_photo("astronaut", 2, 0.005)
    shared = deconvolve(blurred, kernel)
    np.testing.assert_array_equal(deconvolve(blurred, np.stack([kernel] * 3)), shared)
    linear = (blurred[..., 1].astype(np.float32) / 255.0) ** 2.2
    grey = deconvolve_linear(linear, kernel, noise_sigma=0.003)
    assert grey.shape == linear.shape and grey.dtype == np.float32
    with pytest.raises(PsfError, match="even side"):
        deconvolve(blurred, np.ones((4, 4)))
    with pytest.raises(PsfError, match=r"\(2, 5, 5\)"):
        deconvolve(blurred, np.ones((2, 5, 5)))


# --- deblur predict --psf ------------------------------------------------------------------------------------

def deblur_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deblur", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_predict_with_a_psf_file_deconvolves_without_a_model(tmp_path):
    sharp, blurred, kernel = blurred_photo("astronaut", 0, 0.005)
    Image.fromarray(blurred).save(tmp_path / "shaken.png")
    np.save(tmp_path / "kernel.npy", kernel)
    write_psf(tmp_path / "kernel.png", kernel)
    for psf in ("kernel.npy", "kernel.png"):
        out = tmp_path / f"out-{psf}"
        proc = deblur_command("predict", "shaken.png", "--psf", psf, "-o", str(out), cwd=tmp_path)  # no model here
        assert proc.returncode == 0, proc.stderr
        assert "1 of 1 images written" in proc.stdout and psf in proc.stdout
        restored = np.asarray(Image.open(out / "shaken.png").convert("RGB"))
        assert psnr(restored, sharp) - psnr(blurred, sharp) >= 6.5

    np.save(tmp_path / "even.npy", np.ones((4, 4)))
    proc = deblur_command("predict", "shaken.png", "--psf", "even.npy", "-o", "bad", cwd=tmp_path)
    assert proc.returncode == 2
    assert "even.npy" in proc.stderr and "even side" in proc.stderr
    assert not (tmp_path / "bad").exists()
