"""Assemble a deployable Azure Functions folder: function_app/ files + src/deblur + the serving model.

    python scripts/build_function_package.py --out build/function_app [--model-dir function_app/model] \
        [--runtime torch|onnx]

``--runtime`` (default: the artifact's ``serving.runtime``) picks what the package runs the
model with: ``torch`` ships model.pt and function_app/requirements.txt (torch); ``onnx`` ships
model.onnx and function_app/requirements-onnx.txt (onnxruntime, no torch), exporting
model.onnx into the package first when the artifact has none (that needs torch here). The
result runs with ``func start`` inside it and deploys with
``func azure functionapp publish <app>`` (remote build installs requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_FILES = ("function_app.py", "host.json", ".funcignore", "local.settings.example.json")
MODEL_FILES = {"torch": ("model.json", "model.pt"), "onnx": ("model.json", "model.onnx")}
RUNTIME_FILE = "runtime.json"   # the speed prior measured at export, the run id (deblur.artifact.meta): shipped when present
REQUIREMENTS = {"torch": "requirements.txt", "onnx": "requirements-onnx.txt"}   # in function_app/
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


class PackageError(RuntimeError):
    """The package cannot be built; the message says what is missing."""


def build_package(out: Path, model_dir: Path, params: Path = ROOT / "params.yaml", runtime: str | None = None) -> Path:
    """Write the package folder ``out`` (replacing a previous build there) and return it."""
    missing = [name for name in MODEL_FILES["torch"] if not (model_dir / name).is_file()]
    if missing and not all((model_dir / name).is_file() for name in MODEL_FILES["onnx"]):
        raise PackageError(f"{model_dir}: no serving model ({', '.join(missing)} missing); run the register "
                           "stage (dvc repro) or pass --model-dir")
    meta = json.loads((model_dir / "model.json").read_text())
    runtime = runtime or meta["serving"].get("runtime", "torch")
    if runtime not in MODEL_FILES:
        raise PackageError(f"--runtime {runtime!r}: expected one of {sorted(MODEL_FILES)}")
    if runtime == "torch" and missing:
        raise PackageError(f"{model_dir}: no model.pt for a torch package; build with --runtime onnx")
    if out.exists():
        if not (out / "function_app.py").is_file():
            raise PackageError(f"{out} exists and is not a previous package build; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in APP_FILES:
        shutil.copy2(ROOT / "function_app" / name, out / name)
    shutil.copy2(ROOT / "function_app" / REQUIREMENTS[runtime], out / "requirements.txt")
    shutil.copytree(ROOT / "src" / "deblur", out / "deblur", ignore=IGNORED)
    package_model = out / "model"
    package_model.mkdir()
    for name in (*MODEL_FILES[runtime], RUNTIME_FILE):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, package_model / name)
    if runtime == "onnx" and not (package_model / "model.onnx").is_file():
        meta = _export_onnx_into(package_model, model_dir, meta)
    meta["serving"]["runtime"] = runtime
    (package_model / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.copy2(params, out / "params.yaml")
    return out


def _export_onnx_into(package_model: Path, model_dir: Path, meta: dict) -> dict:
    """Export ``model_dir``'s model.pt to ``package_model/model.onnx``; returns the updated model.json
    metadata, and writes what the export measured (ONNX speed prior, export seconds) to the package's runtime.json."""
    try:
        from deblur.core.config import ServingConfig, TilingConfig
        from deblur.artifact.export import add_onnx_model
        from deblur.artifact.meta import merge_runtime_fields, read_runtime_fields, split_runtime_fields, \
            write_artifact_meta
        from deblur.artifact.onnx_model import exportable
    except ImportError as err:
        raise PackageError(f"exporting model.onnx needs the project's environment ({err})") from err
    if not exportable(str(meta.get("architecture"))):
        raise PackageError(f"{model_dir}: a {meta.get('architecture')} model has no ONNX form; build with --runtime torch")
    staging = package_model / "model.pt"
    shutil.copy2(model_dir / "model.pt", staging)
    try:
        meta = merge_runtime_fields(meta, read_runtime_fields(model_dir))
        add_onnx_model(package_model, meta, TilingConfig.model_validate(meta["tiling"]),
                       ServingConfig.model_validate(meta["serving"]))
    finally:
        staging.unlink()
    write_artifact_meta(package_model, meta)   # runtime.json: the source's fields and the ONNX ones measured here
    return split_runtime_fields(meta)[0]


def folder_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "function_app")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "function_app" / "model")
    parser.add_argument("--runtime", choices=sorted(MODEL_FILES), default=None,
                        help="torch | onnx (default: the artifact's serving.runtime)")
    args = parser.parse_args(argv)
    try:
        out = build_package(args.out, args.model_dir, runtime=args.runtime)
    except PackageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    runtime = json.loads((out / "model" / "model.json").read_text())["serving"]["runtime"]
    print(f"function package ({runtime} runtime): {out} ({folder_size_mb(out):.1f} MB); deploy with "
          f"`cd {out} && func azure functionapp publish <app-name>`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
