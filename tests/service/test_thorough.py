"""Kernel-aware serving: ``?mode=fast|thorough`` (default from the artifact), ``?return_psf=1``, the multipart
``psf`` part, their errors and their price in admission, against real ``python -m deblur.service`` processes;
and ``deblur predict --mode thorough --save-psf`` as a real subprocess. Images: a 256x256 crop of a real photo
(scikit-image's astronaut) shaken by a seeded camera-shake kernel as the synthesize stage draws them."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image

from deblur.data.blur import BlurSpec, apply_blur, motion_kernel
from deblur.evaluation.metrics import psnr
from deblur.psf.deconvolve import deconvolve
from deblur.psf.io import psf_to_png_bytes
from deblur.psf.metrics import kernel_ncc
from deblur.psf.restore import CANDIDATES
from deblur.artifact.torch_model import load_serving_model
from deblur.service.openapi import CANDIDATES as DOCUMENTED_CANDIDATES
from serving_support import PARAMS, encode, make_artifact, running_server, smooth_rgb

# Thorough requests take 2-3 s at 256x256 here; 30 s leaves room for a loaded machine. The budget (100 MiB)
# admits a 256x256 image in mode thorough (56 MB) but not a 512x512 one (158 MB), which mode fast takes (4 MB).
THOROUGH_SERVING = {"max_request_seconds": 30, "max_buffered_mb": 100}
SEED = 2   # its 11x11 kernel; other camera-shake kernels of that size score 0.29-0.73 NCC against one another
THOROUGH_GAIN_DB = 3.5   # over the blurred test photo; 3.9 measured with the shrink toward the input (input_shrink)


def shaken(sharp: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """``sharp`` blurred in linear light by a seeded 11-17 px camera-shake kernel, noise 0.002, 8 bits."""
    rng = np.random.default_rng(seed)
    motion = PARAMS.synthesize.motion.model_copy(update={"min_kernel_size": 11, "max_kernel_size": 17})
    kernel, _ = motion_kernel(rng, motion)
    return apply_blur(sharp, BlurSpec("motion", kernel, {"noise_sigma": 0.002}), PARAMS.synthesize, rng), kernel


@pytest.fixture(scope="module")
def photo():
    """(sharp, blurred, true kernel, blurred PNG bytes)."""
    sharp = np.ascontiguousarray(skimage.data.astronaut()[40:296, 120:376])
    blurred, kernel = shaken(sharp)
    return sharp, blurred, kernel, encode(Image.fromarray(blurred), "PNG")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("thorough")
    return {"thorough": make_artifact(folder / "new", serving=THOROUGH_SERVING,
                                      kernel_aware={"default_mode": "thorough"}),
            "old": make_artifact(folder / "old")}   # exported before kernel-aware restoration: no kernel_aware


@pytest.fixture(scope="module")
def thorough(artifacts):
    with running_server(artifacts["thorough"]) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def old(artifacts):
    with running_server(artifacts["old"]) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        client.server = server
        yield client


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def with_psf(png: bytes, psf: bytes, name: str = "kernel.npy") -> dict:
    return {"image": ("shaken.png", png, "image/png"), "psf": (name, psf, "application/octet-stream")}


def assert_error(response: httpx.Response, status: int, code: str, *mentions: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    for text in mentions:
        assert text in body["detail"], body["detail"]


def test_health_reports_each_artifacts_default_mode_and_prices(thorough, old):
    modes = thorough.get("/api/health").json()["modes"]
    assert modes["default"] == "thorough" and modes["available"] == ["fast", "thorough"]
    assert modes["unavailable"] is None
    assert modes["kernel_aware"]["max_kernel_size"] == PARAMS.kernel_aware.max_kernel_size
    health = old.get("/api/health").json()
    assert health["modes"]["default"] == "fast" and health["modes"]["available"] == ["fast"]
    assert health["modes"]["kernel_aware"] is None and "kernel_aware" in health["modes"]["unavailable"]
    priced = health["admission"]["speed"]["modes"]
    assert set(priced) == {"thorough", "psf"} and priced["thorough"]["seconds_720p"] > priced["psf"]["seconds_720p"] > 0
    assert health["admission"]["memory"]["mode_bytes_per_padded_pixel"]["thorough"] > health["admission"]["memory"][
        "bytes_per_pixel"]
    assert sorted(CANDIDATES) == sorted(DOCUMENTED_CANDIDATES)   # the spec's copy of the candidate names


def test_the_default_mode_comes_from_the_artifact_and_mode_fast_overrides_it(thorough, old, photo, artifacts):
    sharp, blurred, kernel, png = photo
    before = thorough.get("/api/health").json()["admission"]["speed"]
    default = thorough.post("/api/deblur", content=png)
    assert default.status_code == 200, default.text
    assert default.headers["x-deblur-mode"] == "thorough" and default.headers["x-deblur-chosen"] == "kernel"
    width, height = (int(v) for v in default.headers["x-deblur-psf-size"].split("x"))
    assert width % 2 == 1 and height % 2 == 1 and "estimate;dur=" in default.headers["server-timing"]
    assert psnr(pixels(default.content), sharp) - psnr(blurred, sharp) >= THOROUGH_GAIN_DB

    fast = thorough.post("/api/deblur", params={"mode": "fast"}, content=png)
    assert fast.status_code == 200 and fast.headers["x-deblur-mode"] == "fast"
    assert "x-deblur-chosen" not in fast.headers and "x-deblur-psf-size" not in fast.headers
    network_only = load_serving_model(artifacts["thorough"], threads=PARAMS.serving.threads).deblur(blurred)
    assert psnr(pixels(fast.content), network_only) >= 60   # fast = the network alone, as before
    assert old.post("/api/deblur", content=png).headers["x-deblur-mode"] == "fast"   # no kernel_aware: fast

    # priced apart: the thorough request taught its own line, not the request line fast estimates use
    after = thorough.get("/api/health").json()["admission"]["speed"]
    assert after["modes"]["thorough"]["observations"] == before["modes"]["thorough"]["observations"] + 1
    assert after["request_seconds"]["observations"] == before["request_seconds"]["observations"] + 1   # the fast one


def test_return_psf_answers_json_with_the_estimated_kernel(thorough, photo):
    sharp, blurred, kernel, png = photo
    response = thorough.post("/api/deblur", params={"return_psf": "1", "format": "webp"}, content=png)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-disposition"] == 'inline; filename="deblurred.json"'
    answer = response.json()
    assert (answer["mode"], answer["chosen"], answer["media_type"]) == ("thorough", "kernel", "image/webp")
    assert (answer["width"], answer["height"]) == (256, 256)
    assert {"support_px", "confidence", "reason"} <= set(answer["evidence"]) and answer["seconds"]["total"] > 0

    estimated = np.load(io.BytesIO(base64.b64decode(answer["psf_npy"])))
    assert estimated.dtype == np.float32 and list(estimated.shape) == answer["psf_size"]
    assert estimated.sum() == pytest.approx(1.0, abs=1e-5)
    assert response.headers["x-deblur-psf-size"] == f"{estimated.shape[1]}x{estimated.shape[0]}"
    assert kernel_ncc(estimated, kernel) >= 0.9, kernel_ncc(estimated, kernel)
    picture = Image.open(io.BytesIO(base64.b64decode(answer["psf"])))
    levels = np.asarray(picture).astype(np.float64)
    assert picture.format == "PNG" and picture.mode.startswith("I") and levels.max() == 65535
    assert np.allclose(levels / levels.sum(), estimated, atol=1e-4)

    image = Image.open(io.BytesIO(base64.b64decode(answer["image"])))
    assert image.format == "WEBP" and image.size == (256, 256)
    assert psnr(np.asarray(image.convert("RGB")), sharp) - psnr(blurred, sharp) >= THOROUGH_GAIN_DB


def test_a_psf_part_deconvolves_with_the_callers_kernel(old, photo):
    """Non-blind, on the old artifact too (no kernel-aware settings needed), whatever ``mode`` says."""
    sharp, blurred, kernel, png = photo
    expected = deconvolve(blurred, kernel, workers=PARAMS.serving.threads)
    for psf, name in ((npy_bytes(kernel), "kernel.npy"), (psf_to_png_bytes(kernel), "kernel.png")):
        response = old.post("/api/deblur", params={"mode": "fast"}, files=with_psf(png, psf, name))
        assert response.status_code == 200, response.text
        assert (response.headers["x-deblur-mode"], response.headers["x-deblur-chosen"]) == ("psf", "psf")
        assert response.headers["x-deblur-psf-size"] == f"{kernel.shape[1]}x{kernel.shape[0]}"
        restored = pixels(response.content)
        assert psnr(restored, sharp) - psnr(blurred, sharp) >= THOROUGH_GAIN_DB
        assert psnr(restored, expected) >= 40   # the library's deconvolution (the PNG's 16 bits round the weights)
    echoed = old.post("/api/deblur", params={"return_psf": "true"}, files=with_psf(png, npy_bytes(kernel * 7.0)))
    assert echoed.status_code == 200 and echoed.json()["mode"] == "psf"
    used = np.load(io.BytesIO(base64.b64decode(echoed.json()["psf_npy"])))
    assert np.allclose(used, kernel / kernel.sum(), atol=1e-6)   # what the server read, normalised


@pytest.mark.parametrize("psf, name, mentions", [
    (npy_bytes(np.ones((4, 5))), "even.npy", "(4, 5) has an even side"),
    (npy_bytes(np.array([[0.0, -1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]])), "neg.npy", "negative weights"),
    (npy_bytes(np.zeros((3, 3))), "zero.npy", "sums to zero"),
    (npy_bytes(np.ones((3, 3, 3))), "cube.npy", "2-D array"),
    (encode(Image.new("L", (301, 301), 9), "PNG"), "huge.png", "301x301 picture exceeds the limit of 255"),
    (b"certainly not a kernel", "notes.txt", "notes.txt"),
    (b"", "empty.npy", "empty PSF file"),
])
def test_a_bad_psf_is_refused_naming_the_problem(old, photo, psf, name, mentions):
    response = old.post("/api/deblur", files=with_psf(photo[3], psf, name))
    assert_error(response, 400, "invalid_psf", mentions, "the 'psf' part")
    assert old.server.process.poll() is None


def test_two_psf_parts_are_refused(old, photo):
    kernel = npy_bytes(photo[2])
    files = [("image", ("a.png", photo[3], "image/png")), ("psf", ("k.npy", kernel)), ("psf", ("k2.npy", kernel))]
    assert_error(old.post("/api/deblur", files=files), 400, "duplicate_field", "'psf'")


@pytest.mark.parametrize("query, mentions", [
    ({"mode": "slow"}, ["mode='slow'", "fast, thorough"]),
    ({"mode": ""}, ["mode=''"]),
    ({"return_psf": "yes"}, ["return_psf='yes'", "1, 0, true or false"]),
    ({"mode": "fast", "return_psf": "1"}, ["return_psf=1", "mode=thorough"]),
])
def test_bad_mode_and_return_psf_values_are_refused(thorough, photo, query, mentions):
    assert_error(thorough.post("/api/deblur", params=query, content=photo[3]), 400, "invalid_parameter", *mentions)


def test_an_old_artifact_refuses_thorough_clearly_before_reading_the_body(old, photo):
    response = old.post("/api/deblur", params={"mode": "thorough"}, content=photo[3])
    assert_error(response, 400, "mode_unavailable", "mode=thorough", "kernel_aware", "export", "mode=fast")
    assert_error(old.post("/api/deblur", params={"return_psf": "1"}, content=photo[3]), 400, "invalid_parameter",
                 "mode=thorough")
    # a 5 MB body is declared and never sent: the answer comes from the query alone
    host, port = old.server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /api/deblur?mode=thorough HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 5000000\r\n\r\n")
        answer = b""
        while b"mode_unavailable" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"mode_unavailable" in answer, answer
    assert time.monotonic() - started < 5


def test_admission_prices_thorough_mode_in_time_and_memory(thorough):
    # time: the thorough prior (1 s + 15 s/MP beyond the network) puts 2000x1500 over 30 s; mode fast takes it
    big = encode(Image.fromarray(smooth_rgb(1500, 2000)), "PNG")
    assert_error(thorough.post("/api/deblur", content=big), 413, "image_too_slow", "mode=thorough", "at most")
    assert thorough.post("/api/deblur", params={"mode": "fast"}, content=big).status_code == 200
    # memory: 512x512 in mode thorough needs 16 B/px + 384 B per padded pixel, over the 100 MiB budget
    mid = encode(Image.fromarray(smooth_rgb(512, 512)), "PNG")
    assert_error(thorough.post("/api/deblur", content=mid), 413, "image_too_large", "mode=thorough", "max_buffered_mb")
    assert thorough.post("/api/deblur", params={"mode": "fast"}, content=mid).status_code == 200
    assert thorough.get("/api/health").json()["admission"]["memory"]["used_mb"] == 0


def test_the_onnx_runtime_serves_thorough_mode(tmp_path, photo):
    """Thorough mode needs only the fast network as a callable: ONNX Runtime's tiled inference serves it."""
    sharp, blurred, kernel, png = photo
    model_dir = make_artifact(tmp_path, serving={**THOROUGH_SERVING, "runtime": "onnx"},
                              kernel_aware={"default_mode": "thorough"})
    with running_server(model_dir) as server:
        assert server.wait_ready()["model"]["runtime"] == "onnx"
        response = httpx.post(f"{server.url}/api/deblur", params={"return_psf": "1"}, content=png, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["chosen"] == "kernel" and response.headers["x-deblur-mode"] == "thorough"
    assert kernel_ncc(np.load(io.BytesIO(base64.b64decode(answer["psf_npy"]))), kernel) >= 0.9
    assert psnr(pixels(base64.b64decode(answer["image"])), sharp) - psnr(blurred, sharp) >= THOROUGH_GAIN_DB


def deblur_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deblur", "predict", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_predict_mode_thorough_saves_each_estimated_kernel(tmp_path, artifacts, photo):
    sharp, blurred, kernel, png = photo
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "shaken.png").write_bytes(png)
    Image.fromarray(blurred[:40, :48]).save(inputs / "tiny.png")   # under kernel_aware.min_side: network only
    out = tmp_path / "out"
    run = deblur_cli(str(inputs), "-o", str(out), "--model", str(artifacts["thorough"]), "--mode", "thorough",
                     "--save-psf", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "2 of 2 images written" in run.stdout and "mode thorough" in run.stdout
    lines = {line.split(":")[0]: line for line in run.stdout.splitlines() if line.startswith(str(inputs))}
    assert f"{inputs / 'shaken.png'}: kernel, PSF " in lines[str(inputs / "shaken.png")]
    assert "shaken.psf.png, shaken.psf.npy" in lines[str(inputs / "shaken.png")]
    assert re.search(r"; kept \d+% of its change to the photo \(blur \d+\.\d levels\)\)$", lines[str(inputs / "shaken.png")])
    assert lines[str(inputs / "tiny.png")].startswith(f"{inputs / 'tiny.png'}: network")
    assert sorted(p.name for p in out.iterdir()) == ["shaken.png", "shaken.psf.npy", "shaken.psf.png", "tiny.png"]

    estimated = np.load(out / "shaken.psf.npy")
    assert estimated.dtype == np.float32 and kernel_ncc(estimated, kernel) >= 0.9
    levels = np.asarray(Image.open(out / "shaken.psf.png")).astype(np.float64)
    assert levels.shape == estimated.shape and np.allclose(levels / levels.sum(), estimated, atol=1e-4)
    assert psnr(pixels((out / "shaken.png").read_bytes()), sharp) - psnr(blurred, sharp) >= THOROUGH_GAIN_DB


def test_predict_refuses_modes_the_model_or_the_options_cannot_run(tmp_path, artifacts, photo):
    (tmp_path / "shaken.png").write_bytes(photo[3])
    no_settings = deblur_cli("shaken.png", "-o", "out", "--model", str(artifacts["old"]), "--mode", "thorough",
                             cwd=tmp_path)
    assert no_settings.returncode == 2 and "without kernel-aware settings" in no_settings.stderr
    fast_psf = deblur_cli("shaken.png", "-o", "out", "--model", str(artifacts["thorough"]), "--mode", "fast",
                          "--save-psf", cwd=tmp_path)
    assert fast_psf.returncode == 2 and "--save-psf" in fast_psf.stderr
    np.save(tmp_path / "k.npy", photo[2])
    both = deblur_cli("shaken.png", "-o", "out", "--psf", "k.npy", "--mode", "thorough", cwd=tmp_path)
    assert both.returncode == 2 and "--psf" in both.stderr
    assert not (tmp_path / "out").exists()
    assert json.loads((artifacts["old"] / "model.json").read_text()).get("kernel_aware") is None
