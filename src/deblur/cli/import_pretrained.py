"""Make the shipped checkpoints visible in your MLflow store, and register one through the gate.

    python -m deblur.cli.import_pretrained [--experiment deblur-pretraining]
    python -m deblur.cli.import_pretrained --register checkpoints/pretrained/nafnet16.pt   # after `dvc repro synthesize`

Each ``checkpoints/pretrained/<name>.run.json`` (params, tags, full metric histories exported
from the store it was trained in) becomes a run of the experiment, with the checkpoint as an
artifact. Idempotent: a run already imported is left alone.

``--register`` evaluates a shipped checkpoint on the test split (``data/pairs``) exactly as the
evaluate stage does and puts it through the promotion gate as a model version tagged with its
origin and sha256: on a fresh store it becomes the first champion if it passes, and the
pipeline's own fine-tune must then beat it to replace it. A checkpoint already registered (same
sha256) is left alone.

``import_official`` (the ``deblur import-checkpoint`` command) does the same for an official
NAFNet ``.pth`` after converting it (``deblur.models.official``), with its file name, sha256 and
licence as tags of the run and of the model version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deblur.cli import fail_cleanly
from deblur.core.config import NAFNetConfig, load_params
from deblur.core.files import sha256_file
from deblur.data.pairs import INDEX_NAME
from deblur.core.stage_spec import DEFAULT_MODEL_DIR
from deblur.tracking import runs as tracking

PRETRAINED_DIR = Path(__file__).resolve().parents[3] / "checkpoints" / "pretrained"


def import_runs(folder: Path, experiment: str) -> dict[str, str]:
    """Import every ``*.run.json`` of ``folder``; returns checkpoint file name -> run id."""
    runs = {}
    for record in sorted(folder.glob("*.run.json")):
        checkpoint = record.with_name(record.name.replace(".run.json", ".pt"))
        run_id = tracking.import_run(record, experiment, [checkpoint] if checkpoint.exists() else [])
        runs[checkpoint.name] = run_id
        print(f"{record.name}: run {run_id} in experiment {experiment!r} ({tracking.tracking_uri()})")
    return runs


def register_checkpoint(checkpoint: Path, run_id: str, params_path: Path, pairs_dir: Path, reports_dir: Path,
                        serving_dir: Path, version_tags: dict | None = None) -> dict | None:
    """Evaluate ``checkpoint`` and register it through the gate; None when it is registered already.

    ``version_tags`` are added to the model version's tags (and may replace ``origin``)."""
    # lazy: torch, for --register only (importing the runs needs mlflow alone)
    from deblur.stages.evaluate import run_evaluate
    from deblur.stages.register import run_register

    sha = sha256_file(checkpoint)
    name = load_params(params_path).registration.model_name
    existing = tracking.versions_with_tag(name, "checkpoint_sha256", sha)
    if existing:
        print(f"{checkpoint}: already registered as {name} v{existing[0]}")
        return None
    info = {"run_id": run_id, "checkpoint": str(checkpoint), "data_hash": "shipped", "params_digest": "shipped",
            "version_tags": {"origin": f"shipped checkpoint {checkpoint.name}", **(version_tags or {}),
                             "checkpoint_sha256": sha}}
    reports_dir.mkdir(parents=True, exist_ok=True)
    tracking.dump_json(info, reports_dir / "run.json")
    run_evaluate(params_path, reports_dir / "run.json", pairs_dir, reports_dir / "metrics.json",
                 reports_dir / "per_image.csv", reports_dir / "psnr_per_blur.csv", reports_dir / "sharp_in.csv",
                 reports_dir / "triptychs")
    record = run_register(params_path, reports_dir / "run.json", reports_dir / "per_image.csv",
                          reports_dir / "sharp_in.csv", pairs_dir, reports_dir / "registered_model.json", serving_dir,
                          check_init_from=False)
    print(f"{checkpoint}: registered as {name} v{record['version']}; {record['reason']}")
    return record


def import_official(source: Path, name: str | None, licence: str, params_path: Path, pairs_dir: Path,
                    reports_dir: Path, serving_dir: Path, padding: str, train_patch_size: int,
                    param_key: str | None) -> dict | None:
    """``deblur import-checkpoint``: convert an official NAFNet ``.pth`` (``deblur.models.official``), log it as
    an MLflow run and register it through the gate as ``register_checkpoint`` does for shipped
    checkpoints. None when a file with the same sha256 is registered already."""
    # lazy: torch, as in register_checkpoint
    from deblur.models.checkpoint_file import CheckpointError, read_checkpoint_file, save_atomic
    from deblur.models.official import Origin, convert, is_official

    if not source.is_file():   # before the pairs check: the file is what the user named
        raise CheckpointError(f"{source}: checkpoint not found")
    params = load_params(params_path)
    if not (pairs_dir / "test" / INDEX_NAME).is_file():
        raise CheckpointError(f"{pairs_dir}: no test split to score the import on; run `dvc repro synthesize` first "
                              "(or pass --pairs)")
    origin = Origin.of_file(source, licence)
    model_name = params.registration.model_name
    existing = tracking.versions_with_tag(model_name, "source_sha256", origin.sha256)
    if existing:
        print(f"{source}: already registered as {model_name} v{existing[0]} (same sha256)")
        return None
    raw = read_checkpoint_file(source)
    if not is_official(raw):
        found = sorted(map(str, raw))[:10]
        raise CheckpointError(f"{source}: unknown layout: expected an official NAFNet checkpoint (a dict with "
                              f"'params' or 'params_ema'), found {found}")
    nafnet = params.model.nafnet
    ckpt = convert(raw, origin, param_key=param_key, padding=padding, tlc=nafnet.tlc, tlc_factor=nafnet.tlc_factor,
                   train_patch_size=train_patch_size)
    name = name or source.stem
    out_dir = reports_dir / name
    checkpoint = out_dir / f"{name}.pt"
    save_atomic(ckpt, checkpoint)
    arch = NAFNetConfig.model_validate(ckpt["model_config"]["nafnet"])
    imported = params.model_copy(update={"model": params.model.model_copy(update={"name": "nafnet", "nafnet": arch})})
    tags = {"origin": f"official NAFNet checkpoint {origin.file}", "source_file": origin.file,
            "source_sha256": origin.sha256, "licence": licence, "param_key": ckpt["origin"]["param_key"],
            "import_name": name}
    with tracking.stage_run("import", imported, sections=("model",), tags=tags, run_name=f"import {name}") as run_id:
        tracking.log_dict(ckpt["origin"], "origin.json")
        tracking.log_artifact(checkpoint, "checkpoint")
    print(f"{source}: {name} ({' '.join(f'{k}={v}' for k, v in arch.model_dump().items())}), run {run_id}")
    return register_checkpoint(checkpoint, run_id, params_path, pairs_dir, out_dir / "reports", serving_dir,
                               version_tags=tags)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="deblur-pretraining")
    parser.add_argument("--dir", type=Path, default=PRETRAINED_DIR)
    parser.add_argument("--register", type=Path, default=None, help="a shipped checkpoint to put through the gate")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--pairs", type=Path, default=Path("data/pairs"))
    parser.add_argument("--reports", type=Path, default=Path("reports/shipped"))
    parser.add_argument("--serving-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args(argv)
    runs = import_runs(args.dir, args.experiment)
    if args.register is None:
        return 0
    if args.register.name not in runs:
        print(f"error: {args.register}: not a shipped checkpoint with a run record in {args.dir}", file=sys.stderr)
        return 1
    return fail_cleanly(register_checkpoint, args.register, runs[args.register.name], args.params, args.pairs,
                        args.reports, args.serving_dir)


if __name__ == "__main__":
    raise SystemExit(main())
