"""Serving artifacts (export/load), the registry path, and the Azure Functions package."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deblur.models.build import model_from_checkpoint
from deblur.core.imageio import decode_image
from deblur.artifact.export import export_serving_artifact
from deblur.artifact.meta import META_FILE, RUNTIME_FILE, WEIGHTS_FILE, ServingError, read_artifact_meta
from deblur.artifact.torch_model import load_serving_model
from deblur.inference.tiling import deblur_array
from deblur.service.server import MALLOC_ENV
from serving_support import PARAMS, ROOT, encode, make_artifact, make_checkpoint, running_server, smooth_rgb

sys.path.insert(0, str(ROOT / "scripts"))
from build_function_package import PackageError, build_package  # noqa: E402


def test_export_then_load_gives_the_checkpoint_model_and_metadata(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt", "stacked_conv", channels=8, depth=3)
    meta = {"name": "deblur", "version": "3", "alias": "champion", "run_id": "abc", "metrics": {"psnr": 28.1}}
    out = export_serving_artifact(ckpt, tmp_path / "model", meta, tiling=PARAMS.tiling, serving=PARAMS.serving)
    assert sorted(p.name for p in out.iterdir()) == [META_FILE, WEIGHTS_FILE, RUNTIME_FILE]
    served = load_serving_model(out, threads=1)
    assert (served.name, served.version, served.alias) == ("deblur", "3", "champion")
    assert served.meta["run_id"] == "abc" and served.meta["exported_at"]      # from runtime.json
    assert served.meta["architecture"] == "stacked_conv" and served.meta["metrics"] == {"psnr": 28.1}
    assert served.tiling == PARAMS.tiling and not served.model.training
    assert torch.get_num_threads() == 1
    rgb = smooth_rgb(90, 120)
    expected = deblur_array(model_from_checkpoint(ckpt), rgb, PARAMS.tiling)
    assert np.array_equal(served.deblur(rgb), expected)
    assert np.array_equal(served.deblur(decode_image(encode(Image.fromarray(rgb), "PNG"))), expected)
    assert served.deblur(rgb, tile_size=64, overlap=8).shape == rgb.shape


def test_fp16_export_halves_the_weights_and_stays_close(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt", "stacked_conv")
    fp32 = export_serving_artifact(ckpt, tmp_path / "fp32", {}, tiling=PARAMS.tiling, serving=PARAMS.serving)
    fp16 = export_serving_artifact(ckpt, tmp_path / "fp16", {}, tiling=PARAMS.tiling,
                                   serving=PARAMS.serving.model_copy(update={"weights_dtype": "fp16"}))
    assert (fp16 / WEIGHTS_FILE).stat().st_size < 0.6 * (fp32 / WEIGHTS_FILE).stat().st_size
    rgb = smooth_rgb(64, 80)
    a, b = load_serving_model(fp32).deblur(rgb), load_serving_model(fp16).deblur(rgb)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert load_serving_model(fp16).name == "unregistered"


def test_export_replaces_the_folder_whole(tmp_path):
    out = make_artifact(tmp_path)
    (out / "stale.txt").write_text("from an older export")
    make_artifact(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [META_FILE, WEIGHTS_FILE, RUNTIME_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "model"]


def _dvc_hash(folder: Path, repo: Path) -> str:
    """DVC's md5 of ``folder`` as the register stage's out ``function_app/model`` in a fresh repo ``repo``
    with the project's .dvcignore (``dvc add`` of a copy there)."""
    import shutil

    dvc = str(Path(sys.executable).parent / "dvc")
    repo.mkdir()
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    shutil.copytree(folder, repo / "function_app" / "model")
    for args in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "config", "core.analytics", "false"],
                 [dvc, "add", "-q", "function_app/model"]):
        proc = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return (repo / "function_app" / "model.dvc").read_text().split("md5: ")[1].split()[0]


def test_two_exports_of_one_model_give_the_same_model_json_and_dvc_hash(tmp_path):
    """What differs on every export (time, run id, speed prior timed here) is in runtime.json, which DVC
    ignores: the register stage's out has the same hash on every fresh run (the committed dvc.lock)."""
    ckpt = make_checkpoint(tmp_path / "c.pt", "stacked_conv", channels=8, depth=3)
    outs = []
    for name, run_id in (("a", "run-a"), ("b", "run-b")):
        meta = {"name": "deblur", "version": "3", "alias": "champion", "run_id": run_id, "metrics": {"psnr": 28.1}}
        outs.append(export_serving_artifact(ckpt, tmp_path / name, meta, tiling=PARAMS.tiling, serving=PARAMS.serving))
    a, b = outs
    assert (a / META_FILE).read_bytes() == (b / META_FILE).read_bytes()
    assert (a / WEIGHTS_FILE).read_bytes() == (b / WEIGHTS_FILE).read_bytes()
    model_json = json.loads((a / META_FILE).read_text())
    assert not {"exported_at", "run_id", "speed_prior"} & set(model_json) and model_json["version"] == "3"
    for out, run_id in ((a, "run-a"), (b, "run-b")):
        runtime = json.loads((out / RUNTIME_FILE).read_text())
        assert set(runtime) == {"exported_at", "run_id", "speed_prior"} and runtime["run_id"] == run_id
        assert runtime["speed_prior"]["torch"]["batch"]["per_pixel"] > 0
        assert read_artifact_meta(out)["speed_prior"] == runtime["speed_prior"]   # merged back for the service
    hash_a = _dvc_hash(a, tmp_path / "repo_a")
    assert hash_a.endswith(".dir") and hash_a == _dvc_hash(b, tmp_path / "repo_b")
    (a / RUNTIME_FILE).unlink()          # what a `dvc pull` brings: the same out, no runtime.json
    assert _dvc_hash(a, tmp_path / "repo_pulled") == hash_a


def test_missing_or_broken_artifacts_raise_serving_errors(tmp_path):
    with pytest.raises(ServingError, match="DEBLUR_MODEL_DIR"):
        load_serving_model(tmp_path / "nothing")
    out = make_artifact(tmp_path)
    (out / WEIGHTS_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ServingError, match="model.pt"):
        load_serving_model(out)
    (out / META_FILE).write_text("{broken")
    with pytest.raises(ServingError, match="unreadable"):
        read_artifact_meta(out)


def test_tiling_overrides_are_validated(tmp_path):
    served = load_serving_model(make_artifact(tmp_path))
    assert served.tiling_for(tile_size=128).tile_size == 128
    with pytest.raises(ValueError, match="half of tile_size"):
        served.tiling_for(tile_size=64, overlap=32)


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("--"):
            name, version = line.split("==")
            pins[name.lower()] = version.split("+")[0]
    return pins


def test_function_requirements_pin_the_versions_the_project_installs():
    """The Function's pins equal requirements.txt's (what `make install` and CI install), so what is
    deployed is what the tests ran; compared file to file, not to the installed packages, so a new
    upstream release of an unpinned dependency cannot fail a fresh install."""
    function_pins = _pins(ROOT / "function_app" / "requirements.txt")
    project_pins = _pins(ROOT / "requirements.txt")
    assert {"azure-functions", "torch", "fastapi", "pillow", "numpy", "pydantic", "python-multipart"} <= set(function_pins)
    for name, version in function_pins.items():
        assert project_pins.get(name) == version, (f"{name}: function_app/requirements.txt pins {version}, "
                                                   f"requirements.txt {project_pins.get(name, 'does not pin it')}")


def test_function_settings_match_the_app_routes_and_allocator_settings():
    host = json.loads((ROOT / "function_app" / "host.json").read_text())
    assert host["extensions"]["http"]["routePrefix"] == "api"
    settings = json.loads((ROOT / "function_app" / "local.settings.example.json").read_text())
    assert settings["Values"]["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert MALLOC_ENV.items() <= settings["Values"].items()
    assert all(f"{k}={v}" in (ROOT / "documentation" / "serving.md").read_text() for k, v in MALLOC_ENV.items())


def test_package_build_refuses_a_missing_model_or_a_foreign_folder(tmp_path):
    with pytest.raises(PackageError, match="no serving model"):
        build_package(tmp_path / "pkg", tmp_path / "no-model")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a package")
    with pytest.raises(PackageError, match="not a previous package build"):
        build_package(foreign, make_artifact(tmp_path / "a"))
    assert (foreign / "keep.txt").exists()


FUNCTION_CALL = textwrap.dedent("""
    import asyncio, io, json, sys
    import azure.functions as func
    import deblur, function_app

    assert deblur.__file__.startswith(sys.argv[1]), deblur.__file__
    function = function_app.app.get_functions()[0]
    handler = function.get_user_function()
    image = open(sys.argv[2], "rb").read()

    async def main():
        health = await handler(func.HttpRequest("GET", "http://localhost:7071/api/health", body=b""), None)
        deblurred = await handler(func.HttpRequest(
            "POST", "http://localhost:7071/api/deblur?format=png", body=image,
            headers={"Content-Type": "image/jpeg"}), None)
        empty = await handler(func.HttpRequest("POST", "http://localhost:7071/api/deblur", body=b""), None)
        await function_app.app.middleware.notify_shutdown()
        return health, deblurred, empty

    health, deblurred, empty = asyncio.run(main())
    open(sys.argv[3], "wb").write(deblurred.get_body())
    print(json.dumps({
        "binding": json.loads(function.get_function_json())["bindings"][0],
        "health": json.loads(health.get_body()),
        "status": deblurred.status_code, "mimetype": deblurred.mimetype,
        "model_name": deblurred.headers.get("X-Model-Name"),
        "empty": [empty.status_code, json.loads(empty.get_body())],
    }))
""")


def test_function_package_imports_standalone_and_its_handler_deblurs(tmp_path):
    package = build_package(tmp_path / "pkg", make_artifact(tmp_path / "a"))
    assert {"function_app.py", "host.json", "requirements.txt", ".funcignore", "deblur", "model", "params.yaml"} <= {
        p.name for p in package.iterdir()}
    assert (package / "deblur" / "static" / "index.html").is_file()
    assert not list(package.rglob("__pycache__"))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(encode(Image.fromarray(smooth_rgb(48, 64)), "JPEG"))
    result = tmp_path / "out.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBLUR_")}
    env["PYTHONPATH"] = str(package)
    run = subprocess.run([sys.executable, "-c", FUNCTION_CALL, str(package), str(photo), str(result)],
                         cwd=package, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["binding"]["route"] == "/{*route}" and report["binding"]["authLevel"] == "FUNCTION"
    assert report["health"]["model_source"] == str(package / "model")
    assert report["status"] == 200 and report["mimetype"] == "image/png"
    assert report["model_name"] == "deblur-test"
    # the package ships runtime.json: the worker starts from the prior measured at export
    assert json.loads((package / "model" / RUNTIME_FILE).read_text())["run_id"] == "run123"
    assert report["health"]["admission"]["speed"]["prior_source"].startswith("runtime.json speed_prior[torch]")
    assert report["empty"][0] == 400 and report["empty"][1]["error"] == "empty_body"
    assert Image.open(result).size == (64, 48)


@pytest.mark.slow
def test_registry_model_uri_loads_in_the_library_and_the_server(tmp_path, mlflow_uri):
    import mlflow

    from deblur.tracking.pyfunc import SIGNATURE, DeblurPyfunc
    from deblur.tracking.registry_serving import load_from_model_uri

    mlflow.set_tracking_uri(mlflow_uri)
    ckpt = make_checkpoint(tmp_path / "checkpoint.pt", "stacked_conv", channels=8, depth=3)
    mlflow.set_experiment("serving-test")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=DeblurPyfunc(),
                                       artifacts={"checkpoint": str(ckpt)}, signature=SIGNATURE,
                                       model_config={"tiling": {"tile_size": 128, "overlap": 16, "batch_size": 2}},
                                       registered_model_name="deblur-uri-test")
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("deblur-uri-test", "champion", info.registered_model_version)

    served = load_from_model_uri("models:/deblur-uri-test@champion", PARAMS.tiling, threads=2)
    assert (served.name, served.alias, served.version) == ("deblur-uri-test", "champion", "1")
    assert served.tiling.tile_size == 128
    rgb = smooth_rgb(40, 50)
    assert np.array_equal(served.deblur(rgb), deblur_array(model_from_checkpoint(ckpt), rgb, served.tiling))

    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "DEBLUR_MODEL_URI": "models:/deblur-uri-test@champion"}
    with running_server(None, env=env) as server:
        import httpx

        response = httpx.post(f"{server.url}/api/deblur", content=encode(Image.fromarray(rgb), "PNG"), timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["X-Model-Alias"] == "champion" and response.headers["X-Tile-Size"] == "128"
        assert Image.open(io.BytesIO(response.content)).size == (50, 40)
