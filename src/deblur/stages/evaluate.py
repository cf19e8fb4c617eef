"""Stage evaluate: whole-image test metrics beside the blurred input and a classical reference."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from deblur.core import viz
from deblur.tracking import models_uri  # noqa: F401  (a diffusion predictor may be a models:/ URI)
from deblur.core.config import EvaluateConfig, load_params
from deblur.core.imageio import write_png
from deblur.core.stage_spec import STAGES
from deblur.data.pairs import read_pairs
from deblur.evaluation.scoring import (bucket_key, evaluate_model, per_blur_figure, write_per_blur_csv,
                                       write_per_image_csv)
from deblur.models.build import model_from_checkpoint
from deblur.models.checkpoint_file import load_checkpoint
from deblur.models.perceptual import lpips_from_config, lpips_status
from deblur.tracking import runs as tracking


def load_run_info(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: no training run info; run the train stage first") from err


def train_run_id(info: dict, stage: str) -> str | None:
    """The MLflow run ``stage`` nests under: ``run_id`` when the run info names one (an import's run.json,
    written outside DVC), else the train run tagged with the sha256 of ``info["checkpoint"]``
    (``reports/train_run.json`` holds no run id); None when this store has none (a warning says so)."""
    return info.get("run_id") or tracking.train_run_of_checkpoint(info["checkpoint"], stage)


def evaluation_inputs(pairs_dir: Path, cfg: EvaluateConfig) -> tuple[list, list[Path]]:
    """Test pairs (capped by evaluate.max_images) and unblurred photos for the sharp-in check.

    Sharp-in photos are the test split's sharp images (GoPro's sharp frames included), without
    procedural scenes unless there is nothing else.
    """
    records = read_pairs(pairs_dir, "test")
    if cfg.max_images:
        records = records[: cfg.max_images]
    def one_per_image(rows) -> list[Path]:   # an image's pairs each hold a copy of its sharp file
        return [path for _, path in sorted({r.name: r.clear_path for r in rows}.items())]

    photos = one_per_image([r for r in records if not r.is_synthetic_scene]) or one_per_image(records)
    return records, photos[: cfg.sharp_in_images]


def flat_test_metrics(summary: dict) -> dict[str, float]:
    """metrics.json flattened to MLflow metric names: ``test_model_psnr``, ``test_motion_model_psnr``,
    per kernel-size bucket ``test_motion_k23_41_model_psnr``, ``test_motion_kle21_n``..."""
    flat = {f"test_{k}": v for k, v in summary["overall"].items()}
    for blur_type, scores in summary["per_blur_type"].items():
        flat.update({f"test_{blur_type}_{k}": v for k, v in scores.items()})
    for blur_type, buckets in summary.get("per_kernel_bucket", {}).items():
        for label, scores in buckets.items():
            flat.update({f"test_{blur_type}_{bucket_key(label)}_{k}": v for k, v in scores.items()})
    if "sharp_in" in summary:
        flat.update(sharp_in_psnr=summary["sharp_in"]["psnr"], sharp_in_min_psnr=summary["sharp_in"]["min_psnr"])
    return flat


def write_sharp_in_csv(paths: list[Path], scores: list[float], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "psnr"])
        writer.writerows([[Path(p).name, f"{s:.4f}"] for p, s in zip(paths, scores)])


def read_sharp_in_csv(path: Path) -> list[float]:
    with open(path, newline="") as f:
        return [float(row["psnr"]) for row in csv.DictReader(f)]


def run_evaluate(params_path: Path, run_info_path: Path, pairs_dir: Path, metrics_path: Path, per_image_path: Path,
                 per_blur_path: Path, sharp_in_path: Path, triptych_dir: Path) -> dict:
    params = load_params(params_path)
    info = load_run_info(run_info_path)
    cfg = params.evaluate
    records, photos = evaluation_inputs(pairs_dir, cfg)
    model = model_from_checkpoint(load_checkpoint(Path(info["checkpoint"])))
    torch.manual_seed(params.seed)
    lpips = lpips_from_config(cfg.lpips)   # None when evaluate.lpips.backbone is null: recorded, never faked
    result = evaluate_model(model, records, params.tiling, cfg, params.synthesize.gamma, photos,
                            keep_images=cfg.triptychs, lpips=lpips, kernel_aware=params.kernel_aware)
    summary = result.summary()
    summary["lpips"] = {"available": lpips is not None, "status": lpips_status(cfg.lpips)}
    tracking.dump_json(summary, metrics_path)
    write_per_image_csv(result, per_image_path)
    write_per_blur_csv(summary, per_blur_path)
    write_sharp_in_csv(photos, result.sharp_in_psnr, sharp_in_path)
    triptych_dir.mkdir(parents=True, exist_ok=True)
    for old in triptych_dir.glob("*.png"):
        old.unlink()
    for r in result.images:
        if r.images:
            sheet = viz.triptych(r.images["blurred"], r.images["model"], r.images["sharp"],
                                 titles=(f"blurred {r.scores['input_psnr']:.2f} dB",
                                         f"deblurred {r.scores['model_psnr']:.2f} dB", "sharp"))
            if "estimated_psf" in r.images:   # the blur thorough mode removed, beside the true one
                sheet = viz.with_kernels(sheet, r.images["true_psf"], r.images["estimated_psf"],
                                         f"NCC {r.scores['kernel_ncc']:.2f}")
            write_png(triptych_dir / f"{r.id}_{r.blur_type}.png", sheet)

    flat = flat_test_metrics(summary)
    train_run = train_run_id(info, "evaluate")
    tags = {"data_hash": info["data_hash"], "lpips": summary["lpips"]["status"],
            **({"train_run_id": train_run} if train_run else {})}
    with tracking.stage_run("evaluate", params, sections=STAGES["evaluate"].params, parent_run_id=train_run,
                            tags=tags):
        tracking.log_metrics(flat)
        for path in (metrics_path, per_image_path, per_blur_path, sharp_in_path):
            tracking.log_artifact(path, "evaluation")
        tracking.log_artifact(triptych_dir, "evaluation/triptychs")
        tracking.log_figure(per_blur_figure(summary), "evaluation/psnr_per_blur_type.png")
    if train_run:   # one row per train run in mlflow ui: params beside test scores
        tracking.log_metrics_to_run(train_run, flat)
    return summary
