"""End to end: real `dvc repro` of all five stages, the MLflow store and registry, the gate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import PIPELINE_OVERRIDES, ROOT, TRAIN_OVERRIDES, copy_pairs, project_copy, write_params
import torch

from deblur.tracking import runs as tracking
from deblur.core.files import sha256_file
from deblur.models.checkpoint_file import load_checkpoint, save_atomic
from deblur.core.config import load_params
from deblur.data.pairs import read_pairs
from deblur.evaluation.scoring import evaluate_model
from deblur.models.build import model_from_checkpoint
from deblur.tracking.pyfunc import log_deblur_model
from deblur.stages.register import run_register

BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture
def project(tmp_path, mlflow_uri):
    """A copy of the repo's pipeline in a fresh git + DVC repo, with tiny params."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("DEBLUR_PIPELINE_ID")
    env["PYTHONPATH"] = str(tmp_path / "src")     # the stages import this copy, the one DVC tracks
    project_copy(tmp_path, ("dvc.yaml", "MLproject", "conda.yaml", "pipelines", "src", "checkpoints/pretrained",
                            "data/photos", "data/GOPRO_Large", ".gitignore"), PIPELINE_OVERRIDES, env)
    return tmp_path, env


def stage_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("deblur")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def dvc(root: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, f"dvc {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def ran(proc: subprocess.CompletedProcess) -> set[str]:
    return {s for s in ("ingest", "synthesize", "train", "evaluate", "register") if f"Running stage '{s}'" in proc.stdout}


@pytest.mark.slow
def test_dvc_repro_then_every_follow_up_a_user_tries(project, mlflow_uri):
    root, env = project
    first = dvc(root, env, "repro")
    assert ran(first) == {"ingest", "synthesize", "train", "evaluate", "register"}
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["n_images"] == len(read_pairs(root / "data/pairs", "test"))
    assert set(metrics["per_blur_type"]) == {"motion", "gaussian", "defocus", "lens"}   # every type is tested
    assert {"model_psnr", "input_psnr", "baseline_psnr", "model_ssim"} <= set(metrics["overall"])
    decision = json.loads((root / "reports/registered_model.json").read_text())
    assert decision["version"] == "1" and decision["n_test_pairs"] == metrics["n_images"]
    assert decision["challenger_psnr"] == pytest.approx(metrics["overall"]["model_psnr"], abs=1e-3)
    assert {c["name"] for c in decision["checks"]} >= {"beats_input", "sharp_in", "blur_type:motion"}
    assert decision["promoted"] is all(c["passed"] for c in decision["checks"])

    runs = stage_runs(mlflow_uri)
    assert [r.data.tags["stage"] for r in runs] == ["ingest", "synthesize", "train", "evaluate", "register"]
    assert len({r.data.tags["pipeline_id"] for r in runs}) == 1
    train_run = runs[2]
    assert runs[3].data.tags["mlflow.parentRunId"] == train_run.info.run_id
    assert runs[3].data.metrics["test_model_psnr"] == pytest.approx(metrics["overall"]["model_psnr"])
    # the train run's own row holds the test scores beside its params (mlflow ui compare)
    assert train_run.data.metrics["test_motion_model_psnr"] == pytest.approx(metrics["per_blur_type"]["motion"]["model_psnr"])
    assert not any(k.startswith("tiling") for k in train_run.data.params)
    assert not train_run.data.tags["git_commit"].endswith("-dirty")      # dvc.lock and reports/ do not count
    client = mlflow.MlflowClient(mlflow_uri)
    version = client.get_model_version("deblur", "1")
    assert version.tags["gate"] == decision["reason"] and version.tags["train_run_id"] == train_run.info.run_id

    assert ran(dvc(root, env, "repro")) == set()                     # nothing changed: nothing runs
    assert len(stage_runs(mlflow_uri)) == 5
    run(["make", "-f", str(ROOT / "Makefile"), "dvc-remote", f"DVC_REMOTE={root.parent / 'dvc-store'}",
         f"VENV={ROOT / '.venv'}"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline"], root, env)

    # a teammate: push here, then a fresh clone pulls and has nothing to re-run
    dvc(root, env, "push")
    run(["git", "clone", "-q", str(root), str(root.parent / "clone")], root.parent, env)
    clone = root.parent / "clone"
    dvc(clone, env, "pull")
    assert (clone / "checkpoints" / "best.pt").read_bytes() == (root / "checkpoints" / "best.pt").read_bytes()
    served = sorted(p.name for p in (root / "function_app" / "model").iterdir())
    assert served and sorted(p.name for p in (clone / "function_app" / "model").iterdir()) == served
    assert "up to date" in dvc(clone, env, "status").stdout
    assert ran(dvc(clone, env, "repro")) == set()

    # a tiling change re-scores and re-registers the same trained model
    tiled = dvc(root, env, "exp", "run", "-S", "tiling.tile_size=48")
    assert ran(tiled) == {"evaluate", "register"}

    # a learning-rate sweep: two comparable experiments in dvc and in mlflow
    names = []
    for lr in ("0.001", "0.002"):
        out = dvc(root, env, "exp", "run", "-S", f"train.lr={lr}")
        assert "train" in ran(out) and "not resuming" in out.stdout + out.stderr
        names.append(re.search(r"Ran experiment\(s\): (\S+)", out.stdout).group(1))
    shown = dvc(root, env, "exp", "show", "--json").stdout
    table = {e["name"]: e for e in _experiments(json.loads(shown))}
    for name in names:
        scores = table[name]["data"]["metrics"]["reports/metrics.json"]["data"]
        assert scores["per_blur_type"]["motion"]["model_psnr"] > 0 and scores["overall"]["input_psnr"] > 0
    plots = json.loads(dvc(root, env, "plots", "diff", *names, "--json").stdout)
    assert "psnr_per_blur_type" in json.dumps(plots) and "errors" not in plots
    train_runs = {r.data.tags.get("dvc_experiment"): r for r in stage_runs(mlflow_uri) if r.data.tags["stage"] == "train"}
    assert [train_runs[n].data.params["train.lr"] for n in names] == ["0.001", "0.002"]
    assert all(n in train_runs[n].info.run_name and "test_lens_model_psnr" in train_runs[n].data.metrics for n in names)

    # an edit of code the train stage imports: train re-runs from scratch and says why
    (root / "src/deblur/training/losses.py").write_text((root / "src/deblur/training/losses.py").read_text() + "# a comment\n")
    edited = dvc(root, env, "repro")
    assert "train" in ran(edited)
    said = [line for line in edited.stdout.splitlines() if "resum" in line]
    assert said and "code changed: src/deblur/training/losses.py" in said[0], edited.stdout[:3000]

    # the same state through MLflow Projects: train trains (fresh), evaluate nests under it
    for entry in ("train", "evaluate"):
        run([str(BIN / "mlflow"), "run", ".", "-e", entry, "--env-manager", "local", "--experiment-name", "deblur"],
            root, env)
    latest = {}
    for r in stage_runs(mlflow_uri):
        latest[r.data.tags["stage"]] = r
    info = json.loads((root / "reports/train_run.json").read_text())
    assert "run_id" not in info and info["last_step"] == 6
    train_id = latest["train"].info.run_id
    assert latest["train"].data.tags["checkpoint_sha256"] == sha256_file(root / "checkpoints/best.pt")
    assert len(mlflow.MlflowClient(mlflow_uri).get_metric_history(train_id, "loss")) == 6
    assert latest["evaluate"].data.tags["mlflow.parentRunId"] == train_id

    # an architecture that does not fit train.init_from: a clear error naming the checkpoint that does
    wrong = dvc(root, env, "exp", "run", "-S", "model.name=nafnet", "-S", "model.nafnet.width=8",
                "-S", "train.init_from=checkpoints/pretrained/nafnet16.pt", check=False)
    assert wrong.returncode != 0
    assert "train.init_from checkpoints/pretrained/nafnet16.pt" in wrong.stderr
    assert "checkpoints/pretrained/nafnet8.pt fits model.nafnet" in wrong.stderr


def _experiments(shown: list) -> list[dict]:
    """Flatten ``dvc exp show --json`` into one dict per experiment (with ``name`` and ``data``)."""
    out = []
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                out.append({"name": rev.get("name") or exp.get("name"), "data": rev["data"]})
    return out


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
    from deblur.stages.evaluate import run_evaluate
    from deblur.training.trainer import Trainer

    # the gate's checks on the network alone (fast mode): thorough mode would deconvolve the motion pairs and
    # turn a noisy model's camera-shake loss into a gain (thorough mode in evaluation: tests/psf/test_kernel_aware.py)
    base_overrides = {**PIPELINE_OVERRIDES, "register.min_gain_over_input_db": -100.0, "register.min_sharp_in_psnr": 0.0,
                      "register.min_pairs_per_blur_type": 1000, "kernel_aware.default_mode": "fast"}
    params_file = write_params(tmp_path / "params.yaml", base_overrides)
    params = load_params(params_file)
    copy_pairs(params, tmp_path / "pairs")
    base = Trainer(params, tmp_path / "pairs", tmp_path / "unused")._state(full=False)

    def register(checkpoint: Path, tag: str, **overrides) -> dict:
        nonlocal params_file
        if overrides:
            params_file = write_params(tmp_path / f"{tag}_params.yaml", {**base_overrides, **overrides})
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
    assert not third["promoted"] and "[failed: beats_champion]" in third["reason"] and "champion v2" in third["reason"]
    assert third["previous_champion_psnr"] > third["challenger_psnr"]

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


@pytest.mark.slow
def test_first_champion_must_not_be_worse_than_its_init_from_nor_the_input_on_a_blur_type(registered_world):
    tmp_path, params, base, register = registered_world
    identity = _checkpoint_variant(base, 0.0, tmp_path / "identity.pt")
    noisy = _checkpoint_variant(base, 0.05, tmp_path / "noisy.pt")
    refused = register(noisy, "below_init", **{"train.init_from": str(identity)})
    assert not refused["promoted"] and "beats_init_from" in refused["reason"]
    assert refused["init_from_psnr"] > refused["challenger_psnr"]
    assert (tmp_path / "serving" / "NO_CHAMPION.txt").is_file()
    per_type = register(noisy, "per_type", **{"register.min_pairs_per_blur_type": 3})
    failed = {c["name"] for c in per_type["checks"] if not c["passed"]}
    assert not per_type["promoted"] and "blur_type:motion" in failed and "beats_input" not in failed


@pytest.mark.slow
def test_shipped_checkpoint_registers_through_the_gate_once(registered_world, mlflow_uri):
    from deblur.cli.import_pretrained import register_checkpoint

    tmp_path, params, base, _ = registered_world
    shipped = _checkpoint_variant(base, 0.0, tmp_path / "shipped.pt")
    with tracking.stage_run("train", params) as run_id:
        pass
    record = register_checkpoint(shipped, run_id, tmp_path / "params.yaml", tmp_path / "pairs", tmp_path / "rep",
                                 tmp_path / "serving")
    assert record["promoted"] and "beats_init_from" not in {c["name"] for c in record["checks"]}
    version = mlflow.MlflowClient(mlflow_uri).get_model_version("deblur", record["version"])
    assert version.tags["origin"] == "shipped checkpoint shipped.pt" and len(version.tags["checkpoint_sha256"]) == 64
    assert register_checkpoint(shipped, run_id, tmp_path / "params.yaml", tmp_path / "pairs", tmp_path / "rep",
                               tmp_path / "serving") is None
    assert json.loads((tmp_path / "serving" / "model.json").read_text())["version"] == record["version"]


def test_identity_model_scores_exactly_the_blurred_input(registered_world):
    tmp_path, params, base, _ = registered_world
    identity = model_from_checkpoint(load_checkpoint(_checkpoint_variant(base, 0.0, tmp_path / "identity.pt")))
    result = evaluate_model(identity, read_pairs(tmp_path / "pairs", "test"), params.tiling, params.evaluate,
                            params.synthesize.gamma, with_baseline=False)
    summary = result.summary()["overall"]
    assert summary["model_psnr"] == pytest.approx(summary["input_psnr"], abs=1e-6)
    assert summary["model_ssim"] == pytest.approx(summary["input_ssim"], abs=1e-6)
