"""The ``deblur`` command (also ``python -m deblur``): model import commands.

    deblur import-checkpoint NAFNet-GoPro-width32.pth --licence MIT   # official weights -> gate
    deblur import-pretrained [--register checkpoints/pretrained/nafnet16.pt]

Kept apart from ``deblur.cli`` (imported by every pipeline script) so that the stages' code
dependencies do not grow by the import commands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deblur.cli import fail_cleanly


def _import_checkpoint(args: argparse.Namespace) -> int:
    from deblur.import_pretrained import import_official

    return fail_cleanly(import_official, args.file, args.name, args.licence, args.params, args.pairs, args.reports,
                        args.serving_dir, args.padding, args.train_patch_size, args.param_key)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="deblur", description="Single-image deblurring: model import commands "
                                  "(the pipeline itself runs with `dvc repro`, see README.md).")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    one.add_argument("--serving-dir", type=Path, default=Path("function_app/model"))
    one.set_defaults(run=_import_checkpoint)

    # listed for --help; main() hands its arguments, --help included, to deblur.import_pretrained
    commands.add_parser("import-pretrained", add_help=False,
                        help="import the shipped checkpoints' runs, optionally register one (deblur.import_pretrained)")
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["import-pretrained"]:
        from deblur import import_pretrained

        return import_pretrained.main(argv[1:])
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
