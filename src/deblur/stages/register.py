"""Stage register: gather the gate's evidence, decide, write the registry, export the champion.

Three steps, each its own function: ``gather_evidence`` (the challenger's per-image scores from
evaluate, the current champion and, when there is none, the ``train.init_from`` checkpoint
re-scored on the same test pairs), ``record_in_registry`` (a model version, aliases, the reasons
as tags and metrics) and ``export_champion`` (the serving artifact of whichever model is
champion afterwards). ``deblur.evaluation.gate`` decides in between.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deblur.artifact.export import export_serving_artifact
from deblur.core.config import Params, load_params
from deblur.core.stage_spec import STAGES
from deblur.evaluation.gate import Decision, PairedScores, decide, gate_lines
from deblur.evaluation.scoring import evaluate_model
from deblur.models.build import model_from_checkpoint
from deblur.models.checkpoint_file import load_checkpoint
from deblur.models.diffusion.controlnet_sd import registry_extras
from deblur.stages.evaluate import evaluation_inputs, load_run_info, read_sharp_in_csv, train_run_id
from deblur.tracking import models_uri  # noqa: F401  (a diffusion predictor may be a models:/ URI)
from deblur.tracking import runs as tracking
from deblur.tracking.lora_pyfunc import log_adapter_model
from deblur.tracking.pyfunc import log_deblur_model
from deblur.tracking.registry_io import download_model_checkpoint


@dataclass
class Evidence:
    challenger: PairedScores
    input: PairedScores
    sharp_in: list[float]
    champion: PairedScores | None = None
    champion_version: object | None = None       # mlflow ModelVersion
    champion_checkpoint: Path | None = None
    init_from: PairedScores | None = None
    init_from_path: str | None = None
    init_label: str | None = None                 # how the gate names init_from (default: train.init_from <path>)


def read_per_image(path: Path) -> tuple[PairedScores, PairedScores]:
    """The model's and the blurred input's per-image PSNR from evaluate's per-image CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise FileNotFoundError(f"{path}: no test images were scored; the test split is empty")
    ids, types = tuple(r["id"] for r in rows), tuple(r["blur_type"] for r in rows)
    return (PairedScores(ids, types, tuple(float(r["model_psnr"]) for r in rows)),
            PairedScores(ids, types, tuple(float(r["input_psnr"]) for r in rows)))


def read_predictor_scores(path: Path) -> PairedScores | None:
    """A diffusion refiner's predictor, scored alone by evaluate on the same pairs; None for other models."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not rows[0].get("predictor_psnr"):
        return None
    return PairedScores(tuple(r["id"] for r in rows), tuple(r["blur_type"] for r in rows),
                        tuple(float(r["predictor_psnr"]) for r in rows))


def _rescore(checkpoint, params: Params, records, desc: str) -> PairedScores:
    result = evaluate_model(model_from_checkpoint(checkpoint), records, params.tiling, params.evaluate,
                            params.synthesize.gamma, with_baseline=False, desc=desc, kernel_aware=params.kernel_aware)
    return PairedScores(tuple(r.id for r in result.images), tuple(r.blur_type for r in result.images),
                        tuple(r.scores["model_psnr"] for r in result.images))


def gather_evidence(params: Params, per_image_path: Path, sharp_in_path: Path, pairs_dir: Path,
                    download_dir: Path, check_init_from: bool = True) -> Evidence:
    challenger, input_scores = read_per_image(per_image_path)
    evidence = Evidence(challenger, input_scores, read_sharp_in_csv(sharp_in_path))
    records, _ = evaluation_inputs(pairs_dir, params.evaluate)
    name = params.registration.model_name
    champion = tracking.version_by_alias(name, "champion")
    if champion is not None:
        evidence.champion_version = champion
        champion_uri = f"models:/{name}/{champion.version}"
        # a LoRA adapter version comes with its base from the registry, the adapter merged in
        evidence.champion_checkpoint = download_model_checkpoint(champion_uri, download_dir)
        evidence.champion = _rescore(evidence.champion_checkpoint, params, records, "re-score champion")
    elif (predictor := read_predictor_scores(per_image_path)) is not None:
        # a refiner starts from its predictor: as a first champion it must not lose to it (beats_init_from)
        evidence.init_from_path = "its predictor (scored alone by evaluate)"
        evidence.init_label = "its predictor"
        evidence.init_from = predictor
    elif check_init_from and params.train.init_from and Path(params.train.init_from).is_file():
        evidence.init_from_path = params.train.init_from
        evidence.init_from = _rescore(Path(params.train.init_from), params, records, "score train.init_from")
    return evidence


def record_in_registry(params: Params, info: dict, decision: Decision, evidence: Evidence,
                       train_run: str | None = None) -> str:
    """Log the model (checkpoint + tiling) in the active run, register it, set aliases and reasons;
    ``train_run``: the train run's id for the version's ``train_run_id`` tag (None: no such tag).

    A LoRA run (its checkpoint has a ``lora`` entry) logs only the adapter; the version's tags
    link its base (``base_model_uri``, ``base_model_version``)."""
    name = params.registration.model_name
    checkpoint = load_checkpoint(info["checkpoint"])   # read once: which kind of model this is
    lora = checkpoint.get("lora")
    lora_tags = {}
    if lora:
        model_uri, base = log_adapter_model(info["checkpoint"], params.tiling)
        lora_tags = {"lora_adapter": "true", "lora_rank": lora["settings"]["rank"], "base_model_uri": base["uri"],
                     "base_model_version": base.get("version") or "none (a checkpoint file)",
                     "base_model_source": base["source"]}
    else:
        model_uri = log_deblur_model(info["checkpoint"], params.tiling, max_pixels=params.serving.max_pixels,
                                     kernel_aware=params.kernel_aware)
    tags = {"git_commit": tracking.git_commit(), "data_hash": info["data_hash"], "params_digest": info["params_digest"],
            "test_psnr": round(sum(evidence.challenger.psnr) / len(evidence.challenger.psnr), 4),
            "test_input_psnr": round(sum(evidence.input.psnr) / len(evidence.input.psnr), 4),
            "sharp_in_min_psnr": min(evidence.sharp_in) if evidence.sharp_in else None}
    if train_run:
        tags["train_run_id"] = train_run
    if info.get("dvc_experiment"):
        tags["dvc_experiment"] = info["dvc_experiment"]
    tags.update(info.get("version_tags", {}))
    tags.update(lora_tags)
    with tempfile.TemporaryDirectory() as tmp:
        extra_tags, lora_dir = registry_extras(checkpoint, tmp)   # controlnet_sd: base SD weights and LoRA
        if lora_dir is not None:
            tracking.log_artifact(lora_dir, "lora")
    tags.update(extra_tags)
    version = tracking.register_model_version(model_uri, name, tags)
    tracking.set_alias(name, "challenger", version)
    if decision.promote:
        tracking.set_alias(name, "champion", version)
    check_tags = {f"gate.{c.name}": ("passed: " if c.passed else "failed: ") + c.detail for c in decision.checks}
    tracking.set_version_tags(name, version, {"gate": decision.reason, **check_tags})
    metrics = {"promoted": float(decision.promote)}
    for check in decision.checks:
        key = check.name.replace(":", "_")
        metrics[f"gate_{key}_passed"] = float(check.passed)
        metrics.update({f"gate_{key}_{k}": v for k, v in check.values.items() if isinstance(v, (int, float))})
    tracking.log_metrics(metrics)
    tracking.set_tags({"decision": decision.reason, "registered_version": version})
    return version


def export_champion(params: Params, info: dict, decision: Decision, version: str, evidence: Evidence,
                    serving_dir: Path, train_run: str | None = None) -> str | None:
    """Export the serving artifact of the champion after this decision; returns its version (None: no champion).
    The served model's train run id goes to the artifact's runtime.json (deblur.artifact.meta), not model.json."""
    name = params.registration.model_name
    if decision.promote:
        checkpoint, served, run_id, psnr = Path(info["checkpoint"]), version, train_run, evidence.challenger.psnr
    elif evidence.champion_checkpoint is not None:
        champion = evidence.champion_version
        checkpoint, served = evidence.champion_checkpoint, str(champion.version)
        run_id, psnr = champion.tags.get("train_run_id", champion.run_id), evidence.champion.psnr
    else:
        serving_dir.mkdir(parents=True, exist_ok=True)
        for old in serving_dir.iterdir():
            if old.is_file():
                old.unlink()
        (serving_dir / "NO_CHAMPION.txt").write_text(
            "No model has passed the promotion gate yet; see reports/registered_model.json.\n")
        return None
    export_serving_artifact(checkpoint, serving_dir, {
        "model_name": name, "version": served, "alias": "champion", "model_uri": f"models:/{name}/{served}",
        "run_id": run_id, "metrics": {"test_psnr": round(sum(psnr) / len(psnr), 4),
                                      "test_input_psnr": round(sum(evidence.input.psnr) / len(evidence.input.psnr), 4)}},
        tiling=params.tiling, serving=params.serving, kernel_aware=params.kernel_aware)
    return served


def run_register(params_path: Path, run_info_path: Path, per_image_path: Path, sharp_in_path: Path, pairs_dir: Path,
                 decision_path: Path, serving_dir: Path, check_init_from: bool = True) -> dict:
    """``check_init_from=False`` for a model that was not fine-tuned from ``train.init_from`` (an import)."""
    params = load_params(params_path)
    info = load_run_info(run_info_path)
    name = params.registration.model_name
    with tempfile.TemporaryDirectory() as tmp:
        evidence = gather_evidence(params, per_image_path, sharp_in_path, pairs_dir, Path(tmp), check_init_from)
        champion = evidence.champion_version
        decision = decide(evidence.challenger, evidence.input, evidence.sharp_in, evidence.champion, evidence.init_from,
                          params.registration, champion_label=f"champion v{champion.version}" if champion else "champion",
                          init_label=evidence.init_label or f"train.init_from {evidence.init_from_path}", seed=params.seed)
        train_run = train_run_id(info, "register")
        with tracking.stage_run("register", params, sections=STAGES["register"].params, parent_run_id=train_run,
                                tags={"data_hash": info["data_hash"], **({"train_run_id": train_run} if train_run else {})}):
            version = record_in_registry(params, info, decision, evidence, train_run)
            served = export_champion(params, info, decision, version, evidence, serving_dir, train_run)
            n = len(evidence.challenger.psnr)
            record = {
                "model_name": name, "version": version, "promoted": decision.promote, "reason": decision.reason,
                "checks": decision.as_dict()["checks"], "n_test_pairs": n,
                "challenger_psnr": round(sum(evidence.challenger.psnr) / n, 4),
                "input_psnr": round(sum(evidence.input.psnr) / n, 4),
                "sharp_in_min_psnr": min(evidence.sharp_in) if evidence.sharp_in else None,
                "previous_champion_version": str(champion.version) if champion else None,
                "previous_champion_psnr": round(sum(evidence.champion.psnr) / n, 4) if evidence.champion else None,
                "init_from": evidence.init_from_path,
                "init_from_psnr": round(sum(evidence.init_from.psnr) / n, 4) if evidence.init_from else None,
                "challenger_uri": f"models:/{name}/{version}",
                "champion_uri": f"models:/{name}@champion" if served else None,
                "champion_version": served,
                "serving_artifact": str(serving_dir) if served else None,
                "tracking_uri": tracking.tracking_uri(),
            }
            tracking.log_dict(record, "registration.json")
    tracking.dump_json(record, decision_path)

    print("\n".join(["", *gate_lines(record)]), flush=True)   # dvc repro / dvc exp run show the verdict
    return record
