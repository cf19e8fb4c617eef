"""Assemble a deployable Azure Functions folder: function_app/ files + src/deblur + the serving model.

    python scripts/build_function_package.py --out build/function_app [--model-dir function_app/model]

The result runs with ``func start`` inside it and deploys with
``func azure functionapp publish <app>`` (remote build installs requirements.txt).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_FILES = ("function_app.py", "host.json", "requirements.txt", ".funcignore", "local.settings.example.json")
MODEL_FILES = ("model.json", "model.pt")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


class PackageError(RuntimeError):
    """The package cannot be built; the message says what is missing."""


def build_package(out: Path, model_dir: Path, params: Path = ROOT / "params.yaml") -> Path:
    """Write the package folder ``out`` (replacing a previous build there) and return it."""
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise PackageError(f"{model_dir}: no serving model ({', '.join(missing)} missing); run the register "
                           "stage (dvc repro) or pass --model-dir")
    if out.exists():
        if not (out / "function_app.py").is_file():
            raise PackageError(f"{out} exists and is not a previous package build; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in APP_FILES:
        shutil.copy2(ROOT / "function_app" / name, out / name)
    shutil.copytree(ROOT / "src" / "deblur", out / "deblur", ignore=IGNORED)
    (out / "model").mkdir()
    for name in MODEL_FILES:
        shutil.copy2(model_dir / name, out / "model" / name)
    shutil.copy2(params, out / "params.yaml")
    return out


def folder_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "function_app")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "function_app" / "model")
    args = parser.parse_args(argv)
    try:
        out = build_package(args.out, args.model_dir)
    except PackageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"function package: {out} ({folder_size_mb(out):.1f} MB); deploy with "
          f"`cd {out} && func azure functionapp publish <app-name>`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
