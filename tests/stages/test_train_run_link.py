"""evaluate and register find their train run in MLflow by the sha256 of checkpoints/best.pt.

reports/train_run.json is a DVC output, so it holds no MLflow run id (a new one on every run would
make a fresh `make demo` write another dvc.lock than the committed one): the train run is tagged
``checkpoint_sha256`` instead, and a store without such a run (a teammate's `dvc pull` with their
own tracking store) logs evaluate and register without a parent, with a warning.
"""

from __future__ import annotations

import json

import mlflow

from conftest import PIPELINE_OVERRIDES, copy_pairs, write_params
from deblur.core.config import load_params
from deblur.core.files import sha256_file
from deblur.stages.evaluate import run_evaluate
from deblur.stages.register import run_register
from deblur.stages.train import run_train

# fast mode, and a gate any model passes: the point here is the links, not the scores
OVERRIDES = {**PIPELINE_OVERRIDES, "kernel_aware.default_mode": "fast", "register.min_gain_over_input_db": -100.0,
             "register.min_sharp_in_psnr": 0.0, "register.min_pairs_per_blur_type": 1000}


def evaluate_and_register(root, params_file, pairs, serving_dir) -> dict:
    reports = root / "reports"
    run_evaluate(params_file, reports / "train_run.json", pairs, reports / "metrics.json", reports / "per_image.csv",
                 reports / "per_blur.csv", reports / "sharp_in.csv", reports / "triptychs")
    return run_register(params_file, reports / "train_run.json", reports / "per_image.csv", reports / "sharp_in.csv",
                        pairs, reports / "registered_model.json", serving_dir)


def stage_run(client, stage: str):
    experiment = client.get_experiment_by_name("deblur")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.stage = '{stage}'",
                              order_by=["attributes.start_time DESC"])
    return runs[0]


def test_evaluate_and_register_nest_under_the_train_run_of_the_checkpoint_or_warn(tmp_path, mlflow_uri, capsys,
                                                                                  monkeypatch):
    params_file = write_params(tmp_path / "params.yaml", OVERRIDES)
    pairs = copy_pairs(load_params(params_file), tmp_path / "pairs")
    reports = tmp_path / "reports"
    info = run_train(params_file, pairs, tmp_path / "checkpoints", reports / "train_curve.csv",
                     reports / "train_run.json")
    written = json.loads((reports / "train_run.json").read_text())
    assert "run_id" not in written and written["checkpoint"] == str(tmp_path / "checkpoints" / "best.pt")
    client = mlflow.MlflowClient(mlflow_uri)
    train = client.get_run(info["run_id"])
    assert train.data.tags["checkpoint_sha256"] == sha256_file(tmp_path / "checkpoints" / "best.pt")

    record = evaluate_and_register(tmp_path, params_file, pairs, tmp_path / "model")
    assert "warning" not in capsys.readouterr().err
    evaluate, register = stage_run(client, "evaluate"), stage_run(client, "register")
    for run in (evaluate, register):
        assert run.data.tags["mlflow.parentRunId"] == info["run_id"] and run.data.tags["train_run_id"] == info["run_id"]
    # test scores copied onto the train run's row (mlflow ui: params beside test scores)
    assert client.get_run(info["run_id"]).data.metrics["test_model_psnr"] == evaluate.data.metrics["test_model_psnr"]
    assert record["promoted"]
    version = client.get_model_version("deblur", record["version"])
    assert version.tags["train_run_id"] == info["run_id"]
    assert "run_id" not in json.loads((tmp_path / "model" / "model.json").read_text())
    assert json.loads((tmp_path / "model" / "runtime.json").read_text())["run_id"] == info["run_id"]

    # the same outputs against another store (a `dvc pull` into a clone with its own mlflow.db): no train run
    # there has this checkpoint, so the runs have no parent and say why; nothing fails
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    record = evaluate_and_register(tmp_path, params_file, pairs, tmp_path / "model_other")
    err = capsys.readouterr().err
    sha = sha256_file(tmp_path / "checkpoints" / "best.pt")
    for stage in ("evaluate", "register"):
        assert f"warning: {stage}: no FINISHED train run in {other} is tagged checkpoint_sha256={sha}" in err
    other_client = mlflow.MlflowClient(other)
    for stage in ("evaluate", "register"):
        tags = stage_run(other_client, stage).data.tags
        assert "mlflow.parentRunId" not in tags and "train_run_id" not in tags
    assert record["promoted"] and "train_run_id" not in other_client.get_model_version("deblur", record["version"]).tags
    assert json.loads((tmp_path / "model_other" / "runtime.json").read_text())["run_id"] is None
    assert (tmp_path / "model_other" / "model.json").read_bytes() == (tmp_path / "model" / "model.json").read_bytes()
