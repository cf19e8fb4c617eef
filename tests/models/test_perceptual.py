"""LPIPS from local files: torchvision/lpips key layouts, loader errors, metric properties, tiling,
the differentiable loss, and the evaluate stage with and without a backbone file."""

from __future__ import annotations

import csv
import json

import mlflow
import numpy as np
import pytest

from conftest import TRAIN_OVERRIDES, copy_pairs, write_params
import torch

from deblur.models import perceptual
from deblur.tracking import runs as tracking
from deblur.models.checkpoint_file import save_atomic
from deblur.core.config import load_params
from deblur.models.perceptual import (BACKBONES, TAP_CHANNELS, LPIPS, PerceptualError, PerceptualLoss, load_lpips, lpips_distance)

# torchvision's conv indices in alexnet().features and vgg16().features
TORCHVISION_CONVS = {"alex": (0, 3, 6, 8, 10), "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}


def write_random_weights(folder, net: str, seed: int = 0):
    """A random backbone in torchvision's layout (with a classifier, as torchvision saves it) and random
    non-negative linear heads in the lpips package's layout; returns (backbone path, linear path)."""
    torch.manual_seed(seed)
    state = BACKBONES[net]().state_dict()
    state["classifier.1.weight"] = torch.randn(10, 9216)          # ignored by the loader, as in a torchvision file
    backbone, linear = folder / f"{net}_random.pth", folder / f"{net}_lin_random.pth"
    torch.save(state, backbone)
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(TAP_CHANNELS[net])}, linear)
    return backbone, linear


@pytest.fixture(scope="module")
def alex_files(tmp_path_factory):
    return write_random_weights(tmp_path_factory.mktemp("lpips"), "alex")


@pytest.fixture(scope="module")
def alex(alex_files) -> LPIPS:
    return load_lpips(*alex_files, "alex")


def _photo(seed: int = 0, shape=(64, 80)) -> np.ndarray:
    """A smooth colour image with edges (not white noise, so added noise is what LPIPS sees)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    base = np.stack([np.sin(xs / 7 + c) * np.cos(ys / 5 - c) for c in range(3)], -1) * 90 + 128
    base[shape[0] // 3:, shape[1] // 2:] += 60 * rng.random(3)
    return np.clip(base, 0, 255).astype(np.uint8)


def _noisy(image: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, image.shape)
    return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)


def test_backbones_use_torchvision_state_dict_keys():
    for net, convs in TORCHVISION_CONVS.items():
        keys = list(BACKBONES[net]().state_dict())
        assert keys == [f"features.{i}.{p}" for i in convs for p in ("weight", "bias")]
    assert list(LPIPS("alex", calibrated=True).lins.state_dict()) == [f"{k}.model.1.weight" for k in range(5)]


@pytest.mark.parametrize("calibrated", [True, False])
def test_identical_is_zero_symmetric_and_grows_with_noise(alex_files, calibrated):
    metric = load_lpips(alex_files[0], alex_files[1] if calibrated else None, "alex")
    sharp = _photo()
    assert lpips_distance(metric, sharp, sharp) == 0.0
    scores = [lpips_distance(metric, _noisy(sharp, s), sharp) for s in (3, 12, 40)]
    assert 0 < scores[0] < scores[1] < scores[2], scores
    other = _noisy(sharp, 12)
    assert lpips_distance(metric, other, sharp) == pytest.approx(lpips_distance(metric, sharp, other), rel=1e-6)


def test_vgg_loads_and_scores(tmp_path):
    metric = load_lpips(*write_random_weights(tmp_path, "vgg"), "vgg")
    sharp = _photo(shape=(24, 20))
    assert lpips_distance(metric, sharp, sharp) == 0.0
    assert 0 < lpips_distance(metric, _noisy(sharp, 10), sharp) < lpips_distance(metric, _noisy(sharp, 40), sharp)


def test_loader_errors_name_the_file_and_the_key(tmp_path, alex_files):
    backbone, linear = alex_files
    with pytest.raises(PerceptualError, match=r"nowhere\.pth: LPIPS backbone file not found"):
        load_lpips(tmp_path / "nowhere.pth", None, "alex")
    with pytest.raises(PerceptualError, match=r"gone\.pth: LPIPS linear file not found"):
        load_lpips(backbone, tmp_path / "gone.pth", "alex")

    state = torch.load(backbone, weights_only=True)
    del state["features.3.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(PerceptualError,
                       match=r"partial\.pth: missing key 'features\.3\.weight'; expected a torchvision alexnet"):
        load_lpips(tmp_path / "partial.pth", None, "alex")

    vgg_backbone, _ = write_random_weights(tmp_path, "vgg")
    with pytest.raises(PerceptualError, match=r"vgg_random\.pth: key 'features\.0\.weight' has shape \(64, 3, 3, 3\), "
                                              r"expected \(64, 3, 11, 11\)"):
        load_lpips(vgg_backbone, None, "alex")

    heads = torch.load(linear, weights_only=True)
    del heads["lin2.model.1.weight"]
    torch.save(heads, tmp_path / "heads.pth")
    with pytest.raises(PerceptualError, match=r"heads\.pth: missing key 'lin2\.model\.1\.weight'"):
        load_lpips(backbone, tmp_path / "heads.pth", "alex")

    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(PerceptualError, match=r"text\.pth: not a readable PyTorch state dict"):
        load_lpips(tmp_path / "text.pth", None, "alex")
    with pytest.raises(PerceptualError, match="unknown LPIPS net 'squeeze'"):
        load_lpips(backbone, None, "squeeze")


def test_weights_come_from_the_files(alex_files, alex):
    state = torch.load(alex_files[0], weights_only=True)
    torch.testing.assert_close(alex.backbone.features[3].weight, state["features.3.weight"])
    heads = torch.load(alex_files[1], weights_only=True)
    torch.testing.assert_close(alex.lins[4].model[1].weight, heads["lin4.model.1.weight"])
    assert not any(p.requires_grad for p in alex.parameters())


def test_large_images_are_scored_in_tiles_close_to_the_whole_image(alex, monkeypatch):
    sharp = _photo(shape=(96, 150))
    noisy = _noisy(sharp, 20)
    whole = lpips_distance(alex, noisy, sharp)
    monkeypatch.setattr(perceptual, "TILE_SIDE", 64)   # 2 x 3 tiles
    tiled = lpips_distance(alex, noisy, sharp)
    assert tiled != whole and tiled == pytest.approx(whole, rel=0.1)


def test_perceptual_loss_is_differentiable_with_frozen_weights(alex):
    loss_fn = PerceptualLoss(alex)
    target = perceptual.to_tensor(_photo(shape=(40, 40)))
    prediction = perceptual.to_tensor(_noisy(_photo(shape=(40, 40)), 25)).requires_grad_(True)
    black = torch.zeros_like(target, requires_grad=True)       # all-zero ReLU maps: gradients stay finite
    assert float(loss_fn(target, target)) == 0.0
    loss = loss_fn(prediction, target) + loss_fn(black, target)
    loss.backward()
    assert torch.isfinite(prediction.grad).all() and prediction.grad.abs().sum() > 0
    assert torch.isfinite(black.grad).all()
    assert all(p.grad is None for p in loss_fn.parameters())
    loss_fn.train()
    assert not loss_fn.training and not alex.training          # dropout in the heads never fires
    step = prediction.detach() - 0.05 * prediction.grad.sign()
    assert float(loss_fn(step, target)) < float(loss_fn(prediction.detach(), target))


@pytest.fixture(scope="module")
def eval_world(tmp_path_factory):
    """Tiny pairs of every blur type and an untrained tiny checkpoint."""
    from deblur.models.build import build_model

    root = tmp_path_factory.mktemp("lpips_eval")
    overrides = {**TRAIN_OVERRIDES, "evaluate.triptychs": 0, "evaluate.rl_iterations": 5,
                 "tiling.tile_size": 48, "tiling.overlap": 8}
    params = load_params(write_params(root / "params.yaml", overrides))
    copy_pairs(params, root / "pairs")
    torch.manual_seed(0)
    save_atomic({"model_config": params.model.model_dump(mode="json"), "train_patch_size": params.train.patch_size,
                 "state_dict": build_model(params.model).state_dict(), "step": 0}, root / "tiny.pt")
    return root, overrides


def _evaluate(root, overrides, name: str, mlflow_uri: str):
    from deblur.stages.evaluate import run_evaluate

    params_file = write_params(root / f"{name}.yaml", overrides)
    with tracking.stage_run("train", load_params(params_file)) as run_id:
        pass
    tracking.dump_json({"run_id": run_id, "checkpoint": str(root / "tiny.pt"), "data_hash": "x"}, root / "run.json")
    out = root / name
    summary = run_evaluate(params_file, root / "run.json", root / "pairs", out / "metrics.json", out / "per_image.csv",
                           out / "per_blur.csv", out / "sharp_in.csv", out / "triptychs")
    evaluate_runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                       filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    return out, summary, evaluate_runs[0]


@pytest.mark.slow
def test_evaluation_records_lpips_as_unavailable_or_scores_it(eval_world, mlflow_uri, alex_files):
    """Without a backbone file: no number anywhere, the reason in metrics.json and the MLflow tag.
    With one: LPIPS per image and method, means per blur type, MLflow metrics."""
    root, overrides = eval_world
    out, summary, run = _evaluate(root, overrides, "without", mlflow_uri)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lpips"] == {"available": False, "status": "unavailable (evaluate.lpips.backbone is null)"}
    assert run.data.tags["lpips"] == "unavailable (evaluate.lpips.backbone is null)"
    assert not any("lpips" in k for k in run.data.metrics)
    assert "lpips" not in (out / "per_image.csv").read_text().splitlines()[0]
    with open(out / "per_blur.csv", newline="") as f:
        assert {row["lpips"] for row in csv.DictReader(f)} == {""}

    overrides = {**overrides, "evaluate.lpips.backbone": str(alex_files[0]),
                 "evaluate.lpips.linear": str(alex_files[1])}
    out, summary, run = _evaluate(root, overrides, "with", mlflow_uri)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lpips"] == {"available": True,
                                "status": "alex: backbone alex_random.pth, linear heads alex_lin_random.pth"}
    assert run.data.tags["lpips"] == metrics["lpips"]["status"]
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    metric = load_lpips(*alex_files, "alex")
    first = rows[0]
    assert float(first["input_lpips"]) > 0 and float(first["model_lpips"]) > 0 and float(first["baseline_lpips"]) > 0
    from deblur.data.pairs import read_pairs
    from deblur.core.imageio import read_rgb
    record = next(r for r in read_pairs(root / "pairs", "test") if r.id == first["id"])
    assert float(first["input_lpips"]) == pytest.approx(
        lpips_distance(metric, read_rgb(record.blur_path), read_rgb(record.clear_path)), abs=1e-4)
    for blur_type, scores in metrics["per_blur_type"].items():
        mine = [r for r in rows if r["blur_type"] == blur_type]
        for method in ("model", "input", "baseline"):
            assert scores[f"{method}_lpips"] == pytest.approx(np.mean([float(r[f"{method}_lpips"]) for r in mine]),
                                                              abs=2e-4)
    assert run.data.metrics["test_model_lpips"] == pytest.approx(metrics["overall"]["model_lpips"])
    motion = metrics["per_blur_type"]["motion"]
    assert run.data.metrics["test_motion_input_lpips"] == pytest.approx(motion["input_lpips"])
    with open(out / "per_blur.csv", newline="") as f:
        per_blur = {row["label"]: row for row in csv.DictReader(f)}
    assert float(per_blur["all: model"]["lpips"]) == pytest.approx(metrics["overall"]["model_lpips"])
    assert summary["overall"]["model_psnr"] == pytest.approx(metrics["overall"]["model_psnr"])
