"""Moving a run between MLflow stores keeps params, tags and whole metric histories."""

import mlflow

from deblur.core.files import sha256_file
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


def test_the_train_run_of_a_checkpoint_is_the_newest_finished_one_with_its_hash(tmp_path, mlflow_uri, capsys):
    """evaluate and register find their train run by the checkpoint's sha256 (reports/train_run.json holds no run id)."""
    client = mlflow.MlflowClient(mlflow_uri)
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    sha = sha256_file(checkpoint)
    default = client.get_experiment_by_name("Default").experiment_id
    other = client.create_experiment("another")          # e.g. chosen by `mlflow run --experiment-name`

    started = iter(range(1_700_000_000_000, 1_800_000_000_000, 1000))   # one second apart, in order of creation

    def run(experiment: str, status: str, **tags) -> str:
        made = client.create_run(experiment, start_time=next(started), tags=tags)
        client.set_terminated(made.info.run_id, status=status)
        return made.info.run_id

    assert tracking.find_train_run(sha) is None
    older = run(default, "FINISHED", stage="train", checkpoint_sha256=sha)
    assert tracking.find_train_run(sha) == older
    newer = run(other, "FINISHED", stage="train", checkpoint_sha256=sha)      # the same weights trained again
    run(default, "FAILED", stage="train", checkpoint_sha256=sha)              # not finished: never a parent
    run(default, "FINISHED", stage="evaluate", checkpoint_sha256=sha)         # not a train run
    run(default, "FINISHED", stage="train", checkpoint_sha256="0" * 64)       # other weights
    assert tracking.find_train_run(sha) == newer
    assert tracking.train_run_of_checkpoint(checkpoint, "evaluate") == newer
    assert "warning" not in capsys.readouterr().err

    checkpoint.write_bytes(b"other weights")            # e.g. `dvc pull` of outputs trained in another store
    assert tracking.train_run_of_checkpoint(checkpoint, "evaluate") is None
    warning = capsys.readouterr().err
    assert warning.startswith("warning: evaluate: no FINISHED train run in " + mlflow_uri)
    assert f"checkpoint_sha256={sha256_file(checkpoint)}" in warning and "without a parent" in warning
