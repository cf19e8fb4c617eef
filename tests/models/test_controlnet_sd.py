"""SD 1.5 + ControlNet (``model.name: controlnet_sd``), run for real on a tiny random SD directory."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import ROOT, copy_pairs
import torch

from deblur.models.build import model_from_checkpoint
from deblur.core.config import ConfigError, load_params
from deblur.models.diffusion.controlnet_sd import (PIXEL_LOSS_NAMES, ControlNetSDError, colour_fix, load_pipeline, save_lora_from_checkpoint, sd_weights_hash, wavelet_low_frequency)
from deblur.models.diffusion.tiny_sd import tiny_components, write_tiny_sd
from deblur.models.build import build_model


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd")
    write_tiny_sd(root / "sd", seed=0, controlnet_dir=root / "controlnet")
    return root / "sd"


def sd_params(sd_dir, **settings):
    section = {"weights_dir": str(sd_dir), "steps": 2, "strength": 0.5, **settings}
    return load_params(ROOT / "params.yaml", overrides={
        "model.name": "controlnet_sd",
        **{f"model.controlnet_sd.{k}": v for k, v in section.items()}})


def build(sd_dir, **settings):
    torch.manual_seed(0)
    return build_model(sd_params(sd_dir, **settings).model)


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every tensor outside the ControlNet and the LoRA, cloned."""
    return {k: v.clone() for k, v in super(type(model), model).state_dict().items() if not model.is_trained_key(k)}


def test_tiny_sd_saves_and_loads_back_from_local_files_only(sd_dir):
    assert (sd_dir / "tokenizer" / "tokenizer.json").is_file() and (sd_dir / "unet" / "config.json").is_file()
    pipe = load_pipeline(sd_dir, sd_dir.parent / "controlnet")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert type(pipe).__name__ == "StableDiffusionControlNetImg2ImgPipeline"
    assert type(load_pipeline(sd_dir, pipe.controlnet, img2img=False)).__name__ == "StableDiffusionControlNetPipeline"
    original = tiny_components(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        theirs = original[name].state_dict()
        for key, value in getattr(pipe, name).state_dict().items():
            assert torch.equal(value, theirs[key]), f"{name}.{key} changed in save_pretrained -> from_pretrained"
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("a sharp photo").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id and len(ids) > 3


@pytest.mark.parametrize("missing", ["unet/config.json", "vae/diffusion_pytorch_model.safetensors",
                                     "tokenizer/tokenizer.json"])
def test_a_missing_file_is_an_error_naming_it(sd_dir, tmp_path, missing):
    broken = shutil.copytree(sd_dir, tmp_path / "sd")
    (broken / missing).unlink()
    with pytest.raises(ControlNetSDError, match=missing.replace(".", r"\.")):
        load_pipeline(broken, sd_dir.parent / "controlnet")
    with pytest.raises(ControlNetSDError, match="weights_dir"):
        build_model(sd_params(broken).model)


def test_a_controlnet_dir_with_other_control_channels_is_refused(sd_dir):
    with pytest.raises(ControlNetSDError, match="takes 3 conditioning channels, conditioning 'blurred_and_estimate' gives 6"):
        build(sd_dir, controlnet_dir=str(sd_dir.parent / "controlnet"), conditioning="blurred_and_estimate")
    model = build(sd_dir, controlnet_dir=str(sd_dir.parent / "controlnet"))
    assert model.controlnet.config.conditioning_channels == 3


def test_settings_that_cannot_work_are_refused_with_the_key():
    with pytest.raises(ControlNetSDError, match="weights_dir is null"):
        build_model(load_params(ROOT / "params.yaml", overrides={"model.name": "controlnet_sd"}).model)
    with pytest.raises(ConfigError, match="perceptual_backbone"):
        load_params(ROOT / "params.yaml", overrides={"model.controlnet_sd.perceptual": 0.1})
    with pytest.raises(ConfigError, match="steps \\* strength"):
        load_params(ROOT / "params.yaml", overrides={"model.controlnet_sd.steps": 2, "model.controlnet_sd.strength": 0.2})


def test_one_training_step_changes_only_controlnet_and_lora(sd_dir, tmp_path):
    from deblur.models.perceptual import AlexNetBackbone

    torch.manual_seed(1)
    backbone = tmp_path / "alexnet.pth"
    torch.save(AlexNetBackbone().state_dict(), backbone)
    model = build(sd_dir, train_parts="both", conditioning="blurred_and_estimate", l1=1.0, mse=1.0, gradient=0.5,
                  perceptual=0.2, perceptual_backbone=str(backbone))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert trained and all(k.startswith("controlnet.") or "lora_" in k for k in trained)
    assert any("lora_" in k for k in trained) and any(k.startswith("controlnet.") for k in trained)
    frozen = frozen_state(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)   # as the Trainer: every parameter
    blurred, sharp = torch.rand(2, 3, 16, 20), torch.rand(2, 3, 16, 20)
    model.train()
    total, parts = model.training_loss(blurred, sharp)
    assert set(parts) == {"noise_prediction", *PIXEL_LOSS_NAMES.values()}
    assert set(PIXEL_LOSS_NAMES.values()) == {"deblur_l1_loss", "deblur_mse_loss", "deblur_perceptual_loss",
                                              "deblur_gradient_loss"}
    assert all(torch.isfinite(v) and v > 0 for v in parts.values())
    total.backward()
    optimizer.step()
    after = model.state_dict()
    changed = [k for k in trained if not torch.equal(after[k], trained[k])]
    assert any("lora_" in k for k in changed) and any(k.startswith("controlnet.") for k in changed)
    now = frozen_state(model)
    assert set(now) == set(frozen)
    assert [k for k in frozen if not torch.equal(now[k], frozen[k])] == []   # UNet, VAE, text encoder bit-identical


def test_one_sampling_step_gives_an_image_of_the_input_size(sd_dir):
    model = build(sd_dir, steps=1, strength=1.0).eval()
    blurred = torch.rand(1, 3, 18, 26)          # not a multiple of the model's size multiple (4)
    out = model(blurred)
    assert out.shape == blurred.shape
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(out, model(blurred))     # the seed fixes the sample
    assert not torch.equal(out, model(blurred, seed=1))


def test_checkpoint_holds_only_the_trained_part_and_rebuilds_the_same_model(sd_dir):
    params = sd_params(sd_dir, train_parts="lora")
    model = build(sd_dir, train_parts="lora").eval()
    with torch.no_grad():
        for key, value in model.named_parameters():
            if "lora_B" in key:
                value.normal_(0, 0.5)
    state = model.state_dict()
    assert state and all("lora_" in k for k in state)
    full = sum(v.numel() for v in super(type(model), model).state_dict().values())
    assert sum(v.numel() for v in state.values()) < 0.2 * full
    ckpt = {"model_config": params.model.model_dump(mode="json"), "state_dict": state, "train_patch_size": 32}
    x = torch.rand(1, 3, 16, 16)
    # channels-last weights (configure_inference) change the summation order only
    assert (model_from_checkpoint(ckpt)(x) - model(x)).abs().max() < 1e-5


def test_lora_save_load_fuse_reproduces_the_outputs(sd_dir, tmp_path):
    model = build(sd_dir, train_parts="lora").eval()
    with torch.no_grad():
        for key, value in model.named_parameters():
            if "lora_B" in key:
                value.normal_(0, 0.5)
    lora_dir = save_lora_from_checkpoint({"state_dict": model.state_dict()}, tmp_path / "lora")
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()

    torch.manual_seed(3)
    latents, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        ours = model.unet(latents, t, encoder_hidden_states=text).sample
        pipe = load_pipeline(sd_dir, model.controlnet)
        base = pipe.unet(latents, t, encoder_hidden_states=text).sample
        pipe.load_lora_weights(lora_dir)
        loaded = pipe.unet(latents, t, encoder_hidden_states=text).sample
        pipe.fuse_lora()
        pipe.unload_lora_weights()            # fused: the LoRA layers are gone, the weights hold it
        fused = pipe.unet(latents, t, encoder_hidden_states=text).sample
    assert (ours - base).abs().max() > 1e-3   # the LoRA matters
    assert (loaded - ours).abs().max() < 1e-5
    assert (fused - ours).abs().max() < 1e-4


def test_colour_fix_keeps_the_estimates_low_frequencies():
    torch.manual_seed(0)
    estimate = torch.rand(1, 3, 40, 48)
    shifted = estimate + 0.2                               # a colour cast, same detail
    assert torch.allclose(colour_fix(shifted, estimate, "wavelet"), estimate, atol=1e-5)
    assert torch.allclose(colour_fix(2 * estimate + 0.1, estimate, "adain"), estimate, atol=1e-5)
    detail = torch.rand(1, 3, 40, 48)
    fixed = colour_fix(detail, estimate, "wavelet")
    low_fixed, low_est = wavelet_low_frequency(fixed), wavelet_low_frequency(estimate)
    assert (low_fixed - low_est).abs().mean() < 0.02      # colours of the estimate ...
    assert torch.allclose(fixed - low_fixed, detail - wavelet_low_frequency(detail), atol=0.05)   # ... detail of the output
    assert torch.equal(colour_fix(detail, estimate, "none"), detail)


@pytest.mark.slow
def test_train_evaluate_register_through_the_stages_and_the_gate_refuses(sd_dir, tmp_path, mlflow_uri):
    """A random tiny SD trains (LoRA + pixel losses), evaluates and registers; the gate refuses it
    because it loses to the blurred input, which is the right answer for random weights."""
    import mlflow

    from conftest import write_params
    from deblur.stages.evaluate import run_evaluate
    from deblur.stages.register import run_register
    from deblur.stages.train import run_train
    from conftest import TRAIN_OVERRIDES

    overrides = {**TRAIN_OVERRIDES, "model.name": "controlnet_sd", "train.max_steps": 2, "train.val_every": 2,
                 "train.precision": "fp32", "evaluate.max_images": 4, "evaluate.sharp_in_images": 1,
                 "evaluate.triptychs": 0, "register.min_pairs_per_blur_type": 1,
                 **{f"model.controlnet_sd.{k}": v for k, v in {
                     "weights_dir": str(sd_dir), "train_parts": "lora", "steps": 2, "strength": 0.5,
                     "l1": 1.0, "gradient": 0.5}.items()}}
    params_file = write_params(tmp_path / "params.yaml", overrides)
    params = load_params(params_file)
    copy_pairs(params, tmp_path / "pairs")
    info = run_train(params_file, tmp_path / "pairs", tmp_path / "ckpt", tmp_path / "curve.csv", tmp_path / "run.json")

    checkpoint = torch.load(info["checkpoint"], weights_only=False)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])   # no SD weights copied
    client = mlflow.MlflowClient()
    logged = client.get_run(info["run_id"]).data.metrics
    assert {"loss_noise_prediction", "loss_deblur_l1_loss", "loss_deblur_gradient_loss"} <= set(logged)

    metrics = run_evaluate(params_file, tmp_path / "run.json", tmp_path / "pairs", tmp_path / "metrics.json",
                           tmp_path / "per_image.csv", tmp_path / "per_blur.csv", tmp_path / "sharp_in.csv",
                           tmp_path / "triptychs")
    assert metrics
    record = run_register(params_file, tmp_path / "run.json", tmp_path / "per_image.csv", tmp_path / "sharp_in.csv",
                          tmp_path / "pairs", tmp_path / "decision.json", tmp_path / "serving")
    assert not record["promoted"]
    assert record["challenger_psnr"] < record["input_psnr"]
    checks = {c["name"]: c for c in record["checks"]}
    assert not checks["beats_input"]["passed"] and "failed: beats_input" in record["reason"]
    assert (tmp_path / "serving" / "NO_CHAMPION.txt").is_file()
    version = client.get_model_version("deblur", record["version"])
    assert version.tags["sd_weights_dir"] == str(sd_dir.resolve()) and version.tags["sd_train_parts"] == "lora"
    assert version.tags["sd_weights_hash"] == sd_weights_hash(sd_dir) and len(version.tags["sd_weights_hash"]) == 16
    assert version.tags["lora_artifact"] == "lora/pytorch_lora_weights.safetensors"
    assert [a.path for a in client.list_artifacts(version.run_id, "lora")] == ["lora/pytorch_lora_weights.safetensors"]


def test_tiled_inference_samples_the_whole_image_at_once_with_the_predictors_estimate(sd_dir, tmp_path):
    from deblur.inference.tiling import tiled_inference

    predictor_params = load_params(ROOT / "params.yaml", overrides={"model.name": "stacked_conv",
                                                                   "model.stacked_conv": {"channels": 8, "depth": 2}})
    torch.manual_seed(0)
    predictor = build_model(predictor_params.model)
    torch.save({"model_config": predictor_params.model.model_dump(mode="json"), "state_dict": predictor.state_dict(),
                "train_patch_size": 32}, tmp_path / "predictor.pt")
    model = build(sd_dir, predictor=str(tmp_path / "predictor.pt"), conditioning="blurred_and_estimate").eval()
    image = torch.rand(1, 3, 40, 52)
    estimate = tiled_inference(model.predictor, image, 16, 4, 2)
    assert not torch.allclose(estimate, image, atol=1e-3)          # the predictor does something
    tiled = tiled_inference(model, image, 16, 4, 2)                # tiles smaller than the image
    assert torch.equal(tiled, model.sample(image, estimate))       # one sampling run, one noise tensor: no seams
    assert torch.equal(tiled_inference(model, image, 16, 4, 2, sampling={"seed": 5}), model.sample(image, estimate, 5))
