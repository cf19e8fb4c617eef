"""The training stage on a tiny real dataset: checkpoints, MLflow run, resume, NaN guard, DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import ROOT, TRAIN_OVERRIDES, params_with, write_params
from deblur.tracking import runs as tracking
from deblur.core.files import sha256_file
from deblur.models.checkpoint_file import load_checkpoint, save_atomic
from deblur.core.config import load_params
from deblur.data.ingest import run_ingest
from deblur.data.synthesize import run_synthesize
from deblur.stages.train import run_train
from deblur.training.resume import resume_key, resume_mismatch, train_data_hash
from deblur.training.trainer import Trainer, TrainingError

def losses(history):
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_train_stage_writes_checkpoints_curve_and_mlflow_run(tmp_path, pairs_dir, mlflow_uri):
    params_file = write_params(tmp_path / "params.yaml", TRAIN_OVERRIDES)
    info = run_train(params_file, pairs_dir, tmp_path / "ck", tmp_path / "curve.csv", tmp_path / "run.json")

    assert (tmp_path / "ck" / "best.pt").is_file() and (tmp_path / "ck" / "last.pt").is_file()
    assert load_checkpoint(tmp_path / "ck" / "last.pt", trusted=True)["step"] == 6
    written = json.loads((tmp_path / "run.json").read_text())
    assert "run_id" not in written and written["checkpoint"] == str(tmp_path / "ck" / "best.pt")   # a DVC output
    rows = (tmp_path / "curve.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,grad_norm" and len(rows) == 1 + 6    # no CPU time: the same bytes every run

    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(info["run_id"])
    assert run.data.tags["checkpoint_sha256"] == sha256_file(tmp_path / "ck" / "best.pt")   # how evaluate finds it
    cpu_hours = [m.value for m in client.get_metric_history(info["run_id"], "cpu_hours")]
    assert len(cpu_hours) == 6 and 0 < cpu_hours[0] <= cpu_hours[-1] < 1   # process CPU time, growing step by step
    assert run.data.params["train.lr"] == str(params_with().train.lr)
    assert run.data.params["model.name"] == "stacked_conv"
    for tag in ("git_commit", "data_hash", "device", "torch_version", "params_digest", "pipeline_id"):
        assert run.data.tags[tag]
    assert run.data.tags["stage"] == "train"
    loss_history = client.get_metric_history(info["run_id"], "loss")
    assert [m.step for m in loss_history] == [1, 2, 3, 4, 5, 6]
    components = [f"loss_{name}" for name in params_with().loss.weights()]
    assert components
    for name in (*components, "lr", "grad_norm", "patches_per_s", "val_psnr", "val_ssim", "val_input_psnr"):
        assert name in run.data.metrics, name
    assert run.data.metrics["best_val_psnr"] == pytest.approx(info["best_val_psnr"])
    artifacts = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"checkpoints", "plots", "val"} <= artifacts
    assert {a.path for a in client.list_artifacts(info["run_id"], "val")} >= {"val/step_000003_0.png"}
    assert run.data.tags["data_hash"] == info["data_hash"] == train_data_hash(pairs_dir)
    assert run.info.run_name == f"train-stacked_conv-{params_with().digest()}"


def test_same_params_same_metrics_and_resume_continues_identically(tmp_path, pairs_dir, mlflow_uri):
    params = params_with()
    full = Trainer(params, pairs_dir, tmp_path / "full")
    with tracking.stage_run("train", params):
        full_result = full.fit()
    again = Trainer(params, pairs_dir, tmp_path / "again")
    with tracking.stage_run("train", params):
        again_result = again.fit()
    assert losses(again_result.history) == losses(full_result.history)
    assert again_result.best_psnr == full_result.best_psnr

    # interrupted after step 3's checkpoint: a new trainer resumes there and continues identically
    interrupted = Trainer(params, pairs_dir, tmp_path / "interrupted")
    with tracking.stage_run("train", params):
        for blurred, sharp in interrupted._loader():
            interrupted.train_step(blurred, sharp)
            interrupted.scheduler.step()
            interrupted.step += 1
            if interrupted.step == 3:
                interrupted.save(best=True)
                break
        resumed = Trainer(params, pairs_dir, tmp_path / "interrupted")
        assert resumed.resumed and resumed.step == 3
        resumed_result = resumed.fit()
    expected = losses(full_result.history)
    got = losses(resumed_result.history)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7)


def _interrupt_at(trainer: Trainer, step: int) -> None:
    """Train ``trainer`` to ``step`` and save as an interrupted run would (last.pt, best.pt)."""
    for blurred, sharp in trainer._loader():
        trainer.train_step(blurred, sharp)
        trainer.scheduler.step()
        trainer.step += 1
        if trainer.step == step:
            trainer.save(best=True)
            return


def test_resume_refuses_checkpoint_of_other_params_and_says_which(tmp_path, pairs_dir, mlflow_uri, capsys):
    with tracking.stage_run("train", params_with()):
        _interrupt_at(Trainer(params_with(), pairs_dir, tmp_path / "ck"), 3)
        other = Trainer(params_with(**{"train.lr": 0.001}), pairs_dir, tmp_path / "ck")
    assert not other.resumed and other.step == 0
    assert "not resuming" in capsys.readouterr().out and "params changed: train.lr" in \
        resume_mismatch(load_checkpoint(tmp_path / "ck" / "last.pt", trusted=True)["resume_key"], other.resume_key)[0]


def test_finished_run_is_not_resumed_but_interrupted_one_restores_best(tmp_path, pairs_dir, mlflow_uri, capsys):
    params = params_with()
    with tracking.stage_run("train", params):
        Trainer(params, pairs_dir, tmp_path / "done").fit()
        assert load_checkpoint(tmp_path / "done" / "last.pt", trusted=True)["finished"] is True
        (tmp_path / "done" / "best.pt").unlink()          # what DVC does before re-running train
        again = Trainer(params, pairs_dir, tmp_path / "done")
        assert not again.resumed and again.step == 0
        assert "it is a finished run (step 6)" in capsys.readouterr().out
        result = again.fit()
        assert result.last_step == 6 and (tmp_path / "done" / "best.pt").is_file()

        interrupted = Trainer(params, pairs_dir, tmp_path / "cut")
        _interrupt_at(interrupted, 3)
        best = load_checkpoint(tmp_path / "cut" / "best.pt")
        (tmp_path / "cut" / "best.pt").unlink()
        resumed = Trainer(params, pairs_dir, tmp_path / "cut")
        assert resumed.resumed and resumed.step == 3
        restored = load_checkpoint(tmp_path / "cut" / "best.pt")
        assert restored["step"] == best["step"] == 3
        assert all(torch.equal(restored["state_dict"][k], v) for k, v in best["state_dict"].items())


def test_resume_key_names_changed_data_and_code(tmp_path, pairs_dir):
    key = resume_key(params_with(), pairs_dir)
    assert "src/deblur/training/losses.py" in key["code"] and "src/deblur/training/trainer.py" in key["code"]
    assert "src/deblur/artifact/torch_model.py" not in key["code"]       # serving code does not change a training run
    edited = {**key, "code": {**key["code"], "src/deblur/training/losses.py": "0" * 12}, "data": "other"}
    assert resume_mismatch(edited, key) == ["the training data changed", "code changed: src/deblur/training/losses.py"]
    neutral = resume_key(params_with(**{"train.num_workers": 1, "train.log_every": 5}), pairs_dir)
    assert resume_mismatch(key, neutral) == []


def test_cpu_time_adds_up_across_resumed_processes(tmp_path, pairs_dir, mlflow_uri):
    with tracking.stage_run("train", params_with()):
        _interrupt_at(Trainer(params_with(), pairs_dir, tmp_path / "ck"), 3)
    saved = load_checkpoint(tmp_path / "ck" / "last.pt", trusted=True)["cpu_seconds"]
    assert saved > 0
    resumed = Trainer(params_with(), pairs_dir, tmp_path / "ck")
    assert resumed.resumed and resumed.cpu_seconds_before == saved
    assert resumed.cpu_seconds() > saved


def test_a_run_saved_before_a_param_existed_resumes_if_the_param_keeps_the_old_behaviour(pairs_dir):
    """A resume key without model.nafnet.padding / train.deterministic reads as reflect / False."""
    old = resume_key(params_with(**{"model.name": "nafnet", "model.nafnet.padding": "reflect"}), pairs_dir)
    del old["params"]["model"]["nafnet"]["padding"]
    del old["params"]["train"]["deterministic"]
    assert resume_mismatch(old, resume_key(params_with(**{"model.name": "nafnet", "train.deterministic": False}),
                                           pairs_dir)) == []
    now = resume_key(params_with(**{"model.name": "nafnet", "model.nafnet.padding": "zeros",
                                    "train.deterministic": True}), pairs_dir)
    assert resume_mismatch(old, now) == ["params changed: model.nafnet.padding, train.deterministic"]


def test_sections_of_unselected_architectures_and_new_sections_do_not_block_a_resume(pairs_dir):
    """A key saved before model.diffusion_refiner / model.controlnet_sd / synthesize.noise existed still resumes
    a NAFNet run; a change in the selected architecture's own section still refuses it."""
    old = resume_key(params_with(**{"model.name": "nafnet"}), pairs_dir)
    for section in ("diffusion_refiner", "controlnet_sd"):
        del old["params"]["model"][section]
    del old["params"]["synthesize"]["noise"]
    nafnet = {"model.name": "nafnet"}
    assert resume_mismatch(old, resume_key(params_with(**nafnet, **{"model.unet.levels": 3}), pairs_dir)) == []
    assert resume_mismatch(old, resume_key(params_with(**nafnet, **{"model.nafnet.width": 8}), pairs_dir)) == [
        "params changed: model.nafnet.width"]


def test_resume_from_continues_across_a_code_change_but_not_other_params(tmp_path, pairs_dir, mlflow_uri):
    params = params_with()
    with tracking.stage_run("train", params):
        _interrupt_at(Trainer(params, pairs_dir, tmp_path / "old"), 3)
        ckpt = load_checkpoint(tmp_path / "old" / "last.pt", trusted=True)
        ckpt["resume_key"]["code"]["src/deblur/training/losses.py"] = "0" * 12
        save_atomic(ckpt, tmp_path / "old" / "last.pt")
        assert not Trainer(params, pairs_dir, tmp_path / "old").resumed
        forced = Trainer(params, pairs_dir, tmp_path / "new", resume_from=tmp_path / "old" / "last.pt")
        assert forced.resumed and forced.step == 3
        with pytest.raises(TrainingError, match="params changed: train.lr"):
            Trainer(params_with(**{"train.lr": 0.001}), pairs_dir, tmp_path / "x",
                    resume_from=tmp_path / "old" / "last.pt")


def test_init_from_of_another_architecture_names_the_checkpoint_that_fits(tmp_path, pairs_dir):
    wide = params_with(**{"model.stacked_conv": {"channels": 8, "depth": 3}})
    save_atomic(Trainer(wide, pairs_dir, tmp_path / "a")._state(full=False), tmp_path / "shipped" / "c8.pt")
    narrow = {"model.stacked_conv": {"channels": 4, "depth": 3}}
    save_atomic(Trainer(params_with(**narrow), pairs_dir, tmp_path / "b")._state(full=False),
                tmp_path / "shipped" / "c4.pt")
    with pytest.raises(TrainingError) as err:
        Trainer(params_with(**narrow, **{"train.init_from": str(tmp_path / "shipped" / "c8.pt")}), pairs_dir,
                tmp_path / "ck")
    message = str(err.value)
    assert "train.init_from" in message and "c4.pt fits model.stacked_conv" in message
    assert "train.init_from: null" in message


def test_empty_val_split_is_an_error_naming_the_fraction(tmp_path, pairs_dir):
    shutil.copytree(pairs_dir, tmp_path / "pairs")
    (tmp_path / "pairs" / "val" / "blur_types.json").write_text("")
    with pytest.raises(TrainingError, match="val split is empty.*val_fraction"):
        Trainer(params_with(), tmp_path / "pairs", tmp_path / "ck")


def test_non_finite_loss_stops_and_writes_no_checkpoint(tmp_path, pairs_dir, mlflow_uri):
    good = Trainer(params_with(), pairs_dir, tmp_path / "src")
    state = good._state(full=False)
    state["state_dict"] = {k: torch.full_like(v, float("nan")) for k, v in state["state_dict"].items()}
    save_atomic(state, tmp_path / "nan.pt")

    trainer = Trainer(params_with(**{"train.init_from": str(tmp_path / "nan.pt")}), pairs_dir, tmp_path / "ck")
    with tracking.stage_run("train", trainer.params), pytest.raises(TrainingError, match="loss is not finite"):
        trainer.fit()
    assert not (tmp_path / "ck" / "best.pt").exists() and not (tmp_path / "ck" / "last.pt").exists()

    skipping = Trainer(params_with(**{"train.init_from": str(tmp_path / "nan.pt"), "train.on_nonfinite": "skip"}),
                       pairs_dir, tmp_path / "ck2")
    with tracking.stage_run("train", skipping.params), pytest.raises(TrainingError, match="refusing to write a broken checkpoint"):
        skipping.fit()
    assert skipping.skipped_steps == 3
    assert not (tmp_path / "ck2" / "last.pt").exists()


def test_init_from_checks_architecture(tmp_path, pairs_dir, mlflow_uri):
    unet = params_with(**{"model.name": "unet", "model.unet": {"base_channels": 8, "levels": 2,
                                                               "bottleneck_channels": 16, "groups": 8}})
    save_atomic(Trainer(unet, pairs_dir, tmp_path / "u")._state(full=False), tmp_path / "unet.pt")
    with pytest.raises(TrainingError, match="holds a 'unet' model, but model.name is 'stacked_conv'"):
        Trainer(params_with(**{"train.init_from": str(tmp_path / "unet.pt")}), pairs_dir, tmp_path / "ck")


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, pairs_dir, mlflow_uri):
    params_file = write_params(tmp_path / "params.yaml", TRAIN_OVERRIDES)
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "pipelines" / "train.py"),
           "--params", str(params_file), "--pairs", str(pairs_dir), "--checkpoints", str(tmp_path / "ck"),
           "--curve", str(tmp_path / "curve.csv"), "--run-info", str(tmp_path / "run.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "run.json").read_text())
    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("deblur")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'train'")
    assert "run_id" not in info   # a DVC output: the run is found by its checkpoint's hash
    assert len(runs) == 1 and runs[0].data.tags["checkpoint_sha256"] == sha256_file(tmp_path / "ck" / "best.pt")   # only rank 0 logged
    assert runs[0].data.tags["world_size"] == "2"
    assert load_checkpoint(tmp_path / "ck" / "last.pt", trusted=True)["step"] == 6


def test_sigterm_saves_last_checkpoint_and_the_same_command_resumes(tmp_path, pairs_dir, mlflow_uri):
    """What a scheduler's time limit (or `timeout`) does: stop cleanly, then pick up where it stopped."""
    import signal
    import time

    params_file = write_params(tmp_path / "params.yaml", {**TRAIN_OVERRIDES, "train.max_steps": 40,
                                                          "train.val_every": 2})
    cmd = [sys.executable, str(ROOT / "pipelines" / "train.py"), "--params", str(params_file), "--pairs",
           str(pairs_dir), "--checkpoints", str(tmp_path / "ck"), "--curve", str(tmp_path / "curve.csv"),
           "--run-info", str(tmp_path / "run.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "ck" / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-2000:]
    assert "error: stopped by SIGTERM at step" in stderr and "run the same command to resume" in stderr
    stopped_at = load_checkpoint(tmp_path / "ck" / "last.pt", trusted=True)["step"]
    assert 2 <= stopped_at < 40 and f"at step {stopped_at} of 40" in stderr
    assert not (tmp_path / "run.json").exists()
    client = mlflow.MlflowClient(mlflow_uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("deblur").experiment_id])
    assert killed.info.status == "KILLED" and killed.data.tags["interrupted_at_step"] == str(stopped_at)

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tmp_path / 'ck' / 'last.pt'} at step {stopped_at}" in resumed.stdout
    assert load_checkpoint(tmp_path / "ck" / "last.pt", trusted=True)["step"] == 40
    run_id = tracking.find_train_run(sha256_file(tmp_path / "ck" / "best.pt"))   # run.json holds no run id
    assert client.get_run(run_id).data.tags["resumed"] == "True"


def test_two_runs_of_the_same_inputs_write_the_same_bytes_dvc_records(tmp_path, pairs_dir, mlflow_uri):
    """best.pt, the curves and train_run.json are DVC outputs: the same inputs must give the same bytes, or a
    fresh `make demo` writes another dvc.lock than the committed one (no run id, no CPU time, and no random
    temporary file name inside best.pt's zip archive)."""
    params_file = write_params(tmp_path / "params.yaml", TRAIN_OVERRIDES)
    outs = {}
    for name in ("a", "b"):
        root = tmp_path / name
        outs[name] = run_train(params_file, pairs_dir, root / "ck", root / "curve.csv", root / "run.json")
    a, b = tmp_path / "a", tmp_path / "b"
    assert outs["a"]["run_id"] != outs["b"]["run_id"]
    for rel in ("ck/best.pt", "curve.csv", "val_curve.csv"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    info_a, info_b = (json.loads((root / "run.json").read_text()) for root in (a, b))
    assert {**info_a, "checkpoint": None} == {**info_b, "checkpoint": None}
    client = mlflow.MlflowClient(mlflow_uri)
    # the same weights, so the same tag: evaluate nests under the newest of the two
    assert client.get_run(outs["b"]["run_id"]).data.tags["checkpoint_sha256"] == sha256_file(a / "ck" / "best.pt")
    assert tracking.find_train_run(sha256_file(a / "ck" / "best.pt")) == outs["b"]["run_id"]
