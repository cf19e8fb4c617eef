"""Stage train: fit the model in params on the synthesize stage's pairs, logged to MLflow."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
import torch.distributed as dist

from deblur.tracking import models_uri  # noqa: F401  (a diffusion predictor may be a models:/ URI)
from deblur.tracking import runs as tracking
from deblur.core.config import load_params
from deblur.core.files import sha256_file
from deblur.data.pairs import read_pairs
from deblur.core.stage_spec import STAGES
from deblur.training.curves import curve_figure, write_curve, write_val_curve
from deblur.training.distributed import init_distributed
from deblur.training.errors import TrainingError, TrainingInterrupted
from deblur.training.trainer import Trainer


def run_train(params_path: Path, pairs_dir: Path, checkpoint_dir: Path, curve_path: Path, run_info_path: Path,
              resume_from: Path | None = None, val_curve_path: Path | None = None) -> dict:
    """Train, log the run to MLflow and write the curves (``val_curve_path``: by default ``val_curve.csv``
    beside ``curve_path``) and the run info JSON the evaluate stage reads.

    The run info JSON (a DVC output) holds only what the same inputs reproduce: no MLflow run id.
    The run is tagged with the sha256 of ``best.pt`` instead (``tracking.CHECKPOINT_TAG``), by which
    evaluate and register find it; the returned dict adds ``run_id``."""
    val_curve_path = Path(val_curve_path) if val_curve_path else Path(curve_path).parent / "val_curve.csv"
    params = load_params(params_path)
    dist_info = init_distributed()
    if not dist_info.is_main:
        Trainer(params, pairs_dir, checkpoint_dir, dist_info, resume_from).fit()
        _close_distributed(dist_info)
        return {}

    experiment = os.environ.get("DVC_EXP_NAME")
    tags = {"device": params.train.device, "torch_version": torch.__version__, "python": platform.python_version(),
            "model": params.model.name, "world_size": dist_info.world_size}
    if experiment:
        tags["dvc_experiment"] = experiment
    run_name = f"train-{params.model.name}-{experiment or params.digest()}"
    with tracking.stage_run("train", params, sections=STAGES["train"].params, tags=tags, run_name=run_name) as run_id:
        trainer = Trainer(params, pairs_dir, checkpoint_dir, dist_info, resume_from)
        data_hash = trainer.resume_key["data"]
        tracking.set_tags({"device": str(trainer.device), "resumed": trainer.resumed, "data_hash": data_hash})
        tracking.log_training_data(pairs_manifest(pairs_dir), "pairs", pairs_dir, data_hash)
        try:
            result = trainer.fit()
        except TrainingInterrupted:
            tracking.set_tags({"interrupted_at_step": trainer.step})
            tracking.end_active_run("KILLED")
            raise
        if not trainer.best_path.exists():
            raise TrainingError(f"{trainer.best_path}: training produced no best checkpoint (no finite validation)")
        write_curve(result.history, curve_path)
        write_val_curve(result.history, val_curve_path)
        tracking.log_artifact(curve_path, "plots")
        tracking.log_artifact(val_curve_path, "plots")
        tracking.log_figure(curve_figure(result.history), "plots/training_curve.png")
        tracking.log_artifact(trainer.best_path, "checkpoints")
        tracking.set_tags({tracking.CHECKPOINT_TAG: sha256_file(trainer.best_path)})   # how evaluate finds this run
        tracking.log_metrics({"best_val_psnr": result.best_psnr, "best_step": result.best_step,
                              "stopped_early": float(result.stopped_early)})
        info = {"checkpoint": str(trainer.best_path), "best_val_psnr": result.best_psnr,
                "best_step": result.best_step, "last_step": result.last_step, "data_hash": data_hash,
                "params_digest": params.digest(), "dvc_experiment": experiment}
    tracking.dump_json(info, run_info_path)
    _close_distributed(dist_info)
    return {**info, "run_id": run_id}


def pairs_manifest(pairs_dir: Path) -> list[dict]:
    """One row per train/val pair (the files ``resume.train_data_hash`` digests), for the run's dataset input."""
    root = Path(pairs_dir)
    return [{"split": split, "id": r.id, "blur_type": r.blur_type, "source": r.source, "name": r.name,
             "blur_image": str(r.blur_path.relative_to(root)), "clear_image": str(r.clear_path.relative_to(root))}
            for split in ("train", "val") for r in read_pairs(root, split)]


def _close_distributed(dist_info) -> None:
    if dist_info.world_size > 1:
        dist.destroy_process_group()
