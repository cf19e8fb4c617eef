"""Official NAFNet checkpoints: conversion, exact outputs, padding, train.init_from and `deblur import-checkpoint`.

The official files are BasicSR's ``{"params": state_dict}`` with megvii-research/NAFNet's key
names; ``official_file`` writes one from a small random NAFNet of ours by renaming its keys
back (``middle`` -> ``middle_blks``, ``sca.proj`` -> ``sca.1``), and ``official_forward`` is the
official forward pass: zero padding at the bottom/right, body, global residual, crop.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TRAIN_OVERRIDES, write_params
from deblur.cli.main import main
from deblur.models.checkpoint_file import CheckpointError, load_checkpoint, save_atomic
from deblur.models.build import model_from_checkpoint
from deblur.core.config import load_params
from deblur.cli.import_pretrained import import_official
from deblur.models.nafnet import NAFNet
from deblur.models.official import OfficialCheckpointError, Origin, convert, infer_architecture, rename_keys
from deblur.artifact.torch_model import load_serving_model
from deblur.training.trainer import Trainer, TrainingError

ARCH = {"width": 8, "enc_blocks": (1, 2, 1), "middle_blocks": 2, "dec_blocks": (1, 1, 2)}   # multiple of 8
NAFNET_PARAMS = {"model.name": "nafnet", "model.nafnet": {**ARCH, "tlc": True, "tlc_factor": 1.5, "padding": "zeros"}}


def random_nafnet(seed: int = 0, **arch) -> NAFNet:
    """A NAFNet with every weight random, beta and gamma included, so that every block acts."""
    torch.manual_seed(seed)
    model = NAFNet(**{**ARCH, **arch}, tlc=False, tlc_factor=1.5, padding="reflect")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.copy_(torch.randn_like(p) * 0.5)
            elif name.startswith("ending"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def official_names(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        key = re.sub(r"^middle\.", "middle_blks.", key)
        out[re.sub(r"\.sca\.proj\.", ".sca.1.", key)] = value.clone()
    return out


def official_file(path: Path, model: NAFNet, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": official_names(model.state_dict()), **extra}, path)
    return path


@torch.no_grad()
def official_forward(model: NAFNet, x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    m = model.size_multiple
    padded = F.pad(x, (0, -w % m, 0, -h % m))          # zeros, as check_image_size
    return (model.body(padded) + padded)[..., :h, :w]


@pytest.mark.parametrize("size", [(37, 53), (32, 48), (1, 9)])
def test_official_layout_loads_and_reproduces_outputs_exactly(tmp_path, size):
    source = random_nafnet()
    ckpt = load_checkpoint(official_file(tmp_path / "NAFNet-tiny.pth", source))
    assert ckpt["model_config"] == {"name": "nafnet", "nafnet": {**ARCH, "enc_blocks": [1, 2, 1],
                                                                 "dec_blocks": [1, 1, 2], "tlc": True,
                                                                 "tlc_factor": 1.5, "padding": "zeros"}}
    assert ckpt["train_patch_size"] == 256 and ckpt["origin"]["file"] == "NAFNet-tiny.pth"
    model = model_from_checkpoint(ckpt, for_inference=False).eval()
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    expected = official_forward(source, x)
    assert out.shape == x.shape
    assert (out - expected).abs().max().item() < 1e-6
    assert (out - x).abs().mean() > 1e-3              # the blocks really act


def test_reflect_padding_differs_from_official_only_off_multiples(tmp_path):
    source = random_nafnet()
    ckpt = load_checkpoint(official_file(tmp_path / "n.pth", source))
    ckpt["model_config"]["nafnet"]["padding"] = "reflect"
    reflect = model_from_checkpoint(ckpt, for_inference=False).eval()
    with torch.no_grad():
        odd = torch.rand(1, 3, 37, 53)
        diff = (reflect(odd) - official_forward(source, odd)).abs()
        assert diff.max() > 1e-4
        assert diff[..., -4:, :].mean() > diff[..., :8, :8].mean()    # largest near the padded border
        even = torch.rand(1, 3, 32, 48)
        assert (reflect(even) - official_forward(source, even)).abs().max() < 1e-6


def test_architecture_is_inferred_from_the_keys():
    arch = {"width": 4, "enc_blocks": (2, 0, 1), "middle_blocks": 3, "dec_blocks": (1, 1, 2)}
    state = rename_keys(official_names(random_nafnet(**arch).state_dict()))
    assert infer_architecture(state) == {**arch, "enc_blocks": [2, 0, 1], "dec_blocks": [1, 1, 2]}
    assert "middle.2.sca.proj.weight" in state and not any("middle_blks" in k or "sca.1." in k for k in state)


def test_params_are_preferred_and_params_ema_is_taken_when_alone_or_asked_for(tmp_path):
    plain, ema = random_nafnet(0), random_nafnet(1)
    both = official_file(tmp_path / "both.pth", plain, params_ema=official_names(ema.state_dict()))
    x = torch.rand(1, 3, 24, 40)

    def out(ckpt) -> torch.Tensor:
        with torch.no_grad():
            return model_from_checkpoint(ckpt, for_inference=False).eval()(x)

    default = load_checkpoint(both)
    assert default["origin"]["param_key"] == "params"
    assert torch.allclose(out(default), official_forward(plain, x), atol=1e-6)
    asked = convert(torch.load(both, weights_only=False), Origin.of_file(both), param_key="params_ema")
    assert asked["origin"]["param_key"] == "params_ema"
    assert torch.allclose(out(asked), official_forward(ema, x), atol=1e-6)
    torch.save({"params_ema": official_names(ema.state_dict())}, tmp_path / "ema.pth")
    alone = load_checkpoint(tmp_path / "ema.pth")
    assert alone["origin"]["param_key"] == "params_ema"
    assert torch.allclose(out(alone), official_forward(ema, x), atol=1e-6)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "junk.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint.*Tensor"):
        load_checkpoint(tmp_path / "tensor.pth")
    torch.save({"net_g": {}, "optimizer": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"keys found: \['net_g', 'optimizer'\]"):
        load_checkpoint(tmp_path / "other.pth")
    torch.save({"params": {"conv_first.weight": torch.zeros(1)}}, tmp_path / "esrgan.pth")
    with pytest.raises(OfficialCheckpointError, match=r"unknown keys \['conv_first.weight'\]"):
        load_checkpoint(tmp_path / "esrgan.pth")
    state = official_names(random_nafnet().state_dict())
    del state["encoders.1.1.conv2.weight"]
    torch.save({"params": state}, tmp_path / "broken.pth")
    with pytest.raises(OfficialCheckpointError, match="missing.*encoders.1.1.conv2.weight"):
        load_checkpoint(tmp_path / "broken.pth")


def test_old_checkpoints_without_padding_load_with_reflect(tmp_path):
    model = random_nafnet()
    config = load_params(ROOT / "params.yaml").model.model_dump(mode="json")
    config["nafnet"] = {**config["nafnet"], **ARCH}
    del config["nafnet"]["padding"]
    save_atomic({"model_config": config, "state_dict": model.state_dict(), "train_patch_size": 32, "step": 1},
                tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert ckpt["model_config"]["nafnet"]["padding"] == "reflect"
    assert model_from_checkpoint(ckpt).padding == "reflect"
    shipped = ROOT / "checkpoints" / "pretrained" / "nafnet8.pt"
    if shipped.is_file():
        assert model_from_checkpoint(shipped).padding == "reflect"


def test_train_init_from_an_official_file(tmp_path, pairs_dir):  # noqa: F811
    source = random_nafnet()
    path = official_file(tmp_path / "NAFNet-tiny.pth", source)
    params = load_params(ROOT / "params.yaml", overrides={**TRAIN_OVERRIDES, **NAFNET_PARAMS,
                                                          "train.init_from": str(path)})
    trainer = Trainer(params, pairs_dir, tmp_path / "ck")
    assert all(torch.equal(v, source.state_dict()[k.replace("module.", "")]) for k, v in
               trainer.model.state_dict().items())
    wider = {**NAFNET_PARAMS, "model.nafnet": {**NAFNET_PARAMS["model.nafnet"], "width": 16}}
    with pytest.raises(TrainingError, match=r"it holds nafnet width 8, enc_blocks \[1, 2, 1\].*"
                                            r"model.nafnet has width 16"):
        Trainer(load_params(ROOT / "params.yaml", overrides={**TRAIN_OVERRIDES, **wider, "train.init_from": str(path)}),
                pairs_dir, tmp_path / "ck2")


def test_import_without_pairs_says_to_synthesize(tmp_path, mlflow_uri):
    path = official_file(tmp_path / "n.pth", random_nafnet())
    with pytest.raises(CheckpointError, match="dvc repro synthesize"):
        import_official(path, None, "MIT", ROOT / "params.yaml", tmp_path / "no_pairs", tmp_path / "rep",
                        tmp_path / "serving", "zeros", 256, None)


def test_deblur_import_checkpoint_registers_through_the_gate(tmp_path, pairs_dir, mlflow_uri, capsys):  # noqa: F811
    params_file = write_params(tmp_path / "params.yaml", {**TRAIN_OVERRIDES, "tiling.tile_size": 32,
                                                          "tiling.overlap": 8, "evaluate.triptychs": 0,
                                                          "evaluate.max_images": 4, "evaluate.sharp_in_images": 2,
                                                          "evaluate.classical_baseline": "none",
                                                          "register.min_gain_over_input_db": -100.0,
                                                          "register.min_sharp_in_psnr": 0.0,
                                                          "register.min_pairs_per_blur_type": 1000})
    path = official_file(tmp_path / "NAFNet-tiny.pth", random_nafnet())
    cmd = [str(Path(sys.executable).parent / "deblur"), "import-checkpoint", str(path), "--name", "tiny",
           "--licence", "MIT", "--params", str(params_file), "--pairs", str(pairs_dir),
           "--reports", str(tmp_path / "imported"), "--serving-dir", str(tmp_path / "serving")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered as deblur v1" in proc.stdout

    client = mlflow.MlflowClient(mlflow_uri)
    version = client.get_model_version("deblur", "1")
    tags = version.tags
    assert tags["origin"] == "official NAFNet checkpoint NAFNet-tiny.pth" and tags["source_file"] == "NAFNet-tiny.pth"
    assert tags["licence"] == "MIT" and tags["source_sha256"] == Origin.of_file(path).sha256
    assert len(tags["checkpoint_sha256"]) == 64 and "gate" in tags and tags["param_key"] == "params"
    run = client.get_run(tags["train_run_id"])
    assert run.data.tags["stage"] == "import" and run.data.tags["source_sha256"] == tags["source_sha256"]
    assert run.data.params["model.nafnet.width"] == "8" and run.data.params["model.nafnet.padding"] == "zeros"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint", "origin.json"}

    assert tags["gate"].startswith("promoted: first champion")
    served = load_serving_model(tmp_path / "serving", threads=1)       # the champion's artifact: the import, as is
    assert served.model.padding == "zeros" and served.meta["version"] == "1"

    # in-process from here on (same entry point, without a second interpreter start)
    assert main(cmd[1:]) == 0 and "already registered as deblur v1" in capsys.readouterr().out
    assert main([cmd[1], str(tmp_path / "missing.pth"), *cmd[3:]]) == 1
    assert "missing.pth: checkpoint not found" in capsys.readouterr().err


def test_padding_is_validated():
    from deblur.core.config import ConfigError
    from deblur.models.common import pad_to_multiple

    with pytest.raises(ConfigError, match="padding"):
        load_params(ROOT / "params.yaml", overrides={"model.nafnet.padding": "circular"})
    with pytest.raises(ValueError, match="circular"):
        pad_to_multiple(torch.zeros(1, 3, 5, 5), 4, "circular")
    assert pad_to_multiple(torch.ones(1, 1, 3, 5), 4, "zeros")[0, 0, -1].sum() == 0


class _Payload:
    """An arbitrary object: unpickling it would run code a checkpoint author chose."""

    def __reduce__(self):
        return (print, ("payload ran",))


def test_checkpoints_are_read_weights_only_unless_a_run_resumes_its_own_state(tmp_path, capsys):
    """A file that pickles more than tensors and plain values (e.g. a tampered registry artifact)
    is refused with a message saying what to use; a training run's own last.pt is read in full."""
    state = {"model_config": {"name": "stacked_conv", "stacked_conv": {"channels": 8, "depth": 2}},
             "state_dict": {}, "extra": _Payload()}
    path = tmp_path / "tampered.pt"
    torch.save(state, path)
    refused = r"tampered\.pt: holds objects other than tensors.*best\.pt \(it pickles print\)"
    with pytest.raises(CheckpointError, match=refused):
        load_checkpoint(path)
    assert "payload ran" not in capsys.readouterr().out
    load_checkpoint(path, trusted=True)
    assert "payload ran" in capsys.readouterr().out
