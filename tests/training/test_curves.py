"""The training curves: loss per logged step and validation per validation, in two CSVs with no empty cells."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import ROOT, TRAIN_OVERRIDES, write_params
from deblur.core.files import sha256_file
from deblur.tracking import runs as tracking
from deblur.training.curves import TRAIN_FIELDS, VAL_FIELDS, write_curve, write_val_curve


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _history(steps: int = 7, val_every: int = 3) -> list[dict]:
    """What the Trainer records: a logged entry every step, a validation entry every ``val_every`` steps."""
    history = []
    for step in range(1, steps + 1):
        history.append({"step": step, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": 0.5, "cpu_hours": step / 1e4})
        if step % val_every == 0:
            history.append({"step": step, "val_psnr": 20.0 + step, "val_ssim": 0.5, "val_input_psnr": 19.0,
                            "cpu_hours": step / 1e4})
    return history


def test_validations_get_their_own_csv_with_every_cell_filled(tmp_path):
    write_curve(_history(), tmp_path / "train_curve.csv")
    write_val_curve(_history(), tmp_path / "val_curve.csv")

    train = _rows(tmp_path / "train_curve.csv")
    assert list(train[0]) == list(TRAIN_FIELDS) and [int(r["step"]) for r in train] == list(range(1, 8))
    val = _rows(tmp_path / "val_curve.csv")
    assert list(val[0]) == list(VAL_FIELDS)
    assert [int(r["step"]) for r in val] == [3, 6]                      # one row per validation
    assert [float(r["val_psnr"]) for r in val] == [23.0, 26.0]
    assert all(value != "" for rows in (train, val) for row in rows for value in row.values())
    # CPU time differs on every run: out of the DVC outputs (a fresh run must write the committed dvc.lock)
    assert "cpu_hours" not in train[0] and "cpu_hours" not in val[0]


def test_a_run_without_validation_yet_writes_a_header_only_val_curve(tmp_path):
    write_val_curve(_history(steps=2), tmp_path / "val_curve.csv")
    assert (tmp_path / "val_curve.csv").read_text().splitlines() == [",".join(VAL_FIELDS)]


def _train_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "pipelines" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_stage_writes_one_val_curve_row_per_validation(tmp_path, pairs_dir, mlflow_uri):
    params_file = write_params(tmp_path / "params.yaml", TRAIN_OVERRIDES)   # 6 steps, validation every 3
    args = ["--params", str(params_file), "--pairs", str(pairs_dir), "--checkpoints", str(tmp_path / "ck"),
            "--curve", str(tmp_path / "reports" / "train_curve.csv"),
            "--val-curve", str(tmp_path / "reports" / "val_curve.csv"), "--run-info", str(tmp_path / "run.json")]
    assert _train_script().main(args) == 0

    val = _rows(tmp_path / "reports" / "val_curve.csv")
    assert [int(r["step"]) for r in val] == [3, 6]
    assert all(value != "" for row in val for value in row.values())
    assert "run_id" not in json.loads((tmp_path / "run.json").read_text())   # a DVC output: the same on every run
    run_id = tracking.find_train_run(sha256_file(tmp_path / "ck" / "best.pt"))   # the run, by its checkpoint
    logged = mlflow.MlflowClient(mlflow_uri).get_metric_history(run_id, "val_psnr")
    assert [float(r["val_psnr"]) for r in val] == pytest.approx([m.value for m in logged])
    assert all(float(r["val_psnr"]) > 0 and float(r["val_input_psnr"]) > 0 for r in val)
    train = _rows(tmp_path / "reports" / "train_curve.csv")
    assert [int(r["step"]) for r in train] == [1, 2, 3, 4, 5, 6] and "val_psnr" not in train[0]


@pytest.mark.slow
def test_dvc_draws_the_validation_plot_from_validations_only(tmp_path):
    """``dvc plots show`` with the project's plot definitions: no validation point at 0 dB (an empty cell)."""
    dvc = Path(sys.executable).parent / "dvc"
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    write_curve(_history(), tmp_path / "reports" / "train_curve.csv")
    write_val_curve(_history(), tmp_path / "reports" / "val_curve.csv")
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    shown = subprocess.run([str(dvc), "plots", "show", "--json"], cwd=tmp_path, check=True, capture_output=True,
                           text=True).stdout
    drawn = {name: [p for entry in entries for p in entry["content"]["data"]["values"]]
             for name, entries in json.loads(shown)["data"].items()}
    psnr = drawn["validation_psnr"]   # one point per validation and line (model, blurred input)
    assert sorted((p["field"], p["step"]) for p in psnr) == [("val_input_psnr", "3"), ("val_input_psnr", "6"),
                                                             ("val_psnr", "3"), ("val_psnr", "6")]
    assert sorted(float(p["dvc_inferred_y_value"]) for p in psnr if p["field"] == "val_psnr") == [23.0, 26.0]
    assert all(float(p["dvc_inferred_y_value"]) == 19.0 for p in psnr if p["field"] == "val_input_psnr")
    loss = drawn["training_loss"]
    assert [p["step"] for p in loss] == [str(s) for s in range(1, 8)] and all(float(p["loss"]) > 0 for p in loss)
