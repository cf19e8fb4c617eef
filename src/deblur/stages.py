"""What each pipeline stage does, end to end; the scripts in pipelines/ only parse arguments."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from deblur import tracking
from deblur.config import load_params


def run_train(params_path: Path, pairs_dir: Path, checkpoint_dir: Path, curve_path: Path, run_info_path: Path) -> dict:
    from deblur.training import Trainer, TrainingInterrupted, curve_figure, init_distributed, write_curve

    params = load_params(params_path)
    dist_info = init_distributed()
    if not dist_info.is_main:
        Trainer(params, pairs_dir, checkpoint_dir, dist_info).fit()
        _close_distributed(dist_info)
        return {}

    data_hash = tracking.files_digest(sorted(Path(pairs_dir).glob("*/blur_types.json")))
    tags = {"data_hash": data_hash, "device": params.train.device, "torch_version": torch.__version__,
            "python": platform.python_version(), "model": params.model.name, "world_size": dist_info.world_size}
    with tracking.stage_run("train", params, sections=("model", "loss", "train", "synthesize", "tiling"),
                            tags=tags, run_name=f"train-{params.model.name}") as run_id:
        trainer = Trainer(params, pairs_dir, checkpoint_dir, dist_info)
        tracking.set_tags({"device": str(trainer.device), "resumed": trainer.resumed})
        try:
            result = trainer.fit()
        except TrainingInterrupted:
            tracking.set_tags({"interrupted_at_step": trainer.step})
            tracking.end_active_run("KILLED")
            raise
        if not trainer.best_path.exists():
            raise FileNotFoundError(f"{trainer.best_path}: training produced no best checkpoint")
        write_curve(result.history, curve_path)
        tracking.log_artifact(curve_path, "plots")
        tracking.log_figure(curve_figure(result.history), "plots/training_curve.png")
        tracking.log_artifact(trainer.best_path, "checkpoints")
        tracking.log_metrics({"best_val_psnr": result.best_psnr, "best_step": result.best_step,
                              "stopped_early": float(result.stopped_early)})
        model_uri = tracking.log_deblur_model(trainer.best_path, params.tiling)
        info = {"run_id": run_id, "model_uri": model_uri, "checkpoint": str(trainer.best_path), "best_val_psnr": result.best_psnr,
                "best_step": result.best_step, "last_step": result.last_step, "data_hash": data_hash,
                "params_digest": params.digest()}
    tracking.dump_json(info, run_info_path)
    _close_distributed(dist_info)
    return info


def _close_distributed(dist_info) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def load_run_info(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: no training run info; run the train stage first") from err


def _test_inputs(pairs_dir: Path, cfg) -> tuple[list, list[Path]]:
    """Test pairs (capped by evaluate.max_images) and unblurred photos for the sharp-in check."""
    from deblur.data.pairs import read_pairs

    records = read_pairs(pairs_dir, "test")
    if cfg.max_images:
        records = records[: cfg.max_images]
    photos = sorted({r.clear_path for r in records if r.blur_type != "real" and not r.is_synthetic_scene})
    return records, photos[: cfg.sharp_in_images]


def run_evaluate(params_path: Path, run_info_path: Path, pairs_dir: Path, metrics_path: Path, per_image_path: Path,
                 per_blur_path: Path, triptych_dir: Path) -> dict:
    from deblur import viz
    from deblur.checkpoints import load_checkpoint, model_from_checkpoint
    from deblur.evaluation import evaluate_model, per_blur_figure, write_per_blur_csv, write_per_image_csv
    from deblur.imageio import write_png

    params = load_params(params_path)
    info = load_run_info(run_info_path)
    cfg = params.evaluate
    records, photos = _test_inputs(pairs_dir, cfg)
    checkpoint = Path(info["checkpoint"])
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    torch.manual_seed(params.seed)
    result = evaluate_model(model, records, params.tiling, cfg, params.synthesize.gamma, photos,
                            keep_images=cfg.triptychs)
    summary = result.summary()
    tracking.dump_json(summary, metrics_path)
    write_per_image_csv(result, per_image_path)
    write_per_blur_csv(summary, per_blur_path)
    triptych_dir.mkdir(parents=True, exist_ok=True)
    for old in triptych_dir.glob("*.png"):
        old.unlink()
    for r in result.images:
        if r.images:
            title = f"deblurred {r.scores['model_psnr']:.2f} dB"
            sheet = viz.triptych(r.images["blurred"], r.images["model"], r.images["sharp"],
                                 titles=(f"blurred {r.scores['input_psnr']:.2f} dB", title, "sharp"))
            write_png(triptych_dir / f"{r.id}_{r.blur_type}.png", sheet)

    with tracking.stage_run("evaluate", params, sections=("evaluate", "tiling"), parent_run_id=info["run_id"],
                            tags={"data_hash": info["data_hash"], "train_run_id": info["run_id"]}):
        flat = {f"test_{k}": v for k, v in summary["overall"].items()}
        for blur_type, scores in summary["per_blur_type"].items():
            flat.update({f"test_{blur_type}_{k}": v for k, v in scores.items()})
        if "sharp_in" in summary:
            flat.update(sharp_in_psnr=summary["sharp_in"]["psnr"], sharp_in_min_psnr=summary["sharp_in"]["min_psnr"])
        tracking.log_metrics(flat)
        for path in (metrics_path, per_image_path, per_blur_path):
            tracking.log_artifact(path, "evaluation")
        tracking.log_artifact(triptych_dir, "evaluation/triptychs")
        tracking.log_figure(per_blur_figure(summary), "evaluation/psnr_per_blur_type.png")
    return summary


def run_register(params_path: Path, run_info_path: Path, metrics_path: Path, pairs_dir: Path, decision_path: Path,
                 serving_dir: Path) -> dict:
    import tempfile

    from deblur.checkpoints import model_from_checkpoint
    from deblur.evaluation import evaluate_model
    from deblur.registration import GateInputs, decide
    from deblur.serving import export_serving_artifact

    params = load_params(params_path)
    cfg = params.registration
    info = load_run_info(run_info_path)
    summary = json.loads(Path(metrics_path).read_text())
    records, photos = _test_inputs(pairs_dir, params.evaluate)

    champion = tracking.version_by_alias(cfg.model_name, "champion")
    champion_psnr = None
    with tempfile.TemporaryDirectory() as tmp:
        champion_ckpt = None
        if champion is not None:
            champion_ckpt = tracking.download_checkpoint(f"models:/{cfg.model_name}/{champion.version}", tmp)
            rescored = evaluate_model(model_from_checkpoint(champion_ckpt), records, params.tiling, params.evaluate,
                                      params.synthesize.gamma, with_baseline=False, desc="re-score champion")
            champion_psnr = rescored.summary()["overall"]["model_psnr"]

        gate = GateInputs(
            challenger_psnr=summary["overall"]["model_psnr"],
            input_psnr=summary["overall"]["input_psnr"],
            sharp_in_psnr=summary.get("sharp_in", {}).get("min_psnr"),
            champion_psnr=champion_psnr,
            champion_version=str(champion.version) if champion else None,
        )
        decision = decide(gate, cfg)
        tags = {"git_commit": tracking.git_commit(), "data_hash": info["data_hash"],
                "params_digest": info["params_digest"], "train_run_id": info["run_id"],
                "test_psnr": gate.challenger_psnr, "test_input_psnr": gate.input_psnr,
                "sharp_in_min_psnr": gate.sharp_in_psnr}
        with tracking.stage_run("register", params, sections=("register",), parent_run_id=info["run_id"],
                                tags={"data_hash": info["data_hash"], "train_run_id": info["run_id"]}):
            version = tracking.register_model_version(info["model_uri"], cfg.model_name, tags)
            tracking.set_alias(cfg.model_name, "challenger", version)
            if decision.promote:
                tracking.set_alias(cfg.model_name, "champion", version)
            tracking.set_version_tags(cfg.model_name, version, {"gate": decision.reason})
            tracking.log_metrics({k: v for k, v in {
                "challenger_psnr": gate.challenger_psnr, "input_psnr": gate.input_psnr,
                "champion_psnr": champion_psnr, "sharp_in_min_psnr": gate.sharp_in_psnr,
                "promoted": float(decision.promote)}.items() if v is not None})
            tracking.set_tags({"decision": decision.reason, "registered_version": version})
            record = {
                "model_name": cfg.model_name, "version": version, "promoted": decision.promote,
                "reason": decision.reason, "challenger_psnr": gate.challenger_psnr, "input_psnr": gate.input_psnr,
                "sharp_in_min_psnr": gate.sharp_in_psnr, "previous_champion_version": gate.champion_version,
                "previous_champion_psnr": champion_psnr,
                "challenger_uri": f"models:/{cfg.model_name}/{version}",
                "champion_uri": f"models:/{cfg.model_name}@champion" if (decision.promote or champion) else None,
                "tracking_uri": tracking.tracking_uri(),
            }
            if decision.promote:
                serving_ckpt, serving_version = Path(info["checkpoint"]), version
            elif champion_ckpt is not None:
                serving_ckpt, serving_version = champion_ckpt, str(champion.version)
            else:
                serving_ckpt = serving_version = None
            if serving_ckpt is not None:
                export_serving_artifact(serving_ckpt, serving_dir, {
                    "model_name": cfg.model_name, "version": serving_version, "alias": "champion",
                    "model_uri": f"models:/{cfg.model_name}/{serving_version}",
                    "run_id": info["run_id"] if decision.promote else champion.run_id,
                    "metrics": {"test_psnr": gate.challenger_psnr if decision.promote else champion_psnr,
                                "test_input_psnr": gate.input_psnr}},
                    tiling=params.tiling, serving=params.serving)
                record["serving_artifact"] = str(serving_dir)
            else:
                serving_dir.mkdir(parents=True, exist_ok=True)
                (serving_dir / "NO_CHAMPION.txt").write_text(
                    "No model has passed the promotion gate yet; see reports/registered_model.json.\n")
                record["serving_artifact"] = None
            tracking.log_dict(record, "registration.json")
    tracking.dump_json(record, decision_path)
    return record
