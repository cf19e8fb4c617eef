"""The HTTP service as a real ``python -m deblur.service`` process, driven with real HTTP requests."""

from __future__ import annotations

import io
import math
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from deblur.service.admission import InferenceGate
from serving_support import PARAMS, ROOT, encode, make_artifact, running_server, seconds_per_tile, smooth_rgb, wait_for

sys.path.insert(0, str(ROOT / "scripts"))
from build_function_package import build_package  # noqa: E402

LIMITS = {"max_body_mb": 1, "max_pixels": 1_000_000, "max_side": 2000, "min_side": 8}
SLOW = {"channels": 32, "depth": 6}   # seconds per large image with 64-pixel tiles: a request that holds the slot
ROOMY = {"max_buffered_mb": 16000, "max_pixels": 20_000_000, "max_side": 5000, "max_body_mb": 50,
         "max_request_seconds": 1000}   # the slow request is admitted, whatever its size and time


@pytest.fixture(scope="module", params=["torch", "onnx_function_package"])
def server(request, tmp_path_factory):
    """The hostile-input suite runs twice: ``make serve``'s torch server, and the Function package
    built with ``--runtime onnx`` (its own copy of deblur, model.onnx only) in a process that cannot import torch."""
    folder = tmp_path_factory.mktemp("http")
    model_dir = make_artifact(folder, serving=LIMITS)
    env = None
    if request.param == "onnx_function_package":
        (folder / "block_torch").mkdir()
        (folder / "block_torch" / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None\n')
        package = build_package(folder / "package", model_dir, runtime="onnx")
        model_dir, env = package / "model", {"PYTHONPATH": os.pathsep.join([str(folder / "block_torch"), str(package)])}
    with running_server(model_dir, env=env) as running:
        if env is not None:
            assert running.wait_ready()["model"]["runtime"] == "onnx"
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def photo(width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    img = Image.fromarray(smooth_rgb(height, width))
    if mode == "RGBA":
        img.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))))
        return img
    return img.convert(mode)


def response_image(response: httpx.Response) -> Image.Image:
    img = Image.open(io.BytesIO(response.content))
    img.load()
    return img


def assert_error(response: httpx.Response, status: int, code: str, mentions: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["detail"], body
    assert mentions in body["detail"], body["detail"]


def assert_healthy(client: httpx.Client, server) -> None:
    assert server.process.poll() is None, server.log()
    health = client.get("/api/health").json()
    assert health["ready"] and health["error"] is None


def test_health_reports_model_tiling_and_limits(client):
    health = client.get("/api/health").json()
    assert health["ready"] and health["auth"] == "anonymous"
    assert health["model"]["name"] == "deblur-test" and health["model"]["version"] == "7"
    assert health["model"]["alias"] == "champion" and health["model"]["architecture"] == "stacked_conv"
    assert health["tiling"] == PARAMS.tiling.model_dump()
    assert health["limits"]["max_body_mb"] == 1 and health["limits"]["max_pixels"] == 1_000_000


def test_web_page_is_served_self_contained(client):
    for path in ("/", "/api/ui"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'type="file"' in page.text and "/api/deblur" in page.text
        assert "http://" not in page.text and "https://" not in page.text


@pytest.mark.parametrize("fmt, media", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"),
                                        ("TIFF", "image/tiff"), ("BMP", "image/bmp")])
def test_each_input_format_is_deblurred_to_png(client, fmt, media):
    response = client.post("/api/deblur", content=encode(photo(), fmt), headers={"Content-Type": media})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    out = response_image(response)
    assert out.size == (64, 48) and out.mode == "RGB"
    for header in ("X-Model-Name", "X-Model-Version", "X-Model-Alias", "X-Inference-Ms", "Server-Timing"):
        assert response.headers[header], header
    assert (response.headers["X-Model-Name"], response.headers["X-Model-Alias"]) == ("deblur-test", "champion")
    assert "infer;dur=" in response.headers["Server-Timing"]


def test_exif_orientation_is_applied(client):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    response = client.post("/api/deblur", content=encode(photo(64, 40), "JPEG", exif=exif))
    assert response.status_code == 200, response.text
    assert response_image(response).size == (40, 64)


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("1", "BMP")])
def test_grayscale_palette_cmyk_and_16_bit_inputs_come_back_as_rgb(client, mode, fmt):
    img = photo(mode=mode) if mode != "I;16" else Image.fromarray(
        (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16))
    response = client.post("/api/deblur", content=encode(img, fmt))
    assert response.status_code == 200, response.text
    out = response_image(response)
    assert out.size == (64, 48) and out.mode == "RGB"


def test_alpha_is_kept_in_png_and_webp_and_dropped_in_jpeg(client):
    rgba = photo(mode="RGBA")
    alpha = np.asarray(rgba)[..., 3]
    png = client.post("/api/deblur", content=encode(rgba, "PNG"))
    assert png.headers["X-Alpha"] == "kept" and response_image(png).mode == "RGBA"
    assert np.array_equal(np.asarray(response_image(png))[..., 3], alpha)
    webp = client.post("/api/deblur?format=webp", content=encode(rgba, "PNG"))
    assert webp.headers["X-Alpha"] == "kept" and response_image(webp).mode == "RGBA"
    assert np.abs(np.asarray(response_image(webp))[..., 3].astype(int) - alpha).max() <= 2
    jpeg = client.post("/api/deblur?format=jpeg", content=encode(rgba, "PNG"))
    assert jpeg.headers["X-Alpha"] == "dropped" and response_image(jpeg).mode == "RGB"
    opaque = client.post("/api/deblur", content=encode(photo(), "PNG"))
    assert opaque.headers["X-Alpha"] == "none"


def test_palette_with_transparency_keeps_its_alpha(client):
    img = photo().convert("P")
    img.info["transparency"] = 0
    response = client.post("/api/deblur", content=encode(img, "PNG", transparency=0))
    assert response.status_code == 200 and response_image(response).mode == "RGBA"


def test_output_format_from_query_or_accept_header(client):
    body = encode(photo(), "PNG")
    webp = client.post("/api/deblur", content=body, headers={"Accept": "image/webp"})
    assert webp.headers["content-type"] == "image/webp"
    accept = {"Accept": "text/html;q=0.9, image/jpeg;q=0.8, image/png;q=0.5"}
    assert client.post("/api/deblur", content=body, headers=accept).headers["content-type"] == "image/jpeg"
    assert client.post("/api/deblur?format=jpeg", content=body,
                       headers={"Accept": "image/webp"}).headers["content-type"] == "image/jpeg"
    assert client.post("/api/deblur", content=body, headers={"Accept": "*/*"}).headers["content-type"] == "image/png"
    assert_error(client.post("/api/deblur?format=gif", content=body), 400, "invalid_format", "png, jpeg or webp")


def test_multipart_upload_in_the_image_field(client):
    response = client.post("/api/deblur", files={"image": ("photo.jpg", encode(photo(), "JPEG"), "image/jpeg")})
    assert response.status_code == 200 and response_image(response).size == (64, 48)
    other = client.post("/api/deblur", files={"file": ("photo.jpg", encode(photo(), "JPEG"), "image/jpeg")})
    assert_error(other, 400, "missing_field", "'image'")


def test_tile_parameters_within_bounds_are_used_and_others_refused(client):
    body = encode(photo(300, 200), "PNG")
    ok = client.post("/api/deblur?tile_size=128&overlap=16", content=body)
    assert ok.status_code == 200 and (ok.headers["X-Tile-Size"], ok.headers["X-Overlap"]) == ("128", "16")
    assert_error(client.post("/api/deblur?tile_size=32", content=body), 400, "invalid_parameter", "[64, 1024]")
    assert_error(client.post("/api/deblur?tile_size=big", content=body), 400, "invalid_parameter", "tile_size")
    assert_error(client.post("/api/deblur?overlap=500", content=body), 400, "invalid_parameter", "[0, 128]")
    assert_error(client.post("/api/deblur?tile_size=64&overlap=32", content=body), 400, "invalid_parameter", "half")


def bomb_png() -> bytes:
    """1200x1000 = 1.2 M pixels of black: ~4 kB on the wire, over the 1 M pixel limit."""
    return encode(Image.new("L", (1200, 1000)), "PNG", optimize=True)


@pytest.mark.parametrize("body, status, code, mentions", [
    (b"", 400, "empty_body", "empty"),
    (b"this is not an image at all", 415, "unsupported_media_type", "JPEG"),
    (encode(photo(), "JPEG")[:300], 400, "invalid_image", "truncated"),
    (bomb_png(), 413, "image_too_large", "serving.max_pixels"),
    (encode(Image.new("RGB", (2100, 8)), "PNG"), 413, "image_too_large", "serving.max_side"),
    (encode(Image.new("RGB", (4, 40)), "PNG"), 400, "image_too_small", "serving.min_side"),
    (encode(Image.new("RGB", (64, 48)), "PPM"), 415, "unsupported_media_type", "JPEG"),
], ids=["empty", "not-an-image", "truncated", "bomb", "too-wide", "too-small", "unsupported-format"])
def test_bad_uploads_get_json_errors_and_the_worker_survives(client, server, body, status, code, mentions):
    assert len(body) < 1_000_000
    assert_error(client.post("/api/deblur", content=body), status, code, mentions)
    assert_healthy(client, server)


def test_body_over_the_limit_is_refused_from_content_length_before_it_is_sent(client, server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /api/deblur HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 2000000\r\n\r\n" + b"\xff" * 1000)
        started = time.monotonic()
        reply = b""
        while b"serving.max_body_mb" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
        reply = reply.decode("latin-1")
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "payload_too_large" in reply and "serving.max_body_mb" in reply
    assert time.monotonic() - started < 5
    assert_healthy(client, server)


def test_streamed_body_over_the_limit_is_refused_while_reading(client, server):
    def chunks():
        for _ in range(48):  # 3 MB in 64 kB chunks, no Content-Length (chunked encoding)
            yield b"\0" * 65536

    try:
        response = client.post("/api/deblur", content=chunks(), headers={"Content-Type": "image/png"})
        assert_error(response, 413, "payload_too_large", "1 MB")
    except httpx.WriteError:
        pass  # the server answered 413 and closed the connection before the client finished sending
    assert_healthy(client, server)


def test_wrong_method_and_unknown_path(client, server):
    assert_error(client.get("/api/deblur"), 405, "method_not_allowed", "POST")
    assert_error(client.put("/api/deblur", content=b"x"), 405, "method_not_allowed")
    assert_error(client.post("/api/health"), 405, "method_not_allowed")
    assert_error(client.get("/api/nothing"), 404, "not_found")
    assert_healthy(client, server)


def test_three_concurrent_requests_all_succeed(client, server):
    bodies = [encode(photo(200 + 40 * i, 150), "PNG") for i in range(3)]

    def post(body: bytes) -> httpx.Response:
        return httpx.post(f"{server.url}/api/deblur", content=body, timeout=60)

    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(post, bodies))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [response_image(r).size for r in responses] == [(200, 150), (240, 150), (280, 150)]
    assert_healthy(client, server)
    assert client.get("/api/health").json()["in_flight"] == 0


def test_inference_gate_admits_slots_plus_waiting():
    gate = InferenceGate(slots=1, max_waiting=1)
    assert gate.admit() and gate.admit() and not gate.admit()
    gate.leave()
    assert gate.admit()


KEY = "s3cretKEY-5d1f"   # distinctive: grepped for in the server log
KEY_NAME_VARIANTS = ["%63ode", "CODE", "Code", "c%6fde", "%43ODE"]   # read as "code" by Starlette


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A worker with ``DEBLUR_API_KEY`` set, one slot and no queue."""
    model_dir = make_artifact(tmp_path_factory.mktemp("keyed"),
                              serving={**LIMITS, "max_waiting": 0, "inference_slots": 1, **ROOMY}, **SLOW)
    with running_server(model_dir, env={"DEBLUR_API_KEY": KEY}) as running:
        running.model_dir = model_dir
        yield running


def test_api_key_is_required_when_set_and_a_full_queue_gets_503(keyed_server):
    server = keyed_server
    with httpx.Client(base_url=server.url, timeout=60) as c:
        body = encode(photo(), "PNG")
        assert c.get("/api/health").json()["auth"] == "api_key"
        assert_error(c.post("/api/deblur", content=body), 401, "unauthorized", "x-functions-key")
        assert_error(c.post("/api/deblur?code=wrong", content=body), 401, "unauthorized")
        assert c.post("/api/deblur", content=body, headers={"x-functions-key": KEY}).status_code == 200
        assert c.post(f"/api/deblur?code={KEY}", content=body).status_code == 200
        busy = _busy_response(c, server)
        assert_error(busy, 503, "busy", "serving.max_waiting")
        assert busy.headers["Retry-After"] == "5"
        log = server.log()
        assert "/api/deblur?code=*** " in log and "POST /api/deblur?code=***&tile_size=64" in log   # the access log
        assert KEY not in log and "wrong" not in log        # keys are never written, right or wrong


def _busy_response(client: httpx.Client, server) -> httpx.Response:
    """A request sent while another one holds the only slot (max_waiting 0).

    Event-driven, whatever the load of the machine: the first request is 20 s of work (64-pixel tiles
    of the slow model, sized from the worker's speed now); the second is sent once /api/health counts
    the first in flight, so the only place is certainly taken. Then the first client leaves, which stops it.
    """
    side = side_for(server, 20)
    leave = threading.Event()
    target = f"/api/deblur?code={KEY}&tile_size=64&overlap=0"
    first = threading.Thread(target=_post_and_leave,
                             args=(server.port, target, encode(photo(side, side), "PNG"), leave))
    first.start()
    try:
        wait_for(lambda: client.get("/api/health").json()["in_flight"] == 1, timeout=120)
        second = client.post(target, content=encode(photo(), "PNG"))
    finally:
        leave.set()
        first.join()
    wait_for(lambda: client.get("/api/health").json()["in_flight"] == 0, timeout=120)   # the client left: stopped
    return second


def _post_and_leave(port: int, target: str, body: bytes, leave: threading.Event) -> None:
    """POST ``body`` to ``target`` and close the connection unanswered once ``leave`` is set."""
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        sock.sendall(f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        leave.wait(300)


def side_for(server, seconds: float) -> int:
    """Side of a square image whose 64-pixel tiles (overlap 0) take at least about ``seconds`` (at most 4000)
    in the worker, measured now (serving_support.seconds_per_tile)."""
    return int(min(64 * math.ceil(math.sqrt(seconds / seconds_per_tile(server.model_dir))), 4000))



def test_the_key_has_one_name_and_never_reaches_the_log(keyed_server):
    """``code`` exactly (or the header) is the key; every spelling Starlette would decode to it is refused
    with 401 naming the parameter, and no spelling puts the key into the real server's log."""
    server = keyed_server
    body = encode(photo(), "PNG")
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post(f"/api/deblur?code={KEY}", content=body).status_code == 200
        assert c.post("/api/deblur", content=body, headers={"x-functions-key": KEY}).status_code == 200
        for name in KEY_NAME_VARIANTS:   # before: each one was accepted as the key, and logged in clear
            refused = c.post(f"/api/deblur?{name}={KEY}", content=body)
            assert_error(refused, 401, "unauthorized", f"{name!r}")
            assert "'code' exactly" in refused.json()["detail"] and KEY not in refused.text
            docs = c.get(f"/api/docs?{name}={KEY}")   # the docs need no key, and do not pass a misnamed one on
            assert docs.status_code == 200 and KEY not in docs.text
        assert KEY in c.get(f"/api/docs?code={KEY}").text            # the exact name is passed on to the spec
        assert_error(c.post(f"/api/deblur?code={KEY}&code={KEY}", content=body), 401, "unauthorized", "once")
        assert_error(c.post(f"/api/deblur?{KEY_NAME_VARIANTS[0]}={KEY}", content=body,
                            headers={"x-functions-key": KEY}), 401, "unauthorized")   # refused even beside the header
        assert c.get("/api/health").status_code == 200
    log = server.log()
    for name in KEY_NAME_VARIANTS:
        assert f'"POST /api/deblur?{name}=*** HTTP/1.1" 401' in log, name   # the access log, masked
        assert f'"GET /api/docs?{name}=*** HTTP/1.1" 200' in log, name
    assert KEY not in log


def test_missing_model_gives_503_and_an_unready_health(tmp_path):
    (tmp_path / "empty").mkdir()
    with running_server(tmp_path / "empty", need_model=False) as server, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        assert_error(c.post("/api/deblur", content=encode(photo(), "PNG")), 503, "model_unavailable", "model.json")
        health = c.get("/api/health").json()
        assert not health["ready"] and "model.json" in health["error"]
        assert health["settings_source"] == "params.yaml"
        assert server.process.poll() is None


def test_images_the_worker_is_too_slow_for_are_refused_with_the_largest_size_that_fits(tmp_path):
    model_dir = make_artifact(tmp_path, serving={**LIMITS, "max_request_seconds": 0.2})
    with running_server(model_dir) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/api/health").json()["seconds_per_megapixel"] > 0   # the speed prior measured at export
        refused = c.post("/api/deblur", content=encode(photo(1000, 1000), "PNG"))   # refused before it runs
        assert_error(refused, 413, "image_too_slow", "serving.max_request_seconds")
        width, height = map(int, refused.json()["detail"].split("at most ")[1].split(" ")[0].split("x"))
        assert 8 <= width == height < 1000
        fits = c.post("/api/deblur", content=encode(photo(width, height), "PNG"))
        assert fits.status_code == 200 or fits.json()["error"] == "deadline_exceeded"   # the estimate may be low


ENTRY_POINT_WAIT_POLICY = '''
import os, sys
sys.path.insert(0, sys.argv[1])
os.chdir(sys.argv[1])
if sys.argv[2] == "function_app":
    import function_app  # noqa: F401   (its create_app() does not load the model yet)
else:
    from deblur.cli.main import main
    try:
        main(["predict", "--help"])
    except SystemExit:
        pass
print(os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
'''


def test_every_entry_point_makes_openmp_threads_sleep_instead_of_spinning(server, tmp_path):
    """OMP_WAIT_POLICY=PASSIVE is set before torch loads (a value in the environment wins): spinning
    OpenMP threads made a 720p request 4-5x slower on a busy machine (bench/bench_busy_serving.py)."""
    expected = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    environ = (Path("/proc") / str(server.process.pid) / "environ").read_bytes().split(b"\0")
    assert f"OMP_WAIT_POLICY={expected}".encode() in environ   # python -m deblur.service, torch and ONNX
    package = build_package(tmp_path / "package", make_artifact(tmp_path / "artifact", serving=LIMITS), runtime="torch")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY" and not k.startswith("DEBLUR_")}
    for entry, folder in (("function_app", package), ("cli", ROOT)):
        run = subprocess.run([sys.executable, "-c", ENTRY_POINT_WAIT_POLICY, str(folder), entry], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split()[-2:] == ["PASSIVE", "False"], (entry, run.stdout, run.stderr)


def test_onnx_runtime_threads_do_not_spin(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from deblur.artifact.onnx_model import _session

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), tmp_path / "identity.onnx")
    options = _session(tmp_path / "identity.onnx", threads=2).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
