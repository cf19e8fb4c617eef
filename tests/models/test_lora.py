"""LoRA adapters (deblur.models.lora, train.lora): identity at init, only the adapter trains, merge and
save/reload reproduce outputs, on NAFNet and diffusers' UNet2DModel; and one adapter through
the train, evaluate and register stages to the registry and back out for inference."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import ROOT, TRAIN_OVERRIDES, copy_pairs, write_params
import torch

from deblur.models import lora
from deblur.core.config import ConfigError, load_params
from deblur.models.build import build_model

TINY_NAFNET = {"width": 8, "enc_blocks": [1, 1], "middle_blocks": 1, "dec_blocks": [1, 1], "tlc": True,
               "tlc_factor": 1.5, "padding": "reflect"}
NAFNET_TARGETS = ("conv1", "conv3", "conv4", "conv5", "sca.proj")


def tiny_nafnet(seed: int = 0) -> torch.nn.Module:
    params = load_params(ROOT / "params.yaml", overrides={"model.name": "nafnet", "model.nafnet": TINY_NAFNET})
    torch.manual_seed(seed)
    model = build_model(params.model)
    with torch.no_grad():   # a trained-looking model: the residual branches switched on
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.normal_(0, 0.5)
            elif name.startswith("ending"):
                p.normal_(0, 0.05)
    return model.eval()


def tiny_unet2d(seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8).eval()


def run_unet2d(model, x):
    return model(x, torch.tensor([10])).sample


ARCHITECTURES = {
    "nafnet": (tiny_nafnet, lambda m, x: m(x), NAFNET_TARGETS),
    "unet2d": (tiny_unet2d, run_unet2d, ("conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0")),
}


def one_adapter_step(model, forward, x, target) -> None:
    """One AdamW step on the trainable parameters (large lr so every adapter weight moves)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = (forward(model, x) - target).abs().mean()
    loss.backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_adapter_identity_at_init_trains_alone_merges_and_reloads_exactly(arch, tmp_path):
    make, forward, targets = ARCHITECTURES[arch]
    settings = lora.LoraSettings(rank=4, alpha=4.0, dropout=0.0, target_modules=targets)
    x, target = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.rand(2, 3, 16, 16)
    model = make()
    with torch.no_grad():
        base_out = forward(model, x)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    lora.attach_adapter(model, settings)
    with torch.no_grad():
        assert torch.equal(forward(model, x), base_out)          # B = 0: exactly the base model
    share = lora.parameter_share(model)
    assert 0 < share["trainable_share"] < 0.5
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())

    adapter_before = {k: v.clone() for k, v in lora.adapter_state_dict(model).items()}
    one_adapter_step(model, forward, x, target)
    state = model.state_dict()
    for key, value in base_state.items():                       # base weights bit-identical after the step
        injected = key if key in state else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[injected], value), key
    adapter_after = lora.adapter_state_dict(model)
    changed = [k for k in adapter_after if not torch.equal(adapter_after[k], adapter_before[k])]
    assert len(changed) == len(adapter_after)                   # every A and B moved
    with torch.no_grad():
        adapted_out = forward(model, x)
    assert (adapted_out - base_out).abs().max() > 1e-4

    lora.save_adapter(model, settings, tmp_path / "adapter", base={"uri": "base.pt"})
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        lora.CONFIG_FILE, lora.WEIGHTS_FILE, lora.BASE_FILE]
    reloaded = lora.load_adapter(make(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(forward(reloaded, x), adapted_out)   # saved + reloaded: exactly the same outputs

    merged = lora.merge_adapter(reloaded)
    assert not lora.has_adapter(merged) and set(merged.state_dict()) == set(base_state)
    with torch.no_grad():
        assert (forward(merged, x) - adapted_out).abs().max() < 1e-5


def test_clear_errors_for_bad_targets_and_a_missing_base():
    with pytest.raises(lora.LoraError, match=r"'convX' matches no Conv2d or Linear layer .*candidates: .*'sca\.proj'"):
        lora.attach_adapter(tiny_nafnet(), lora.LoraSettings(4, 4.0, 0.0, ("conv1", "convX")))
    with pytest.raises(lora.LoraError, match=r"encoders\.0\.0\.conv2, a grouped conv \(groups=16.*multiple of its groups"):
        lora.attach_adapter(tiny_nafnet(), lora.LoraSettings(4, 4.0, 0.0, ("conv2",)))
    with pytest.raises(ConfigError, match="lora.rank is 4 but init_from is empty"):
        load_params(ROOT / "params.yaml", overrides={"train.lora.rank": 4, "train.init_from": None})


def test_runs_saved_before_train_lora_existed_still_resume():
    from deblur.training.resume import PARAMS_ADDED_SINCE, resume_mismatch

    lora_section = load_params(ROOT / "params.yaml").train.lora.model_dump(mode="json")
    assert {k: PARAMS_ADDED_SINCE[f"train.lora.{k}"] for k in lora_section} == lora_section   # params.yaml's "off"
    current = {"params": {"train": {"lr": 1e-4, "lora": lora_section}}, "data": "d", "code": {}}
    assert resume_mismatch({"params": {"train": {"lr": 1e-4}}, "data": "d", "code": {}}, current) == []
    on = {**current, "params": {"train": {"lr": 1e-4, "lora": {**lora_section, "rank": 4}}}}
    assert resume_mismatch({"params": {"train": {"lr": 1e-4}}, "data": "d", "code": {}}, on) == [
        "params changed: train.lora.rank"]


LORA_PIPELINE = {
    **TRAIN_OVERRIDES,
    "model.name": "nafnet",
    "model.nafnet": TINY_NAFNET,
    "train.max_steps": 2,
    "train.val_every": 2,
    "evaluate.classical_baseline": "none",
    "evaluate.triptychs": 0,
    "tiling.tile_size": 32,
    "tiling.overlap": 8,
    "register.min_gain_over_input_db": -100.0,
    "register.min_sharp_in_psnr": 0.0,
    "register.min_pairs_per_blur_type": 1000,
}


@pytest.mark.slow
def test_adapter_trains_evaluates_registers_against_its_base_version_and_serves(tmp_path, mlflow_uri):
    from deblur.models.checkpoint_file import load_checkpoint
    from deblur.models.build import model_from_checkpoint
    from deblur.artifact.export import export_serving_artifact
    from deblur.artifact.torch_model import load_serving_model
    from deblur.tracking.registry_serving import load_from_model_uri
    from deblur.stages.evaluate import run_evaluate
    from deblur.stages.register import run_register
    from deblur.stages.train import run_train
    from deblur.inference.tiling import deblur_array

    def pipeline(tag: str, overrides: dict) -> tuple[dict, dict]:
        params_file = write_params(tmp_path / f"{tag}.yaml", {**LORA_PIPELINE, **overrides})
        info = run_train(params_file, tmp_path / "pairs", tmp_path / tag, tmp_path / f"{tag}_curve.csv",
                         tmp_path / f"{tag}_run.json")
        run_evaluate(params_file, tmp_path / f"{tag}_run.json", tmp_path / "pairs", tmp_path / f"{tag}_metrics.json",
                     tmp_path / f"{tag}.csv", tmp_path / f"{tag}_blur.csv", tmp_path / f"{tag}_sharp_in.csv",
                     tmp_path / f"{tag}_trip")
        record = run_register(params_file, tmp_path / f"{tag}_run.json", tmp_path / f"{tag}.csv",
                              tmp_path / f"{tag}_sharp_in.csv", tmp_path / "pairs", tmp_path / f"{tag}_decision.json",
                              tmp_path / "serving")
        return info, record

    params = load_params(ROOT / "params.yaml", overrides=LORA_PIPELINE)
    copy_pairs(params, tmp_path / "pairs")
    _, base = pipeline("base", {"train.init_from": None, "train.lr": 0.01})   # residual branches switched on
    assert base["promoted"] and base["version"] == "1"

    info, record = pipeline("adapter", {"train.init_from": "models:/deblur@champion", "train.lora.rank": 2,
                                        "train.lr": 0.01})
    ckpt = load_checkpoint(info["checkpoint"])
    assert ckpt["lora"]["base"]["version"] == "1" and ckpt["lora"]["settings"]["rank"] == 2
    client = mlflow.MlflowClient(mlflow_uri)
    version = client.get_model_version("deblur", record["version"])
    assert record["version"] == "2"
    assert version.tags["base_model_version"] == "1" and version.tags["base_model_uri"] == "models:/deblur/1"
    assert version.tags["lora_adapter"] == "true"
    files = {Path(a.path).name for a in mlflow.artifacts.list_artifacts(f"models:/deblur/2/artifacts")}
    assert files == {lora.CONFIG_FILE, lora.WEIGHTS_FILE, lora.BASE_FILE}       # the adapter only, no base weights
    logged = Path(mlflow.artifacts.download_artifacts("models:/deblur/2", dst_path=str(tmp_path / "logged")))
    assert (logged / "lora_pyfunc_model.py").is_file() and not (logged / "python_model.pkl").exists()  # from code
    requirements = (logged / "requirements.txt").read_text().splitlines()
    assert "peft==0.21.2" in requirements and "torch==2.13.0" in requirements

    image = np.random.default_rng(0).integers(0, 256, size=(37, 45, 3), dtype=np.uint8)
    tiling = params.tiling
    expected = deblur_array(model_from_checkpoint(ckpt), image, tiling)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                                                  # the adapter changed something
        assert (model_from_checkpoint(ckpt)(x) - model_from_checkpoint(tmp_path / "base" / "best.pt")(x)).abs().max() > 1e-5

    served = load_from_model_uri("models:/deblur/2", None, threads=1)      # base v1 from the registry + adapter
    assert served.meta["base_model_uri"] == "models:/deblur/1"
    assert np.array_equal(served.deblur(image), expected)
    pyfunc = mlflow.pyfunc.load_model("models:/deblur/2")
    assert np.array_equal(pyfunc.predict(image), expected)
    artifact = export_serving_artifact(info["checkpoint"], tmp_path / "exported", {"name": "deblur", "version": "2"},
                                       tiling=tiling, serving=params.serving)
    assert np.array_equal(load_serving_model(artifact, threads=1).deblur(image), expected)

    import httpx
    from PIL import Image
    from serving_support import encode, running_server

    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "DEBLUR_MODEL_URI": "models:/deblur/2"}
    with running_server(None, env=env) as server:          # the HTTP app: base v1 + the adapter from the registry
        response = httpx.post(f"{server.url}/api/deblur", content=encode(Image.fromarray(image), "PNG"), timeout=120)
        assert response.status_code == 200, response.text
        assert response.headers["X-Model-Version"] == "2"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")), expected)

    merged = tmp_path / "merged.pt"
    proc = subprocess.run([sys.executable, "-m", "deblur", "merge-lora", "--adapter", "models:/deblur/2", "-o",
                           str(merged)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plain = load_checkpoint(merged)
    assert "lora" not in plain and not any("lora_" in k for k in plain["state_dict"])
    assert np.array_equal(deblur_array(model_from_checkpoint(plain), image, tiling), expected)
    assert json.loads((tmp_path / "adapter_decision.json").read_text())["challenger_uri"] == "models:/deblur/2"
