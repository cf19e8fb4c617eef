"""The torch-free serving runtime (deblur.artifact.onnx_model): export, tiling, servers and the Function package without torch."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deblur.models.nafnet import LocalAvgPool2d
from deblur.models.build import model_from_checkpoint
from deblur.artifact.onnx_model import (ONNX_FILE, OnnxServingModel, _session, export_onnx, exportable, load_onnx_serving_model, tiled_deblur)
from deblur.artifact.meta import ServingError, read_artifact_meta
from deblur.artifact.torch_model import ServingModel, load_serving_model
from deblur.core.tile_grid import axis_total, feather_ramp
from deblur.inference.tiling import axis_total as _axis_total
from deblur.inference.tiling import deblur_array, tiled_inference
from deblur.inference.tiling import feather_ramp as torch_feather_ramp
from serving_support import PARAMS, ROOT, encode, make_artifact, make_checkpoint, running_server, smooth_rgb

sys.path.insert(0, str(ROOT / "scripts"))
from build_function_package import build_package  # noqa: E402

BLOCK_TORCH = 'import sys\nsys.modules["torch"] = None\n'
TINY_NAFNET = {"width": 8, "enc_blocks": (1, 1), "dec_blocks": (1, 1), "middle_blocks": 1}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory) -> Path:
    """A tiny conv model exported with serving.runtime onnx: model.pt, model.onnx and model.json."""
    return make_artifact(tmp_path_factory.mktemp("onnx"), serving={"runtime": "onnx"})


@pytest.fixture(scope="module")
def no_torch_path(tmp_path_factory) -> str:
    """A PYTHONPATH entry whose sitecustomize makes ``import torch`` fail in every process started with it."""
    folder = tmp_path_factory.mktemp("block_torch")
    (folder / "sitecustomize.py").write_text(BLOCK_TORCH)
    return str(folder)


def test_numpy_ramps_and_totals_equal_torch_tilings():
    for length, overlap in [(288, 32), (64, 31), (100, 0), (17, 8), (1024, 128)]:
        for sides in [(False, False), (True, False), (False, True), (True, True)]:
            np.testing.assert_allclose(feather_ramp(length, overlap, *sides),
                                       torch_feather_ramp(length, overlap, *sides).numpy(), rtol=0, atol=1.2e-7)
    starts = [0, 224, 448, 672]
    np.testing.assert_allclose(axis_total(960, starts, 288, 32), _axis_total(960, starts, 288, 32).numpy(),
                               rtol=0, atol=3e-7)


@pytest.mark.parametrize("height,width,tile,overlap,batch,align", [
    (90, 120, 64, 8, 1, 1), (97, 131, 48, 16, 3, 4), (40, 300, 64, 31, 2, 16), (8, 8, 288, 32, 1, 16),
])
def test_numpy_tiling_gives_the_torch_tiling_pixels_exactly(height, width, tile, overlap, batch, align):
    """Same model call on both sides: any difference would come from the tiling code alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Sigmoid()).eval()
    rgb = smooth_rgb(height, width, seed=3)
    calls_torch, calls_numpy = [], []
    expected = tiled_inference(model, torch.from_numpy(rgb).permute(2, 0, 1)[None], tile, overlap, batch, align=align,
                               on_batch=lambda *call: calls_torch.append(call[:2]))
    expected = expected[0].mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).numpy()

    def run(tiles: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(tiles)).numpy()

    got = tiled_deblur(run, rgb, tile, overlap, batch, align, on_batch=lambda *call: calls_numpy.append(call[:2]))
    assert np.array_equal(got, expected)
    assert calls_numpy == calls_torch and len(calls_numpy) >= 1


def test_local_pooling_outside_export_is_bit_identical_to_before():
    """The export-only branch of LocalAvgPool2d leaves torch-mode outputs (the pipeline's metrics) unchanged."""
    def before(pool: LocalAvgPool2d, x: torch.Tensor) -> torch.Tensor:   # the forward as it was
        h, w = x.shape[-2:]
        if pool.window >= h and pool.window >= w:
            return x.mean(dim=(-2, -1), keepdim=True)
        kh, kw = min(h, pool.window), min(w, pool.window)
        xf = x.float()
        mean = xf.mean(dim=(-2, -1), keepdim=True)
        s = F.pad((xf - mean).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        box = s[..., kh:, kw:] - s[..., :-kh, kw:] - s[..., kh:, :-kw] + s[..., :-kh, :-kw]
        out = box / (kh * kw) + mean
        dh, dw = h - out.shape[-2], w - out.shape[-1]
        return F.pad(out, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="replicate").to(x.dtype)

    generator = torch.Generator().manual_seed(0)
    pool = LocalAvgPool2d(24)
    for shape in [(1, 4, 16, 16), (2, 4, 24, 24), (1, 4, 40, 56), (1, 4, 20, 60), (1, 4, 70, 10)]:
        x = torch.rand(*shape, generator=generator)
        assert torch.equal(pool(x), before(pool, x)), shape


def test_exported_model_gives_the_torch_pixels_on_a_720p_image(onnx_artifact):
    meta = read_artifact_meta(onnx_artifact)   # model.json with runtime.json merged in
    assert (onnx_artifact / ONNX_FILE).is_file() and meta["onnx"]["file"] == ONNX_FILE
    assert min(meta["onnx"]["check_psnr_db"].values()) >= 60
    assert set(meta["speed_prior"]) == {"torch", "onnx"} and meta["onnx"]["export_seconds"] > 0
    runtime = json.loads((onnx_artifact / "runtime.json").read_text())   # what differs on every export
    assert set(runtime["speed_prior"]) == {"torch", "onnx"} and set(runtime["onnx"]) == {"export_seconds"}
    assert "export_seconds" not in json.loads((onnx_artifact / "model.json").read_text())["onnx"]
    torch_model, onnx_model = load_serving_model(onnx_artifact, threads=1), load_onnx_serving_model(onnx_artifact, 1)
    assert (onnx_model.name, onnx_model.version, onnx_model.alias) == ("deblur-test", "7", "champion")
    assert onnx_model.architecture == torch_model.architecture and not onnx_model.samples
    rgb = smooth_rgb(720, 1280)
    assert psnr(onnx_model.deblur(rgb), torch_model.deblur(rgb)) >= 60
    batches = []
    small = onnx_model.deblur(rgb[:100, :150], tile_size=64, overlap=8, on_batch=lambda *call: batches.append(call))
    assert psnr(small, torch_model.deblur(rgb[:100, :150], tile_size=64, overlap=8)) >= 60
    assert len(batches) == 2 * 3 and all(b[:2] == (1, 64 * 64) for b in batches)

    def cancel(*_):
        raise TimeoutError("cancelled")

    with pytest.raises(TimeoutError):
        onnx_model.deblur(rgb, on_batch=cancel)
    with pytest.raises(ValueError, match="half of tile_size"):
        onnx_model.deblur(rgb, tile_size=64, overlap=32)


def test_unet_exports_and_matches_torch(tmp_path):
    model = model_from_checkpoint(make_checkpoint(tmp_path / "unet.pt", "unet", base_channels=8, levels=2,
                                                  bottleneck_channels=16, groups=4))
    info = export_onnx(model, tmp_path / ONNX_FILE, check_tile=96)
    assert info["size_multiple"] == model.size_multiple == 4 and min(info["check_psnr_db"].values()) >= 60
    served = OnnxServingModel(session=_session(tmp_path / ONNX_FILE, 1), meta={"onnx": info}, tiling=PARAMS.tiling,
                              size_multiple=info["size_multiple"])
    rgb = smooth_rgb(150, 170)
    assert served.architecture == "UNet"
    assert psnr(served.deblur(rgb, 96, 16), deblur_array(model, rgb, (96, 16, 2))) >= 60


@pytest.mark.slow
def test_tiny_nafnet_with_tlc_exports_for_tiles_larger_than_its_pooling_window(tmp_path):
    """The export example (16x16) is smaller than the TLC window (1.5 x 96 = 144): a traced branch
    would pool globally on every tile; 288-pixel tiles must pool locally as torch does."""
    ckpt_path = make_checkpoint(tmp_path / "checkpoint.pt", "nafnet", **TINY_NAFNET)
    ckpt = torch.load(ckpt_path, weights_only=False)
    # random beta/gamma: a fresh NAFNet's blocks are identities and would hide any pooling difference
    generator = torch.Generator().manual_seed(1)
    for key, value in ckpt["state_dict"].items():
        if key.endswith(("beta", "gamma", "ending.weight")):
            ckpt["state_dict"][key] = torch.randn(value.shape, generator=generator) * 0.5
    model = model_from_checkpoint(ckpt)
    info = export_onnx(model, tmp_path / ONNX_FILE, check_tile=PARAMS.tiling.tile_size)
    assert info["size_multiple"] == 4 and min(info["check_psnr_db"].values()) >= 60
    served_onnx = OnnxServingModel(session=_session(tmp_path / ONNX_FILE, 1), meta={"onnx": info},
                                   tiling=PARAMS.tiling, size_multiple=4)
    served_torch = ServingModel(model=model, meta={}, tiling=PARAMS.tiling)
    rgb = smooth_rgb(720, 1280)
    torch_out = served_torch.deblur(rgb)
    assert psnr(served_onnx.deblur(rgb), torch_out) >= 60
    model.use_global_pooling()   # what an export fixed to the example's branch computes: fails the 60 dB bar
    assert psnr(served_torch.deblur(rgb), torch_out) < 58


def test_diffusion_models_have_no_onnx_form_and_say_so(tmp_path, onnx_artifact):
    assert [exportable(a) for a in ("nafnet", "unet", "stacked_conv", "diffusion_refiner", "controlnet_sd")] == [
        True, True, True, False, False]
    torch_only = make_artifact(tmp_path)   # serving.runtime torch: no model.onnx
    assert not (torch_only / ONNX_FILE).exists()
    with pytest.raises(ServingError, match="exported when serving.runtime is onnx"):
        load_onnx_serving_model(torch_only)
    meta = json.loads((torch_only / "model.json").read_text())
    (torch_only / "model.json").write_text(json.dumps({**meta, "architecture": "diffusion_refiner"}))
    with pytest.raises(ServingError, match="diffusion models have no ONNX form"):
        load_onnx_serving_model(torch_only)


def png_pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def test_server_without_torch_serves_the_torch_pixels(onnx_artifact, no_torch_path):
    rgb = smooth_rgb(300, 410, seed=5)
    expected = load_serving_model(onnx_artifact, threads=1).deblur(rgb)
    with running_server(onnx_artifact, env={"PYTHONPATH": no_torch_path}) as server:
        health = httpx.get(f"{server.url}/api/health", timeout=10).json()
        assert health["ready"] and health["model"]["runtime"] == "onnx", health
        reply = httpx.post(f"{server.url}/api/deblur?format=png", content=encode(Image.fromarray(rgb), "PNG"),
                           headers={"Content-Type": "image/png"}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert psnr(png_pixels(reply.content), expected) >= 60
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        assert "onnxruntime" in maps and "libtorch" not in maps


def test_onnx_runtime_falls_back_to_torch_or_fails_clearly_without_model_onnx(tmp_path, no_torch_path):
    artifact = make_artifact(tmp_path, name="stacked_conv", channels=4, depth=2)
    meta = json.loads((artifact / "model.json").read_text())
    meta["serving"]["runtime"] = "onnx"   # but no model.onnx: as a diffusion model's artifact
    (artifact / "model.json").write_text(json.dumps(meta))
    image = encode(Image.fromarray(smooth_rgb(40, 56)), "PNG")
    with running_server(artifact) as server:
        assert httpx.get(f"{server.url}/api/health", timeout=10).json()["model"]["runtime"] == "torch"
        assert httpx.post(f"{server.url}/api/deblur", content=image, timeout=60).status_code == 200
        assert "falling back to the torch runtime" in server.log()
    with running_server(artifact, env={"PYTHONPATH": no_torch_path}, need_model=False) as server:
        health = httpx.get(f"{server.url}/api/health", timeout=10).json()
        assert not health["ready"] and "no model.onnx" in health["error"] and "torch cannot be imported" in health["error"]
        reply = httpx.post(f"{server.url}/api/deblur", content=image, timeout=60)
        assert reply.status_code == 503 and reply.json()["error"] == "model_unavailable"


FUNCTION_CALL = textwrap.dedent("""
    import asyncio, json, sys
    import azure.functions as func
    import deblur, function_app

    assert deblur.__file__.startswith(sys.argv[1]), deblur.__file__
    handler = function_app.app.get_functions()[0].get_user_function()
    image = open(sys.argv[2], "rb").read()

    async def main():
        deblurred = await handler(func.HttpRequest(
            "POST", "http://localhost:7071/api/deblur?format=png", body=image,
            headers={"Content-Type": "image/png"}), None)
        health = await handler(func.HttpRequest("GET", "http://localhost:7071/api/health", body=b""), None)
        await function_app.app.middleware.notify_shutdown()
        return deblurred, health

    deblurred, health = asyncio.run(main())
    open(sys.argv[3], "wb").write(deblurred.get_body())
    print(json.dumps({"status": deblurred.status_code, "health": json.loads(health.get_body()),
                      "torch": sys.modules.get("torch", "absent") is None}))
""")


def test_onnx_function_package_runs_without_torch(tmp_path, no_torch_path):
    """--runtime onnx from a torch-only artifact: model.onnx exported into the package, no model.pt,
    requirements without torch; its handler serves the torch pixels in a process that cannot import torch."""
    torch_only = make_artifact(tmp_path / "a")
    package = build_package(tmp_path / "pkg", torch_only, runtime="onnx")
    assert sorted(p.name for p in (package / "model").iterdir()) == ["model.json", ONNX_FILE, "runtime.json"]
    assert json.loads((package / "model" / "model.json").read_text())["serving"]["runtime"] == "onnx"
    runtime = json.loads((package / "model" / "runtime.json").read_text())   # the artifact's, plus the ONNX prior
    assert set(runtime["speed_prior"]) == {"torch", "onnx"} and runtime["run_id"] == "run123"
    assert "speed_prior" not in json.loads((package / "model" / "model.json").read_text())
    requirements = [line for line in (package / "requirements.txt").read_text().splitlines() if "==" in line]
    assert any(line.startswith("onnxruntime==") for line in requirements)
    assert not any(line.startswith("torch") for line in requirements)
    assert not (torch_only / ONNX_FILE).exists()   # the artifact itself is left as it was
    rgb = smooth_rgb(64, 96, seed=2)
    photo, result = tmp_path / "photo.png", tmp_path / "out.png"
    photo.write_bytes(encode(Image.fromarray(rgb), "PNG"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBLUR_")}
    env["PYTHONPATH"] = os.pathsep.join([no_torch_path, str(package)])
    run = subprocess.run([sys.executable, "-c", FUNCTION_CALL, str(package), str(photo), str(result)],
                         cwd=package, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["status"] == 200 and report["torch"] is True
    assert report["health"]["model"]["runtime"] == "onnx"
    expected = load_serving_model(torch_only, threads=1).deblur(rgb)
    assert psnr(png_pixels(result.read_bytes()), expected) >= 60
    torch_package = build_package(tmp_path / "pkg", torch_only, runtime="torch")
    assert sorted(p.name for p in (torch_package / "model").iterdir()) == ["model.json", "model.pt", "runtime.json"]
    assert "torch==" in (torch_package / "requirements.txt").read_text()


def test_function_requirement_sets_pin_what_the_project_installs():
    def pins(path: Path) -> dict[str, str]:
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        return {n.lower(): v.split("+")[0] for n, v in (line.split("==") for line in lines if line and "==" in line)}

    project = pins(ROOT / "requirements.txt")
    onnx = pins(ROOT / "function_app" / "requirements-onnx.txt")
    assert "torch" not in onnx and {"onnxruntime", "numpy", "pillow", "fastapi", "azure-functions"} <= set(onnx)
    assert {name: project.get(name) for name in onnx} == onnx
    assert set(pins(ROOT / "function_app" / "requirements.txt")) - {"torch"} == set(onnx) - {"onnxruntime"}
