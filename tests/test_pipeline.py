"""End to end: real `dvc repro` of all five stages, the MLflow store and registry, the gate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import ROOT, write_params
from deblur import tracking
from deblur.checkpoints import load_checkpoint, save_atomic
from deblur.config import load_params
from deblur.data.pairs import read_pairs
from deblur.evaluation import evaluate_model
from deblur.checkpoints import model_from_checkpoint
from deblur.mlflow_model import log_deblur_model
from deblur.stages.register import run_register
from test_training import TRAIN_OVERRIDES

PIPELINE_OVERRIDES = {
    **TRAIN_OVERRIDES,
    "evaluate.classical_baseline": "wiener",
    "evaluate.triptychs": 2,
    "tiling.tile_size": 32,
    "tiling.overlap": 8,
}
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture
def project(tmp_path, mlflow_uri):
    """A copy of the repo's pipeline in a fresh git + DVC repo, with tiny params."""
    for name in ("dvc.yaml", "pipelines", "src", "checkpoints/pretrained", "data/photos", "data/GOPRO_Large", ".gitignore"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name, **({"ignore": shutil.ignore_patterns(
            "__pycache__")} if src.is_dir() else {}))
    write_params(tmp_path / "params.yaml", PIPELINE_OVERRIDES)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("DEBLUR_PIPELINE_ID")
    run(["git", "init", "-q"], tmp_path, env)
    run([str(BIN / "dvc"), "init", "-q"], tmp_path, env)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], tmp_path, env)
    run(["git", "add", "-A"], tmp_path, env)
    run(["git", "commit", "-qm", "init"], tmp_path, env)
    return tmp_path, env


def stage_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("deblur")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_dvc_repro_runs_all_stages_then_nothing(project, mlflow_uri):
    root, env = project
    out = run([str(BIN / "dvc"), "repro"], root, env).stdout
    for stage in ("ingest", "synthesize", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out

    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["n_images"] == len(read_pairs(root / "data/pairs", "test"))
    assert {"model_psnr", "input_psnr", "baseline_psnr", "model_ssim"} <= set(metrics["overall"])
    assert set(metrics["per_blur_type"]) <= {"motion", "gaussian", "defocus", "lens"}
    decision = json.loads((root / "reports/registered_model.json").read_text())
    assert decision["version"] == "1"
    assert decision["challenger_psnr"] == metrics["overall"]["model_psnr"]
    expected = decision["challenger_psnr"] > decision["input_psnr"] and decision["sharp_in_min_psnr"] >= 30.0
    assert decision["promoted"] is expected

    runs = stage_runs(mlflow_uri)
    assert [r.data.tags["stage"] for r in runs] == ["ingest", "synthesize", "train", "evaluate", "register"]
    assert len({r.data.tags["pipeline_id"] for r in runs}) == 1
    train_run = runs[2]
    assert runs[3].data.tags["mlflow.parentRunId"] == train_run.info.run_id
    assert runs[3].data.metrics["test_model_psnr"] == pytest.approx(metrics["overall"]["model_psnr"])
    client = mlflow.MlflowClient(mlflow_uri)
    assert str(client.get_model_version_by_alias("deblur", "challenger").version) == "1"

    again = run([str(BIN / "dvc"), "repro"], root, env).stdout
    assert "Running stage" not in again
    assert len(stage_runs(mlflow_uri)) == 5

    # an experiment with another learning rate is a new, comparable train run
    default_lr = str(load_params(root / "params.yaml").train.lr)
    run([str(BIN / "dvc"), "exp", "run", "-S", "train.lr=0.001"], root, env)
    train_runs = [r for r in stage_runs(mlflow_uri) if r.data.tags["stage"] == "train"]
    assert [r.data.params["train.lr"] for r in train_runs] == [default_lr, "0.001"]
    assert str(client.get_model_version_by_alias("deblur", "challenger").version) == "2"


def _checkpoint_variant(base: dict, residual_scale: float, path: Path) -> Path:
    """``base`` with its last layer scaled: 0 gives the identity model, larger values a worse one."""
    state = dict(base["state_dict"])
    last_weight = [k for k in state if k.endswith("weight")][-1]
    last_bias = last_weight[: -len("weight")] + "bias"
    torch.manual_seed(0)
    state[last_weight] = torch.randn_like(state[last_weight]) * residual_scale
    state[last_bias] = torch.zeros_like(state[last_bias])
    save_atomic({**base, "state_dict": state}, path)
    return path


@pytest.fixture
def registered_world(tmp_path, mlflow_uri):
    """Tiny data plus a template checkpoint, and a function that logs+evaluates+registers a checkpoint."""
    from deblur.data.ingest import run_ingest
    from deblur.data.synthesize import run_synthesize
    from deblur.stages.evaluate import run_evaluate
    from deblur.training import Trainer

    params_file = write_params(tmp_path / "params.yaml", {**PIPELINE_OVERRIDES, "register.min_gain_over_input_db": -100.0,
                                                          "register.min_sharp_in_psnr": 0.0})
    params = load_params(params_file)
    run_synthesize(params, run_ingest(params, tmp_path / "ingested"), tmp_path / "pairs")
    base = Trainer(params, tmp_path / "pairs", tmp_path / "unused")._state(full=False)

    def register(checkpoint: Path, tag: str) -> dict:
        with tracking.stage_run("train", params) as run_id:
            uri = log_deblur_model(checkpoint, params.tiling)
        info = {"run_id": run_id, "model_uri": uri, "checkpoint": str(checkpoint), "data_hash": "x",
                "params_digest": params.digest()}
        tracking.dump_json(info, tmp_path / f"{tag}_run.json")
        run_evaluate(params_file, tmp_path / f"{tag}_run.json", tmp_path / "pairs", tmp_path / f"{tag}_metrics.json",
                     tmp_path / f"{tag}.csv", tmp_path / f"{tag}_blur.csv", tmp_path / f"{tag}_sharp_in.csv",
                     tmp_path / f"{tag}_trip")
        return run_register(params_file, tmp_path / f"{tag}_run.json", tmp_path / f"{tag}.csv",
                            tmp_path / f"{tag}_sharp_in.csv", tmp_path / "pairs", tmp_path / f"{tag}_decision.json",
                            tmp_path / "serving")

    return tmp_path, params, base, register


@pytest.mark.slow
def test_gate_promotes_better_refuses_worse_and_champion_predicts_any_size(registered_world, mlflow_uri):
    tmp_path, params, base, register = registered_world
    noisy = _checkpoint_variant(base, 0.05, tmp_path / "noisy.pt")
    identity = _checkpoint_variant(base, 0.0, tmp_path / "identity.pt")
    noisier = _checkpoint_variant(base, 0.2, tmp_path / "noisier.pt")

    first = register(noisy, "noisy")
    assert first["promoted"] and "first champion" in first["reason"]
    second = register(identity, "identity")          # identity beats noisy: promoted
    assert second["promoted"] and second["previous_champion_version"] == "1"
    assert second["challenger_psnr"] > second["previous_champion_psnr"]
    third = register(noisier, "noisier")             # worse than the identity champion: refused
    assert not third["promoted"] and "does not beat champion v2" in third["reason"]

    client = mlflow.MlflowClient(mlflow_uri)
    assert str(client.get_model_version_by_alias("deblur", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("deblur", "challenger").version) == "3"
    assert json.loads((tmp_path / "serving" / "model.json").read_text())["version"] == "2"

    # the champion (identity) through the pyfunc flavour, on a non-square odd-sized image
    champion = mlflow.pyfunc.load_model("models:/deblur@champion")
    image = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    out = champion.predict(image)
    assert out.shape == (37, 53, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).max() <= 1


def test_identity_model_scores_exactly_the_blurred_input(registered_world):
    tmp_path, params, base, _ = registered_world
    identity = model_from_checkpoint(load_checkpoint(_checkpoint_variant(base, 0.0, tmp_path / "identity.pt")))
    result = evaluate_model(identity, read_pairs(tmp_path / "pairs", "test"), params.tiling, params.evaluate,
                            params.synthesize.gamma, with_baseline=False)
    summary = result.summary()["overall"]
    assert summary["model_psnr"] == pytest.approx(summary["input_psnr"], abs=1e-6)
    assert summary["model_ssim"] == pytest.approx(summary["input_ssim"], abs=1e-6)
