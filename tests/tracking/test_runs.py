"""Moving a run between MLflow stores keeps params, tags and whole metric histories."""

import mlflow

from deblur.tracking import runs as tracking
from deblur.core.config import load_params
from conftest import ROOT


def test_export_then_import_round_trip_is_idempotent(tmp_path, monkeypatch):
    source = f"sqlite:///{tmp_path / 'source.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", source)
    params = load_params(ROOT / "params.yaml")
    with tracking.stage_run("train", params, sections=("train",)) as run_id:
        for step in range(1, 6):
            tracking.log_metrics({"loss": 1.0 / step, "val_psnr": 20.0 + step}, step=step)
    tracking.export_run(run_id, tmp_path / "run.json")

    target = f"sqlite:///{tmp_path / 'target.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", target)
    (tmp_path / "ckpt.pt").write_bytes(b"weights")
    new_id = tracking.import_run(tmp_path / "run.json", "imported", [tmp_path / "ckpt.pt"])
    assert tracking.import_run(tmp_path / "run.json", "imported") == new_id

    client = mlflow.MlflowClient(target)
    run = client.get_run(new_id)
    assert run.data.params["train.lr"] == str(params.train.lr)
    assert run.data.tags["stage"] == "train" and run.data.tags["imported_from"] == run_id
    assert [(m.step, m.value) for m in client.get_metric_history(new_id, "val_psnr")] == [(s, 20.0 + s) for s in range(1, 6)]
    assert [a.path for a in client.list_artifacts(new_id)] == ["ckpt.pt"]
    assert len(client.search_runs([run.info.experiment_id])) == 1
