"""The ``deblur`` command (also ``python -m deblur``).

    deblur predict photo.jpg shots/ -o sharp/ [--model models:/deblur@champion]   # deblur files
    deblur predict photo.jpg -o sharp/ --mode thorough --save-psf                 # ... kernel-aware, kernels saved
    deblur predict photo.jpg -o sharp/ --psf kernel.png                           # ... with a known blur kernel
    deblur serve [--port 7071]                                                     # the HTTP service
    deblur import-checkpoint NAFNet-GoPro-width32.pth --licence MIT   # official weights -> gate
    deblur import-pretrained [--register checkpoints/pretrained/nafnet16.pt]
    deblur merge-lora --adapter models:/deblur/5 -o merged.pt      # a LoRA adapter folded into its base

Kept apart from ``deblur.cli`` (imported by every pipeline script) so that the stages' code
dependencies do not grow by the import commands. Each subcommand imports what it needs when it runs
(the imports inside the functions below), so that ``deblur --help`` and ``deblur serve`` start without
torch, mlflow or pydantic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deblur.cli import fail_cleanly
from deblur.core.errors import DeblurError
from deblur.core.runtime_env import prefer_passive_openmp
from deblur.core.stage_spec import DEFAULT_MODEL_DIR


def _import_checkpoint(args: argparse.Namespace) -> int:
    from deblur.cli.import_pretrained import import_official   # lazy: this subcommand's modules only

    return fail_cleanly(import_official, args.file, args.name, args.licence, args.params, args.pairs, args.reports,
                        args.serving_dir, args.padding, args.train_patch_size, args.param_key)


def _merge_lora(args: argparse.Namespace) -> int:
    from deblur.cli.merge_lora import merge_command   # lazy: torch

    return fail_cleanly(merge_command, args.adapter, args.base, args.out)


def _predict(args: argparse.Namespace) -> int:
    if args.psf is not None:
        if args.mode is not None or args.save_psf:
            print("error: --psf deconvolves with a kernel you know; --mode and --save-psf apply to runs of a model "
                  "(drop them, or drop --psf)", file=sys.stderr)
            return 2
        return _predict_with_psf(args)
    from pydantic import ValidationError   # lazy, as the predict subcommand's modules below

    from deblur.artifact.meta import ServingError
    from deblur.cli import predict

    try:
        return predict.run(args.inputs, args.out, args.model, args.params, args.format, args.tile_size, args.overlap,
                           args.quality, args.threads, args.mode, args.save_psf)
    except (DeblurError, ServingError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
    except ValidationError as err:   # tiling overrides out of range
        print(f"error: --tile-size/--overlap: {err.errors()[0]['msg']}", file=sys.stderr)
    return 2


def _predict_with_psf(args: argparse.Namespace) -> int:
    from deblur.cli import predict   # lazy: the predict subcommand's modules (here no model, no torch)

    try:
        return predict.run_with_psf(args.inputs, args.out, args.psf, args.format, args.quality, args.threads)
    except (DeblurError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
    return 2


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="deblur", description="Single-image deblurring: deblur files, serve the "
                                  "HTTP API, import models (the pipeline itself runs with `dvc repro`, see README.md).")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pred = commands.add_parser(
        "predict", help="deblur image files, folders or globs with the champion (or another model)",
        description="Deblur images on the CPU with seam-free tiled inference, as the HTTP service does. "
                    "Outputs go to OUT/<name>.<format> (images found in a folder keep their path below it). "
                    "Unreadable files are skipped and listed; the exit code is 0 when every image was written, "
                    "1 when some were skipped, 2 when nothing could start (no inputs, no model).")
    pred.add_argument("inputs", nargs="+", metavar="IN", help="image files, folders (recursive) or glob patterns")
    pred.add_argument("-o", "--out", type=Path, required=True, help="output folder (created)")
    pred.add_argument("--model", default=str(DEFAULT_MODEL_DIR),
                      help=f"a serving artifact folder (default: the exported champion, {DEFAULT_MODEL_DIR.as_posix()}) "
                           "or a registry URI, models:/<name>@<alias> or models:/<name>/<version> "
                           "(MLFLOW_TRACKING_URI, default sqlite:///mlflow.db)")
    pred.add_argument("--psf", type=Path, default=None,
                      help="a known blur kernel (.npy or greyscale PNG, odd sides, centre pixel = origin): "
                           "deconvolve every input with it (hyper-Laplacian prior, documentation/kernel_aware.md) "
                           "instead of running a model; --model and the tiling options are then unused")
    pred.add_argument("--mode", choices=("fast", "thorough"), default=None,
                      help="fast: the network only; thorough: estimate each image's blur kernel, deconvolve it and "
                           "keep what the evidence supports, printing the choice per image "
                           "(documentation/kernel_aware.md). Default: the model's kernel_aware.default_mode (fast "
                           "for a model exported without one)")
    pred.add_argument("--save-psf", action="store_true",
                      help="with --mode thorough: write each image's estimated kernel beside its output, "
                           "OUT/<name>.psf.png (16-bit, scaled to its peak) and OUT/<name>.psf.npy (float32, sum 1)")
    pred.add_argument("--format", choices=("same", "png", "jpeg", "webp"), default="same",
                      help="output format (default: as the input; PNG for TIFF/BMP/GIF inputs)")
    pred.add_argument("--tile-size", type=int, default=None, help="tile size (default: the model's tiling)")
    pred.add_argument("--overlap", type=int, default=None, help="tile overlap (default: the model's tiling)")
    pred.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    pred.add_argument("--threads", type=int, default=None,
                      help="CPU threads (default: the model's serving setting; with --psf: all cores)")
    pred.add_argument("--params", type=Path, default=Path("params.yaml"),
                      help="tiling for a models:/ URI whose model carries none (default params.yaml)")
    pred.set_defaults(run=_predict)

    # listed for --help; main() hands its arguments, --help included, to deblur.service
    commands.add_parser("serve", add_help=False,
                        help="serve the HTTP API and web page (deblur.service: --host, --port, --model-dir)")

    one = commands.add_parser(
        "import-checkpoint", help="register an official NAFNet checkpoint (.pth) through the promotion gate",
        description="Convert an official NAFNet checkpoint (megvii-research/NAFNet, BasicSR layout: 'params' / "
                    "'params_ema'; architecture read from its keys), log it as an MLflow run tagged with its file "
                    "name, sha256 and licence, score it on the test split and register it through the gate "
                    "(documentation/models.md, 'Bring proven weights'). A file already registered (same sha256) "
                    "is left alone.")
    one.add_argument("file", type=Path, help="the official .pth file (download it by hand)")
    one.add_argument("--name", default=None, help="name of the import (default: the file name without suffix)")
    one.add_argument("--licence", default="unknown", help="licence of the weights, recorded as a tag (official: MIT)")
    one.add_argument("--train-patch-size", type=int, default=256,
                     help="patch size the weights were trained on; sets the TLC window (default 256, official)")
    one.add_argument("--padding", choices=("zeros", "reflect"), default="zeros",
                     help="how inputs are padded to a multiple of 16 (zeros: exactly the official model)")
    one.add_argument("--param-key", choices=("params", "params_ema"), default=None,
                     help="which weights of the file (default: params if present, else params_ema)")
    one.add_argument("--params", type=Path, default=Path("params.yaml"))
    one.add_argument("--pairs", type=Path, default=Path("data/pairs"), help="pairs whose test split scores the import")
    one.add_argument("--reports", type=Path, default=Path("reports/imported"),
                     help="the converted checkpoint and its evaluation go to REPORTS/NAME/")
    one.add_argument("--serving-dir", type=Path, default=DEFAULT_MODEL_DIR)
    one.set_defaults(run=_import_checkpoint)

    merge = commands.add_parser(
        "merge-lora", help="fold a LoRA adapter into its base model: a plain checkpoint (documentation/diffusion.md)",
        description="Merge a LoRA adapter (train.lora) into its base model's weights (peft's merge_and_unload) and "
                    "write a plain deblur checkpoint, with the same outputs and no adapter overhead.")
    merge.add_argument("--adapter", required=True,
                       help="a registered adapter version (models:/<name>/<version> or @<alias>; MLFLOW_TRACKING_URI), "
                            "an adapter folder (adapter_config.json + adapter_model.safetensors) or a LoRA training "
                            "checkpoint (.pt)")
    merge.add_argument("--base", default=None,
                       help="the base checkpoint or models:/ URI (default: the one the adapter names)")
    merge.add_argument("-o", "--out", type=Path, required=True, help="the merged checkpoint (.pt) to write")
    merge.set_defaults(run=_merge_lora)

    # listed for --help; main() hands its arguments, --help included, to deblur.cli.import_pretrained
    commands.add_parser("import-pretrained", add_help=False,
                        help="import the shipped checkpoints' runs, optionally register one (deblur.cli.import_pretrained)")
    return top


def main(argv: list[str] | None = None) -> int:
    prefer_passive_openmp()   # before torch loads: OpenMP threads sleep instead of spinning on shared cores
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from deblur.service import server   # lazy: the HTTP service's modules only

        server.main(argv[1:])
        return 0
    if argv[:1] == ["import-pretrained"]:
        from deblur.cli import import_pretrained   # lazy: this subcommand's modules only

        return import_pretrained.main(argv[1:])
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
