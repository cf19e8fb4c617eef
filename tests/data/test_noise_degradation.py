"""The ``noise`` degradation: no blur, Gaussian noise with sigma from params; default pairs unchanged;
a denoising set through synthesize -> train -> evaluate -> the gate's per-type check."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import ROOT, TINY_OVERRIDES, TRAIN_OVERRIDES, copy_pairs, write_params

from deblur.core.config import DEGRADATION_TYPES, NOISE, ConfigError, load_params
from deblur.data.blur import apply_blur, blur_pair, choose_blur_type, sample_blur
from deblur.data.ingest import derive_rng, run_ingest
from deblur.data.pairs import read_pairs
from deblur.data.synthesize import psnr_uint8, run_synthesize
from deblur.core.imageio import read_rgb
from deblur.tracking.runs import files_digest

# Computed with the code of commit 4891ef7, before `noise` existed: the tiny ingest + synthesize
# output (files_digest of the pairs folder) and 12 blur_pair draws on a seeded random image.
PAIRS_DIGEST_BEFORE_NOISE = "aa494207426c5c86"
BLUR_PAIR_DIGEST_BEFORE_NOISE = "93753d8db67f2a3ab5f45fc1e5ea137e344203710ee4e894a5ac75688188d959"
NOISE_ONLY = {"synthesize.blur_mix": {"noise": 1.0}}


def _blur_pair_digest(cfg) -> str:
    image = np.random.default_rng(7).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    h = hashlib.sha256()
    for k in range(12):
        blurred, spec = blur_pair(image, derive_rng(0, "synthesize", f"x_{k}"), cfg)
        h.update(spec.blur_type.encode())
        h.update(blurred.tobytes())
    return h.hexdigest()


def test_default_params_give_the_same_pairs_as_before_noise_existed(tmp_path):
    params = load_params(ROOT / "params.yaml", overrides=dict(TINY_OVERRIDES))
    assert NOISE not in params.synthesize.blur_mix
    copy_pairs(params, tmp_path / "pairs")
    assert files_digest(tmp_path / "pairs") == PAIRS_DIGEST_BEFORE_NOISE
    assert _blur_pair_digest(params.synthesize) == BLUR_PAIR_DIGEST_BEFORE_NOISE
    zero_noise = load_params(ROOT / "params.yaml", overrides={
        **TINY_OVERRIDES, "synthesize.blur_mix": {**params.synthesize.blur_mix, "noise": 0.0}})
    assert _blur_pair_digest(zero_noise.synthesize) == BLUR_PAIR_DIGEST_BEFORE_NOISE


def test_noise_params_are_validated(tmp_path):
    assert DEGRADATION_TYPES[-1] == NOISE
    with pytest.raises(ConfigError, match="synthesize.noise: Value error, sigma: minimum 0.2 exceeds maximum 0.1"):
        load_params(ROOT / "params.yaml", overrides={"synthesize.noise": {"sigma_min": 0.2, "sigma_max": 0.1}})
    with pytest.raises(ConfigError, match="synthesize.noise.sigma_max: Field required"):
        load_params(ROOT / "params.yaml", overrides={"synthesize.noise": {"sigma_min": 0.2}})
    with pytest.raises(ConfigError, match=r"unknown blur type\(s\) \['noize'\]; known: \[.*'noise'\]"):
        load_params(ROOT / "params.yaml", overrides={"synthesize.blur_mix": {"noize": 1.0}})


def test_noise_is_identity_kernel_plus_gaussian_noise_of_the_drawn_sigma(tiny_params):
    cfg = tiny_params.synthesize.model_copy(update={"noise": tiny_params.synthesize.noise.model_copy(
        update={"sigma_min": 0.03, "sigma_max": 0.05})})
    rng = np.random.default_rng(0)
    specs = [sample_blur(rng, cfg, NOISE) for _ in range(50)]
    sigmas = [s.params["noise_sigma"] for s in specs]
    assert all(s.blur_type == NOISE and s.kernel.shape == (1, 1) and s.kernel[0, 0] == 1 for s in specs)
    assert min(sigmas) >= 0.03 and max(sigmas) <= 0.05 and max(sigmas) - min(sigmas) > 0.01
    assert specs[0].params == {"size": 1, "noise_sigma": sigmas[0]}

    flat = np.full((96, 96, 3), 128, np.uint8)
    noisy = apply_blur(flat, specs[0], cfg, np.random.default_rng(1)).astype(np.float64)
    assert abs(noisy.std() / 255 - sigmas[0]) < 0.002 and abs(noisy.mean() - 128) < 0.5
    silent = specs[0].__class__(NOISE, specs[0].kernel, {"noise_sigma": 0.0})
    assert np.array_equal(apply_blur(flat, silent, cfg, np.random.default_rng(1)), flat)   # no blur at all

    draws = [choose_blur_type(rng, {"motion": 1.0, "noise": 1.0}) for _ in range(1000)]
    assert set(draws) == {"motion", NOISE} and abs(draws.count(NOISE) / 1000 - 0.5) < 0.05


def test_a_noise_only_mix_makes_a_denoising_set(tmp_path):
    params = load_params(ROOT / "params.yaml", overrides={**TINY_OVERRIDES, **NOISE_ONLY})
    summary = run_synthesize(params, run_ingest(params, tmp_path / "ingested"), tmp_path / "pairs")
    assert summary.pairs_per_blur_type[NOISE] == sum(summary.pairs_per_split.values())
    lo, hi = params.synthesize.noise.sigma_min, params.synthesize.noise.sigma_max
    for split in ("train", "val", "test"):
        lines = [json.loads(line) for line in (tmp_path / "pairs" / split / "blur_types.json").read_text().splitlines()]
        assert lines and all(e["blur_type"] == NOISE and e["kernel"]["size"] == 1 for e in lines)
        assert all(lo <= e["noise_sigma"] <= hi for e in lines)
        for record, entry in zip(read_pairs(tmp_path / "pairs", split), lines):
            noisy, sharp = read_rgb(record.blur_path), read_rgb(record.clear_path)
            expected = 20 * np.log10(1 / entry["noise_sigma"])           # PSNR of pure noise, before clipping
            assert psnr_uint8(noisy, sharp) == pytest.approx(expected, abs=1.5)


@pytest.mark.slow
def test_denoiser_trains_evaluates_and_is_judged_per_type(tmp_path, mlflow_uri):
    from deblur.core.config import RegisterConfig
    from deblur.evaluation.gate import decide
    from deblur.stages.evaluate import run_evaluate
    from deblur.stages.register import read_per_image
    from deblur.stages.train import run_train

    overrides = {**TRAIN_OVERRIDES, **NOISE_ONLY, "evaluate.triptychs": 1, "tiling.tile_size": 48,
                 "tiling.overlap": 8}
    params_file = write_params(tmp_path / "params.yaml", overrides)
    params = load_params(params_file)
    copy_pairs(params, tmp_path / "pairs")
    run_train(params_file, tmp_path / "pairs", tmp_path / "ck", tmp_path / "curve.csv", tmp_path / "run.json")
    out = tmp_path / "reports"
    summary = run_evaluate(params_file, tmp_path / "run.json", tmp_path / "pairs", out / "metrics.json",
                           out / "per_image.csv", out / "per_blur.csv", out / "sharp_in.csv", out / "triptychs")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    noise = metrics["per_blur_type"][NOISE]
    assert list(metrics["per_blur_type"]) == [NOISE] and noise["n"] == metrics["n_images"] > 0
    assert set(noise) == {"n", "model_psnr", "model_ssim", "input_psnr", "input_ssim"}   # no classical reference
    assert 18 < noise["input_psnr"] < 36 and 0 < noise["input_ssim"] < 1 and noise["model_psnr"] > 10
    assert sorted(p.name for p in (out / "triptychs").glob("*.png"))[0].endswith("_noise.png")

    challenger, input_scores = read_per_image(out / "per_image.csv")
    gate = RegisterConfig(model_name="deblur", margin_db=0.05, confidence=0.95, bootstrap_samples=200,
                          min_gain_over_input_db=0.0, min_pairs_per_blur_type=1, min_sharp_in_psnr=0.0)
    decision = decide(challenger, input_scores, [40.0], None, None, gate)
    check = next(c for c in decision.checks if c.name == f"blur_type:{NOISE}")
    assert check.passed == (noise["model_psnr"] >= noise["input_psnr"])
    assert check.values["input_mean"] == pytest.approx(noise["input_psnr"], abs=1e-3)
