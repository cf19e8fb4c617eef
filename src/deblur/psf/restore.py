"""Thorough mode: estimate the blur, deconvolve it, check the result, and keep what the evidence supports.

Candidates for one photo (no sharp image needed to choose):
- ``kernel``: non-blind deconvolution (``deblur.psf.deconvolve``) with the blindly estimated PSF;
- ``network``, ``network_half``, ``network_quarter``: the served network at full, 1/2 and 1/4
  resolution, the coarse results' residual upsampled and added to the input (a large blur is
  small in the network's pixels at a coarse scale);
- ``input``: the photo unchanged.

The selector (``choose``) takes the kernel result only when the estimate is confident (its crops
agree and the kernel explains the blurred crop), not near-delta, and its deconvolution does not ring;
with ``min_network_agreement`` set (off by default: documentation/kernel_aware.md), also only when its
correction (result - input) correlates with the network's at full and 1/2 scale (``deblur.psf.checks``).
Otherwise the network at the scale that fits the estimated blur size.
The kernel result is a hedge (``hedge_kernel``): ``kernel_weight`` of the deconvolution plus the rest
of the network at 1/2 scale. Averaging two estimates whose errors differ cost nothing on average in
calibration and cut the photos left more than 0.5 dB below their input from 10 to 5 of 78.
Last, the choice is shrunk toward the input (``shrink_weight``): by ``input_shrink`` 8-bit levels of the blur's
own size, the rms of (input - estimated PSF * input) less its noise (``blur_rms``). A soft or nearly sharp photo
has little blur to remove and every candidate's error is larger than that (on soft training photos at 35-48 dB
the network lost up to 7.6 dB and the deconvolution 10.8 dB); a large blur keeps most of the correction.
Thresholds live in ``params.yaml`` ``kernel_aware`` and were calibrated on synthetic camera shake of
training photos, disjoint from the held-out ones (``bench/bench_kernel_aware.py --calibrate``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np
from scipy import ndimage

from deblur.core.config import KernelAwareConfig
from deblur.psf.checks import kernel_checks, luminance
from deblur.psf.deconvolve import QUANTISATION_SIGMA, deconvolve, deconvolve_with_overshoot, estimate_noise_sigma
from deblur.psf.estimate import EstimatorSettings, KernelEstimate, estimate_kernel

Network = Callable[[np.ndarray], np.ndarray]   # sRGB uint8 HxWx3 -> deblurred, same shape (the fast mode)
CANDIDATES = ("kernel", "network", "network_half", "network_quarter", "input")
SCALE_OF = {"network": 1, "network_half": 2, "network_quarter": 4}
MIN_SCALED_SIDE = 32   # a coarse scale is skipped when the photo would be smaller than this
CHECK_REFERENCES = ("network", "network_half")   # network candidates the kernel result must agree with (choose)
CHECK_SIDE = 512       # px: the checks look at the central square of this side (calibrated on 512 px photos)
HEDGE_REFERENCE = "network_half"   # what the deconvolution is blended with (kernel_weight)


@dataclass
class ThoroughResult:
    """The chosen image and why: the estimated PSF and the evidence behind the choice."""

    image: np.ndarray                 # uint8 HxWx3
    chosen: str                       # one of CANDIDATES
    estimate: KernelEstimate | None
    evidence: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def psf(self) -> np.ndarray | None:
        return None if self.estimate is None else self.estimate.kernel


def network_at_scale(rgb: np.ndarray, network: Network, factor: int) -> np.ndarray:
    """The network run at 1/``factor`` resolution; its residual, upsampled, is added to ``rgb``."""
    if factor == 1:
        return network(rgb)
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, round(w / factor)), max(1, round(h / factor))), interpolation=cv2.INTER_AREA)
    residual = network(small).astype(np.float32) - small.astype(np.float32)
    residual = cv2.resize(residual, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(np.round(rgb.astype(np.float32) + residual), 0, 255).astype(np.uint8)


def network_scale_for(support: int, cfg: KernelAwareConfig) -> str:
    """The network candidate for a blur of ``support`` px: full up to ``half_scale_from``, then 1/2, then 1/4."""
    if support >= cfg.quarter_scale_from:
        return "network_quarter"
    if support >= cfg.half_scale_from:
        return "network_half"
    return "network"


def choose(estimate: KernelEstimate, cfg: KernelAwareConfig, overshoot: float | None = None,
           checks: dict | None = None) -> tuple[str, dict]:
    """The candidate the evidence supports, and that evidence (JSON-ready).

    ``overshoot``: the kernel deconvolution's share of ringing values (``deconvolve_with_overshoot``);
    None while it has not been computed (the kernel is then chosen on the estimate alone)."""
    evidence = {"support_px": int(estimate.support), "crop_agreement": round(float(estimate.crop_agreement), 4),
                "reblur_residual": round(float(estimate.reblur_residual), 4),
                "confidence": round(float(estimate.confidence), 4)}
    if overshoot is not None:
        evidence["overshoot"] = round(float(overshoot), 4)
    if checks is not None:
        evidence["checks"] = checks
    if estimate.support <= cfg.sharp_support:
        evidence["reason"] = f"near-delta kernel ({estimate.support} px): the photo looks sharp"
        return "network", evidence
    if estimate.confidence < cfg.min_confidence:
        distrust = f"confidence {estimate.confidence:.2f} < {cfg.min_confidence}"
    elif estimate.support >= cfg.max_kernel_size:
        distrust = f"the kernel fills the whole {cfg.max_kernel_size} px window"
    elif overshoot is not None and overshoot > cfg.max_overshoot:
        distrust = f"its deconvolution rings ({overshoot:.1%} of values outside [0, 1] > {cfg.max_overshoot:.0%})"
    elif cfg.min_network_agreement is not None and checks is not None \
            and (agreement := network_agreement(checks)) is not None and agreement < cfg.min_network_agreement:
        distrust = (f"its correction disagrees with the network's (correlation {agreement:.2f} < "
                    f"{cfg.min_network_agreement})")
    else:
        evidence["reason"] = f"kernel estimate trusted (confidence {estimate.confidence:.2f} >= {cfg.min_confidence})"
        return "kernel", evidence
    choice = network_scale_for(estimate.support, cfg)
    evidence["reason"] = (f"kernel estimate not trusted ({distrust}); network at scale 1/{SCALE_OF[choice]} "
                          f"for a {estimate.support} px blur")
    return choice, evidence


def network_agreement(checks: dict) -> float | None:
    """The mean over ``CHECK_REFERENCES`` of the correlation between the kernel result's correction and the
    network candidate's (``deblur.psf.checks.correction_agreement``); None when none was measured."""
    values = [checks[f"agree_{name}"] for name in CHECK_REFERENCES if f"agree_{name}" in checks]
    return float(np.mean(values)) if values else None


def restore_thorough(rgb: np.ndarray, network: Network, cfg: KernelAwareConfig, gamma: float = 2.2,
                     all_candidates: bool = False) -> tuple[ThoroughResult, dict[str, np.ndarray]]:
    """Thorough-mode restoration of one uint8 photo; with ``all_candidates`` every candidate is computed
    (for evaluation and calibration), else only what the choice needs. Returns the result and the candidates made."""
    seconds = {}
    start = time.perf_counter()
    if min(rgb.shape[:2]) < cfg.min_side:
        out = network(rgb)
        return ThoroughResult(out, "network", None, {"reason": f"smaller than {cfg.min_side} px: network only"},
                              {"total": time.perf_counter() - start}), {"network": out}
    estimate = estimate_kernel(rgb, cfg.max_kernel_size, latent_fn=network if cfg.network_latent else None,
                               settings=EstimatorSettings(crop_size=cfg.crop_size, crops=cfg.crops, gamma=gamma))
    seconds["estimate"] = estimate.seconds
    made: dict[str, np.ndarray] = {}
    chosen, evidence = choose(estimate, cfg)
    overshoot = None
    if chosen == "kernel" or all_candidates:
        t = time.perf_counter()
        deconvolved, overshoot = deconvolve_with_overshoot(rgb, estimate.kernel, gamma=gamma)
        made["kernel"] = register_to_input(deconvolved, estimate.kernel)
        seconds["kernel"] = time.perf_counter() - t
        chosen, evidence = choose(estimate, cfg, overshoot)
    if all_candidates:
        for name in CANDIDATES:
            _make(name, rgb, network, made, seconds)
    if "kernel" in made and (all_candidates or (chosen == "kernel" and cfg.min_network_agreement is not None)):
        t = time.perf_counter()
        checks = check_kernel_result(rgb, made, estimate.kernel, network, seconds)
        seconds["checks"] = time.perf_counter() - t
        chosen, evidence = choose(estimate, cfg, overshoot, checks)
    if "kernel" in made and (all_candidates or chosen == "kernel") and cfg.kernel_weight < 1.0:
        evidence["blend"] = hedge_kernel(rgb, network, cfg.kernel_weight, made, seconds)
        if chosen == "kernel":
            evidence["reason"] += f"; blended with the {evidence['blend']['with']} result ({cfg.kernel_weight:g} kernel)"
    _make(chosen, rgb, network, made, seconds)
    if chosen not in made:   # a coarse scale on a photo too small for it
        chosen = "network"
        made.setdefault("network", network(rgb))
    image = made[chosen]
    if cfg.input_shrink > 0:
        blur = blur_rms(rgb, estimate.kernel)
        weight = shrink_weight(blur, cfg.input_shrink)
        evidence["shrink"] = {"blur_rms": round(blur, 3), "weight": round(weight, 4)}
        image = blend(image, rgb, weight)
    seconds["total"] = time.perf_counter() - start
    return ThoroughResult(image, chosen, estimate, evidence, seconds), made


def blur_rms(rgb: np.ndarray, kernel: np.ndarray) -> float:
    """How much ``kernel`` changes the photo, in 8-bit levels: the rms of luminance(input - kernel * input) on the
    central ``CHECK_SIDE`` square (borders of half the kernel left out), less the part the photo's noise explains.
    The change the blur would make once more: it grows with the blur's own error but stays below it (blurring a
    blurred photo again changes it less: astronaut with a 15 px line, 5.2 levels against an error of 18.9);
    a soft photo, or a kernel close to a delta, gives little."""
    h, w = rgb.shape[:2]
    top, left = max(0, (h - CHECK_SIDE) // 2), max(0, (w - CHECK_SIDE) // 2)
    square = rgb[top:top + CHECK_SIDE, left:left + CHECK_SIDE]
    k = np.asarray(kernel, np.float32)
    k = k / k.sum()
    gray = luminance(square)
    residual = gray - cv2.filter2D(gray, -1, k[::-1, ::-1], borderType=cv2.BORDER_REFLECT)
    margin = k.shape[0] // 2 + 2
    if min(residual.shape) > 2 * margin + 8:
        residual = residual[margin:-margin, margin:-margin]
    centre = float(k[k.shape[0] // 2, k.shape[1] // 2])
    sigma = max(estimate_noise_sigma(square), QUANTISATION_SIGMA)
    noise_share = sigma ** 2 * max(0.0, 1.0 - 2.0 * centre + float(np.sum(k * k)))
    return 255.0 * float(np.sqrt(max(float(np.mean(np.square(residual, dtype=np.float64))) - noise_share, 0.0)))


def shrink_weight(blur: float, levels: float) -> float:
    """The share of the chosen result's change to the input that is kept: max(0, 1 - ``levels`` / ``blur``)
    (soft thresholding of the correction by a constant; 1 with ``levels`` 0)."""
    if levels <= 0:
        return 1.0
    return max(0.0, 1.0 - levels / blur) if blur > 0 else 0.0


def hedge_kernel(rgb: np.ndarray, network: Network, weight: float, made: dict, seconds: dict) -> dict:
    """Replace ``made["kernel"]`` by ``weight`` x the deconvolution + (1 - ``weight``) x the network at 1/2
    scale (at full scale on a photo too small for 1/2); the deconvolution alone stays as
    ``made["deconvolved"]``. Returns the blend's description for the evidence."""
    _make(HEDGE_REFERENCE, rgb, network, made, seconds)
    reference = HEDGE_REFERENCE if HEDGE_REFERENCE in made else "network"
    _make(reference, rgb, network, made, seconds)   # no-op unless 1/2 scale was too small for the photo
    made["deconvolved"] = made["kernel"]
    made["kernel"] = blend(made["deconvolved"], made[reference], weight)
    return {"kernel_weight": weight, "with": reference}


def blend(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """``weight`` x ``a`` + (1 - ``weight``) x ``b`` of two uint8 images (float32, rounded, clipped)."""
    mixed = weight * a.astype(np.float32) + (1.0 - weight) * b.astype(np.float32)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def check_kernel_result(rgb: np.ndarray, made: dict, kernel: np.ndarray, network: Network, seconds: dict) -> dict:
    """``deblur.psf.checks.kernel_checks`` of the kernel result on the photo's central ``CHECK_SIDE`` square
    (the size the thresholds were calibrated on), against the network candidates on that square: the
    candidates already made when the square is the whole photo, else the network run on the square only
    (a fraction of a full-frame run)."""
    h, w = rgb.shape[:2]
    top, left = max(0, (h - CHECK_SIDE) // 2), max(0, (w - CHECK_SIDE) // 2)
    box = (slice(top, top + CHECK_SIDE), slice(left, left + CHECK_SIDE))
    if h <= CHECK_SIDE and w <= CHECK_SIDE:
        for name in CHECK_REFERENCES:
            _make(name, rgb, network, made, seconds)
        references = {n: made[n] for n in SCALE_OF if n in made}
    else:
        square = np.ascontiguousarray(rgb[box])
        references = {n: network_at_scale(square, network, SCALE_OF[n]) for n in CHECK_REFERENCES
                      if min(square.shape[:2]) // SCALE_OF[n] >= MIN_SCALED_SIDE}
    return kernel_checks(rgb[box], made["kernel"][box], kernel, references)


def _make(name: str, rgb: np.ndarray, network: Network, made: dict, seconds: dict) -> None:
    """Candidate ``name`` into ``made`` unless there already (a coarse scale too small for the photo is skipped)."""
    if name in made:
        return
    t = time.perf_counter()
    if name == "input":
        made[name] = rgb
    elif name in SCALE_OF and min(rgb.shape[:2]) // SCALE_OF[name] >= MIN_SCALED_SIDE:
        made[name] = network_at_scale(rgb, network, SCALE_OF[name])
    seconds[name] = time.perf_counter() - t


def centroid_offset(kernel: np.ndarray) -> tuple[float, float]:
    """(dy, dx) of the kernel's centre of mass from its centre pixel."""
    planes = kernel.reshape(-1, *kernel.shape[-2:]).sum(axis=0).astype(np.float64)
    ys, xs = np.mgrid[: planes.shape[0], : planes.shape[1]]
    total = planes.sum()
    return (float((planes * ys).sum() / total - (planes.shape[0] - 1) / 2),
            float((planes * xs).sum() / total - (planes.shape[1] - 1) / 2))


def register_to_input(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Undo the shift a blind kernel carries: move ``image`` (deconvolved with ``kernel``) by the kernel's
    centroid offset, so that every point sits where the blur's centre of mass left it in the input.

    A blind estimate is only known up to a translation (a shifted kernel and an oppositely shifted image
    explain the photo equally well); camera-shake blur displaces each point to its centroid, which the
    synthesis (``deblur.data.blur``) puts on the centre pixel. Measured on astronaut with a 15 px kernel
    moved 3 px: the deconvolution was best rolled by exactly that offset (18.6 dB unregistered vs 27.3 dB).
    """
    dy, dx = centroid_offset(kernel)
    if abs(dy) < 0.05 and abs(dx) < 0.05:
        return image
    shifted = ndimage.shift(image.astype(np.float32), (dy, dx, 0), order=3, mode="nearest")
    return np.clip(np.round(shifted), 0, 255).astype(np.uint8)


def restore_with_psf(rgb: np.ndarray, psf: np.ndarray, gamma: float = 2.2) -> np.ndarray:
    """Non-blind: the user knows the PSF (``deblur predict --psf``, the HTTP ``psf`` part)."""
    return deconvolve(rgb, psf, gamma=gamma)
