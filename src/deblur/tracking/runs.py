"""The one module that talks to MLflow.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` in the working
directory (artifacts then go to ``./mlruns``). Every stage opens its run through
``stage_run`` so runs carry the same tags: ``stage``, ``pipeline_id`` (shared by the runs of
one ``dvc repro``), ``git_commit``, ``params_digest``.

A train run is tagged ``checkpoint_sha256`` (the sha256 of the ``best.pt`` it wrote);
evaluate and register find their train run by that tag (``train_run_of_checkpoint``), so no
run id has to be written into a DVC output (``reports/train_run.json`` stays the same bytes on
every fresh run of the same inputs).

mlflow (and pandas, which it needs) is imported on first use, inside the functions below: it takes
2-4 s, and stages that only need a helper of this module (``files_digest``, ``dump_json``) stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from deblur.core.config import Params
from deblur.core.files import atomic_write_text, sha256_file, update_from_file
from deblur.core.stage_spec import DEFAULT_MODEL_DIR, logged_param

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _mlflow():
    import mlflow   # lazy: on first use (module docstring)

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


# Written by the pipeline itself: a change there does not make the code differ from the commit.
PIPELINE_OUTPUTS = ("dvc.lock", "reports", DEFAULT_MODEL_DIR.as_posix())


def git_commit() -> str:
    """HEAD, with ``-dirty`` when tracked files other than pipeline outputs differ from it."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        excluded = [f":(exclude){path}" for path in PIPELINE_OUTPUTS]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
                               capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pipeline_id(params_path: str | Path = "params.yaml") -> str:
    """Id shared by the stage runs of one pipeline version.

    ``DEBLUR_PIPELINE_ID`` wins (``make demo`` sets one per invocation); otherwise the git
    commit plus a hash of the params file, which every stage of one ``dvc repro`` shares.
    """
    if os.environ.get("DEBLUR_PIPELINE_ID"):
        return os.environ["DEBLUR_PIPELINE_ID"]
    try:
        text = Path(params_path).read_bytes()
    except OSError:
        text = b""
    return f"{git_commit()[:8]}-{hashlib.sha256(text).hexdigest()[:8]}"


def files_digest(paths: list[Path] | Path) -> str:
    """sha256 over the bytes of files (a folder: all files below it, in sorted order)."""
    if isinstance(paths, Path):
        paths = sorted(p for p in paths.rglob("*") if p.is_file()) if paths.is_dir() else [paths]
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        update_from_file(h, p)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: tuple[str, ...] = (), tags: dict | None = None,
              run_name: str | None = None, parent_run_id: str | None = None) -> Iterator[str]:
    """Open an MLflow run for one pipeline stage; yields the run id.

    ``sections``: the params.yaml sections or dotted keys to log as params (``deblur.core.stage_spec``).
    """

    mlflow = _mlflow()
    launched_by_mlflow_run = bool(os.environ.get("MLFLOW_RUN_ID"))  # `mlflow run` made the run (and chose its experiment)
    if not launched_by_mlflow_run:
        mlflow.set_experiment(params.tracking.experiment)
    flat = params.flat()
    logged = {k: v for k, v in flat.items() if logged_param(k, ("seed", *sections))}
    all_tags = {
        "stage": stage,
        "pipeline_id": pipeline_id(),
        "git_commit": git_commit(),
        "params_digest": params.digest(),
        **{k: str(v) for k, v in (tags or {}).items()},   # a tracking server (REST) takes string tags only
    }
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=run_name or stage, tags=all_tags) as run:
        # MLflow caps one log_params batch at 100 entries
        items = list(logged.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i:i + 100]))
        yield run.info.run_id


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    _mlflow().log_metrics(clean, step=step)


def log_metrics_to_run(run_id: str, metrics: dict[str, float]) -> None:
    """Log metrics to another (finished) run, e.g. test scores onto the train run they belong to."""
    from mlflow.entities import Metric   # lazy: mlflow

    now = int(time.time() * 1000)
    batch = [Metric(k.replace("@", "_at_"), float(v), now, 0) for k, v in metrics.items()
             if v is not None and np.isfinite(v)]
    client = _mlflow().MlflowClient()
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])


# Tag of a train run: the sha256 of the best.pt it wrote (also a model version tag of imported checkpoints).
CHECKPOINT_TAG = "checkpoint_sha256"


def find_train_run(checkpoint_sha256: str) -> str | None:
    """The newest FINISHED run tagged ``stage=train`` and ``checkpoint_sha256`` in any active experiment of
    this store (``mlflow run --experiment-name`` may have chosen another than params.yaml's); None when none is."""
    mlflow = _mlflow()
    from mlflow.entities import ViewType   # lazy: mlflow

    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiments:
        return None
    found = client.search_runs(experiments, filter_string=f"tags.stage = 'train' and tags.{CHECKPOINT_TAG} = "
                                                          f"'{checkpoint_sha256}' and attributes.status = 'FINISHED'",
                               run_view_type=ViewType.ACTIVE_ONLY, order_by=["attributes.start_time DESC"],
                               max_results=1)
    return found[0].info.run_id if found else None


def train_run_of_checkpoint(checkpoint: str | Path, stage: str) -> str | None:
    """The train run that wrote ``checkpoint`` (``find_train_run`` of its sha256), for ``stage`` to nest under.

    None, with one warning line on stderr naming the hash and the tracking URI, when this store has no
    such run (a ``dvc pull`` of another store's outputs, a deleted run): the stage then logs without a
    parent and without a ``train_run_id`` tag rather than failing or linking to a wrong run."""
    sha = sha256_file(checkpoint)
    run_id = find_train_run(sha)
    if run_id is None:
        print(f"warning: {stage}: no FINISHED train run in {tracking_uri()} is tagged {CHECKPOINT_TAG}={sha} "
              f"(the sha256 of {checkpoint}); the {stage} run is logged without a parent train run and without "
              "a train_run_id tag", file=sys.stderr, flush=True)
    return run_id


def end_active_run(status: str) -> None:
    """End the active run with ``status`` (``KILLED``, ``FAILED``...) before its ``with`` block does."""
    _mlflow().end_run(status=status)


def set_tags(tags: dict) -> None:
    _mlflow().set_tags({k: str(v) for k, v in tags.items()})


def log_image(rgb: np.ndarray, artifact_file: str) -> None:
    """Log a uint8 HxWx3 image as a PNG artifact."""
    _mlflow().log_image(rgb, artifact_file=artifact_file)


def log_figure(fig, artifact_file: str) -> None:
    _mlflow().log_figure(fig, artifact_file)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        _mlflow().log_artifacts(str(path), artifact_path=artifact_path)
    else:
        _mlflow().log_artifact(str(path), artifact_path=artifact_path)


def log_dict(obj: dict | list, artifact_file: str) -> None:
    _mlflow().log_dict(obj, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    _mlflow().log_text(text, artifact_file)


def log_training_data(rows: list[dict], name: str, source: str | Path, digest: str) -> None:
    """Record what the active run trains on as an MLflow dataset input: one row per pair, digest = the data hash."""
    import pandas as pd   # lazy: with mlflow

    mlflow = _mlflow()
    with warnings.catch_warnings():
        # a local path matches MLflow's two local artifact sources (schemes "" and "file"); either is right
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted", category=UserWarning)
        dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=str(Path(source).resolve()), name=name,
                                          digest=digest)
    mlflow.log_input(dataset, context="training")


def active_run_id() -> str | None:
    run = _mlflow().active_run()
    return run.info.run_id if run else None


def dump_json(obj, path: str | Path) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically (parent folders are made)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --- models and the registry ------------------------------------------------------------

def register_model_version(model_uri: str, name: str, tags: dict) -> str:
    """Register ``model_uri`` under ``name``; returns the new version number."""
    mlflow = _mlflow()
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


def set_alias(name: str, alias: str, version: str) -> None:
    _mlflow().MlflowClient().set_registered_model_alias(name, alias, version)


def version_by_alias(name: str, alias: str):
    """The ModelVersion holding ``alias``, or None when the model or alias does not exist."""
    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException   # lazy: mlflow

    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def versions_with_tag(name: str, key: str, value: str) -> list[str]:
    """Versions of registered model ``name`` whose tag ``key`` equals ``value`` (newest first)."""
    mlflow = _mlflow()
    found = mlflow.MlflowClient().search_model_versions(f"name = '{name}' and tags.`{key}` = '{value}'")
    return sorted((str(v.version) for v in found), key=int, reverse=True)


def set_version_tags(name: str, version: str, tags: dict) -> None:
    client = _mlflow().MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))


# --- moving a run between stores ----------------------------------------------------------

def export_run(run_id: str, path: str | Path, store_uri: str | None = None) -> dict:
    """Write a run's params, tags and full metric histories to JSON (portable, small)."""
    import mlflow   # lazy; not _mlflow(): the tracking URI of this process stays as it is

    client = mlflow.MlflowClient(store_uri or tracking_uri())
    run = client.get_run(run_id)
    history = {name: [[m.step, m.timestamp, m.value] for m in client.get_metric_history(run_id, name)]
               for name in run.data.metrics}
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    record = {"run_id": run_id, "run_name": run.info.run_name, "start_time": run.info.start_time,
              "end_time": run.info.end_time, "params": run.data.params, "tags": tags, "metrics": history}
    dump_json(record, path)
    return record


def import_run(path: str | Path, experiment: str, artifacts: list[str | Path] = ()) -> str:
    """Recreate an exported run (params, tags, metric histories, given artifacts) unless already imported.

    Returns the run id in this store; a run tagged ``imported_from=<original id>`` is reused.
    """
    from mlflow.entities import Metric, Param   # lazy: mlflow

    record = json.loads(Path(path).read_text())
    client = _mlflow().MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    existing = client.search_runs([exp_id], filter_string=f"tags.imported_from = '{record['run_id']}'")
    if existing:
        return existing[0].info.run_id
    run = client.create_run(exp_id, start_time=record["start_time"], run_name=record["run_name"],
                            tags={**record["tags"], "imported_from": record["run_id"],
                                  "mlflow.note.content": f"Imported from {Path(path).name}"})
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in record["params"].items()]
    metrics = [Metric(name, value, timestamp, step) for name, points in record["metrics"].items()
               for step, timestamp, value in points]
    for i in range(0, len(params), 100):   # MLflow's batch limits: 100 params, 1000 metrics
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for artifact in artifacts:
        client.log_artifact(run_id, str(artifact))
    client.set_terminated(run_id, end_time=record["end_time"])
    return run_id
