"""The diffusion refiner (deblur.models.diffusion.refiner): sampling, tiling, training, checkpoints, stages, HTTP."""

from __future__ import annotations

import csv
import json

import httpx
import mlflow
import numpy as np
import pytest

from conftest import ROOT, TINY_OVERRIDES, copy_pairs, write_params
import torch
from PIL import Image
from skimage import data as skdata

from deblur.models.checkpoint_file import load_checkpoint, save_atomic
from deblur.models.build import model_from_checkpoint
from deblur.core.config import ConfigError, load_params
from deblur.models.diffusion.refiner import DiffusionRefiner
from deblur.models.build import build_model
from deblur.artifact.export import export_serving_artifact
from deblur.artifact.torch_model import load_serving_model
from deblur.inference.tiling import deblur_array, tiled_inference
from serving_support import encode, running_server, smooth_rgb

TINY_UNET = {"model.name": "diffusion_refiner", "model.diffusion_refiner.block_out_channels": [8, 16],
             "model.diffusion_refiner.norm_groups": 4, "model.diffusion_refiner.unshuffle": 2}


@pytest.fixture(scope="module")
def predictor_path(tmp_path_factory) -> str:
    """A tiny random stacked_conv checkpoint: the refiner's frozen predictor."""
    params = load_params(ROOT / "params.yaml", overrides={"model.name": "stacked_conv",
                                                          "model.stacked_conv.channels": 8,
                                                          "model.stacked_conv.depth": 3})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("predictor") / "predictor.pt"
    save_atomic({"model_config": params.model.model_dump(mode="json"), "state_dict": build_model(params.model).state_dict(),
                 "train_patch_size": 64, "step": 0}, path)
    return str(path)


def refiner_params(predictor: str, **overrides):
    return load_params(ROOT / "params.yaml", overrides={**TINY_UNET, "model.diffusion_refiner.predictor": predictor,
                                                        **overrides})


def tiny_refiner(predictor: str, seed: int = 0, **overrides) -> DiffusionRefiner:
    torch.manual_seed(seed)
    return build_model(refiner_params(predictor, **overrides).model).eval()


def photo(height: int = 96, width: int = 136) -> torch.Tensor:
    """A crop of a real photo, (1, 3, H, W) in [0, 1]."""
    rgb = skdata.astronaut()[100:100 + height, 150:150 + width]
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255.0


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


# --- configuration -------------------------------------------------------------------------

def test_epsilon_prediction_is_refused_with_the_reason(predictor_path):
    with pytest.raises(ConfigError, match=r"prediction_type.*epsilon.*blows up"):
        refiner_params(predictor_path, **{"model.diffusion_refiner.prediction_type": "epsilon"})


@pytest.mark.parametrize("overrides, mentions", [
    ({"model.diffusion_refiner.unshuffle": 3}, "unshuffle"),
    ({"model.diffusion_refiner.norm_groups": 3}, "norm_groups 3"),
    ({"model.diffusion_refiner.sampling_steps": 9}, "refiner_steps_range [1, 8]"),
    ({"tiling.tile_size": 90}, "tiling.tile_size 90 is not a multiple of 4"),
    ({"serving.refiner_steps_range": [0, 8]}, "refiner_steps_range starts below 1"),
])
def test_config_errors_name_the_setting(predictor_path, overrides, mentions):
    with pytest.raises(ConfigError, match=mentions.replace("[", r"\[").replace("]", r"\]")):
        refiner_params(predictor_path, **overrides)


def test_missing_predictor_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"predictor: .*nowhere\.pt: checkpoint not found"):
        tiny_refiner(str(tmp_path / "nowhere.pt"))


# --- sampling --------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver"])
def test_few_step_sampling_of_an_untrained_unet_stays_bounded(predictor_path, prediction_type, sampler):
    model = tiny_refiner(predictor_path, **{"model.diffusion_refiner.prediction_type": prediction_type,
                                            "model.diffusion_refiner.sampler": sampler})
    x = photo(64, 64)
    with torch.no_grad():
        residual = model.sample_residual(x, model.estimate(x), seed=0, steps=4) * model.residual_scale
    assert torch.isfinite(residual).all()
    assert residual.abs().max() < 10


def test_few_step_epsilon_sampling_would_blow_up(predictor_path):
    """Why epsilon is refused: the same untrained UNet read as epsilon explodes in 4 DDIM steps."""
    from diffusers import DDIMScheduler

    model = tiny_refiner(predictor_path)
    x = photo(64, 64)
    estimate = model.estimate(x)
    scheduler = DDIMScheduler.from_config(model.train_scheduler.config, prediction_type="epsilon",
                                          timestep_spacing="trailing", clip_sample=False)
    scheduler.set_timesteps(4)
    sample = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            sample = scheduler.step(model.denoise(sample, x, estimate, t), t, sample).prev_sample
    assert sample.abs().max() > 10


def test_same_seed_same_output_other_seed_other_output(predictor_path):
    model = tiny_refiner(predictor_path)
    x = photo(40, 56)
    first, again, other = model(x, seed=5), model(x, seed=5), model(x, seed=6)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3
    assert first.shape == x.shape


def test_fidelity_mode_averages_the_seeds_it_names(predictor_path):
    model = tiny_refiner(predictor_path)
    x = photo(32, 32)
    estimate = model.estimate(x)
    with torch.no_grad():
        mean = model.refine(x, estimate, seed=3, steps=2, samples=3)
        residuals = [model.sample_residual(x, estimate, seed=s, steps=2) for s in (3, 4, 5)]
        single = model.refine(x, estimate, seed=3, steps=2, samples=1)
    torch.testing.assert_close(mean, (estimate + sum(residuals) / 3).clamp(0, 1), atol=1e-6, rtol=0)
    assert (mean - single).abs().max() > 1e-3


def test_tiled_sampling_matches_whole_image_sampling_and_independent_tiles_do_not(predictor_path):
    # residual_scale 20 gives the untrained UNet a residual of about +-0.2, the size a trained one
    # corrects; at +-1 the clamp to [0, 1] decides most pixels and hides the comparison
    model = tiny_refiner(predictor_path, **{"model.diffusion_refiner.residual_scale": 20.0})
    x = photo(96, 136)                      # 3 x 4 tiles of 48 px
    estimate = model.estimate(x)
    with torch.no_grad():
        whole = model.refine(x, estimate, seed=3, steps=4)
        tiled = model.refine(x, estimate, seed=3, steps=4, tiling=(48, 16, 2))
    assert psnr_db(tiled, whole) >= 40

    class IndependentTiles(torch.nn.Module):
        """The mistake to avoid: every tile sampled on its own, with its own noise."""

        size_multiple = model.size_multiple

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, tile: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return model.refine(tile, model.estimate(tile), seed=self.calls, steps=4)

    independent = tiled_inference(IndependentTiles(), x, 48, 16, 1)
    assert psnr_db(independent, whole) < 35


def test_tiled_inference_hands_the_whole_image_to_the_refiner(predictor_path):
    model = tiny_refiner(predictor_path)
    rgb = (photo(50, 70)[0].permute(1, 2, 0) * 255).round().byte().numpy()
    out = deblur_array(model, rgb, (32, 8, 1), sampling={"seed": 2, "steps": 2})
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    estimate = tiled_inference(model.predictor, x, 32, 8, 1)
    with torch.no_grad():
        expected = model.refine(x, estimate, seed=2, steps=2, tiling=(32, 8, 1))
    assert np.array_equal(out, expected[0].mul(255).round().byte().permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="diffusion models only"):
        deblur_array(model.predictor, rgb, (32, 8, 1), sampling={"seed": 2})


# --- training and checkpoints ----------------------------------------------------------------

def test_training_updates_only_the_unet_and_lowers_the_loss(predictor_path):
    model = tiny_refiner(predictor_path, **{"model.diffusion_refiner.prediction_type": "sample"}).train()
    predictor_before = {k: v.clone() for k, v in model.predictor.state_dict().items()}
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = photo(32, 32).repeat(2, 1, 1, 1)
    sharp = (x + 0.1 * torch.sin(torch.arange(32.0) / 2)).clamp(0, 1)   # a fixed residual to learn
    losses = []
    for step in range(25):
        torch.manual_seed(step % 5)     # the same timesteps and noise every 5 steps
        loss, parts = model.training_loss(x, sharp)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert set(parts) == {"diffusion_mse"}
    assert not model.predictor.training
    assert all(torch.equal(v, predictor_before[k]) for k, v in model.predictor.state_dict().items())
    assert any(not torch.equal(v, unet_before[k]) for k, v in model.unet.state_dict().items())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_checkpoint_holds_the_predictor_and_reloads_without_its_file(predictor_path, tmp_path):
    params = refiner_params(predictor_path)
    model = tiny_refiner(predictor_path)
    path = tmp_path / "refiner.pt"
    save_atomic({"model_config": params.model.model_dump(mode="json"), "state_dict": model.state_dict(),
                 "train_patch_size": 64, "step": 1}, path)
    moved = dict(load_checkpoint(path))
    moved["model_config"] = {**moved["model_config"], "diffusion_refiner": {
        **moved["model_config"]["diffusion_refiner"], "predictor": str(tmp_path / "gone.pt")}}
    reloaded = model_from_checkpoint(moved)
    assert reloaded.predictor_spec["source"] == predictor_path
    x = photo(40, 40)
    # channels-last weights after reloading (configure_inference) round differently: close, not bit-equal
    torch.testing.assert_close(reloaded(x, seed=1), model(x, seed=1), atol=1e-5, rtol=0)


# --- stages and serving ----------------------------------------------------------------------

@pytest.mark.slow
def test_train_evaluate_register_report_the_predictor_beside_the_refiner(predictor_path, tmp_path, mlflow_uri):
    from deblur.stages.evaluate import run_evaluate
    from deblur.stages.register import run_register
    from deblur.stages.train import run_train

    overrides = {**TINY_OVERRIDES, **TINY_UNET, "model.diffusion_refiner.predictor": predictor_path,
                 "model.diffusion_refiner.sampling_steps": 2, "train.init_from": None, "train.max_steps": 2,
                 "train.batch_size": 2, "train.patch_size": 32, "train.val_every": 2, "train.val_max_images": 2,
                 "tiling.tile_size": 32, "tiling.overlap": 8, "evaluate.classical_baseline": "wiener",
                 "evaluate.triptychs": 1, "register.min_pairs_per_blur_type": 1000}
    params_file = write_params(tmp_path / "params.yaml", overrides)
    params = load_params(params_file)
    copy_pairs(params, tmp_path / "pairs")
    info = run_train(params_file, tmp_path / "pairs", tmp_path / "ckpt", tmp_path / "curve.csv", tmp_path / "run.json")
    summary = run_evaluate(params_file, tmp_path / "run.json", tmp_path / "pairs", tmp_path / "metrics.json",
                           tmp_path / "per_image.csv", tmp_path / "per_blur.csv", tmp_path / "sharp_in.csv",
                           tmp_path / "trip")
    assert summary["per_blur_type"]
    for blur_type, scores in summary["per_blur_type"].items():
        assert {"model_psnr", "predictor_psnr", "input_psnr", "predictor_ssim"} <= set(scores), blur_type
    assert summary["overall"]["gain_over_predictor_db"] == pytest.approx(
        summary["overall"]["model_psnr"] - summary["overall"]["predictor_psnr"], abs=1e-3)
    with open(tmp_path / "per_blur.csv", newline="") as f:
        methods = {(r["blur_type"], r["method"]) for r in csv.DictReader(f)}
    assert all((t, "predictor") in methods for t in summary["per_blur_type"])
    metrics = mlflow.MlflowClient().get_run(info["run_id"]).data.metrics
    blur_type = next(iter(summary["per_blur_type"]))
    assert metrics[f"test_{blur_type}_predictor_psnr"] == pytest.approx(
        summary["per_blur_type"][blur_type]["predictor_psnr"])

    record = run_register(params_file, tmp_path / "run.json", tmp_path / "per_image.csv", tmp_path / "sharp_in.csv",
                          tmp_path / "pairs", tmp_path / "decision.json", tmp_path / "serving")
    checks = {c["name"]: c for c in record["checks"]}
    assert "its predictor" in checks["beats_init_from"]["detail"]
    assert checks["beats_init_from"]["values"]["mean_diff"] == pytest.approx(
        summary["overall"]["model_psnr"] - summary["overall"]["predictor_psnr"], abs=1e-3)
    assert record["promoted"] == all(c["passed"] for c in record["checks"])
    assert record["version"]


@pytest.fixture(scope="module")
def refiner_artifact(predictor_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refiner_artifact")
    params = refiner_params(predictor_path, **{"model.diffusion_refiner.sampling_steps": 2})
    torch.manual_seed(0)
    model = build_model(params.model)
    save_atomic({"model_config": params.model.model_dump(mode="json"), "state_dict": model.state_dict(),
                 "train_patch_size": 64, "step": 1}, tmp / "refiner.pt")
    return export_serving_artifact(tmp / "refiner.pt", tmp / "model", {"name": "refiner-test"},
                                   tiling=params.tiling.model_copy(update={"tile_size": 32, "overlap": 8}),
                                   serving=params.serving)


def test_serving_artifact_samples_with_the_requested_seed(refiner_artifact):
    served = load_serving_model(refiner_artifact, threads=1)
    assert served.samples and served.sampling_for() == {"seed": 0, "steps": 2}
    rgb = smooth_rgb(40, 52)
    one, again = served.deblur(rgb, sampling={"seed": 1, "steps": 2}), served.deblur(rgb, sampling={"seed": 1, "steps": 2})
    assert np.array_equal(one, again)
    assert not np.array_equal(one, served.deblur(rgb, sampling={"seed": 2, "steps": 2}))


@pytest.mark.slow
def test_http_seed_and_steps(refiner_artifact, tmp_path):
    body = encode(Image.fromarray(smooth_rgb(40, 52)), "PNG")
    with running_server(refiner_artifact) as server:
        def post(query: str) -> httpx.Response:
            return httpx.post(f"{server.url}/api/deblur?{query}", content=body,
                              headers={"content-type": "image/png"}, timeout=120)

        first, second, other = post("seed=1&steps=2"), post("seed=1&steps=2"), post("seed=2&steps=2")
        assert first.status_code == 200, first.text
        assert first.content == second.content != other.content
        assert first.headers["x-seed"] == "1" and first.headers["x-steps"] == "2"
        default = post("")
        assert default.headers["x-seed"] == "0" and default.headers["x-steps"] == "2"
        too_many = post("steps=99")
        assert too_many.status_code == 400
        assert "steps='99' must be an integer in [1, 8] (serving.refiner_steps_range)" in too_many.json()["detail"]
        assert "diffusion refiner: seed=1 steps=2" in server.log()


@pytest.mark.slow
def test_http_refuses_seed_for_a_model_that_does_not_sample(tmp_path):
    from serving_support import make_artifact

    body = encode(Image.fromarray(smooth_rgb(24, 24)), "PNG")
    with running_server(make_artifact(tmp_path)) as server:
        answer = httpx.post(f"{server.url}/api/deblur?seed=3", content=body, headers={"content-type": "image/png"},
                            timeout=60)
    assert answer.status_code == 400
    assert "seed= apply to diffusion refiner models only; this model is a StackedConv" in answer.json()["detail"]
    assert json.loads(answer.text)["error"] == "invalid_parameter"


def test_predictor_sources_are_checked_the_same_way_for_every_diffusion_model(tmp_path):
    """One resolver for both families: a missing file and a diffusion checkpoint are refused, naming the setting."""
    from deblur.models.diffusion import predictor_checkpoint
    from deblur.models.diffusion.refiner import RefinerError

    with pytest.raises(RefinerError, match=r"model.diffusion_refiner.predictor: .*missing.pt: checkpoint not found"):
        predictor_checkpoint(str(tmp_path / "missing.pt"), "model.diffusion_refiner.predictor", RefinerError)
    refiner_file = tmp_path / "refiner.pt"
    torch.save({"model_config": {"name": "diffusion_refiner"}, "state_dict": {}}, refiner_file)
    with pytest.raises(ValueError, match=r"model.controlnet_sd.predictor: .*refiner.pt is a diffusion model"):
        predictor_checkpoint(str(refiner_file), "model.controlnet_sd.predictor", ValueError)
    ckpt = predictor_checkpoint(str(ROOT / "checkpoints/pretrained/nafnet16.pt"), "x", ValueError)
    assert ckpt["model_config"]["name"] == "nafnet"
