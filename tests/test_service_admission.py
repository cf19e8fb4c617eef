"""Admission that decides from evidence (issue #13, defects 1-5): the speed model, deadlines,
cancellation, SIGTERM and the memory budget, each against a real ``python -m deblur.service``."""

from __future__ import annotations

import json
import math
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from deblur.service.admission import check_expected_time
from deblur.service.errors import ApiError
from deblur.speed import BUILT_IN_PRIOR, PRIOR_KEY, Line, SpeedModel, SpeedPrior, plan_tiles, prior_from_meta
from deblur.tiling import tiled_inference
from serving_support import PARAMS, encode, make_artifact, running_server, smooth_rgb

SMALL = {"channels": 8, "depth": 3}      # a few ms per tile
SLOW = {"channels": 32, "depth": 6}      # seconds per 720p image with 64-pixel tiles: time to cancel it
ROOMY = {"max_buffered_mb": 16000}   # tests of time, not memory: the budget never refuses their large images
TRUTH = SpeedPrior(batch=Line(0.01, 1e-6), request=Line(0.02, 1e-7), size_multiple=16, source="test")


def png(width: int, height: int) -> bytes:
    return encode(Image.fromarray(smooth_rgb(height, width)), "PNG")


def side_for(model_dir, seconds: float) -> int:
    """Side of a square image whose 64-pixel tiles (overlap 0) take about ``seconds`` on this machine,
    by the prior measured at export: the tests below need work that lasts, whatever the CPU."""
    prior = prior_from_meta(json.loads((model_dir / "model.json").read_text()), "torch")
    return int(min(64 * math.ceil(math.sqrt(seconds / prior.batch.at(64 * 64))), 5000))


def true_seconds(width: int, height: int, tile_size: int = 288, overlap: int = 32) -> float:
    return SpeedModel(TRUTH).seconds_for(plan_tiles(width, height, tile_size, overlap, 1, 16))


def feed(speed: SpeedModel, width: int, height: int, tile_size: int, overlap: int,
         batch_seconds: float | None = None, request_seconds: float | None = None) -> None:
    """What a real request reports: every tile batch, then the time around them."""
    plan = plan_tiles(width, height, tile_size, overlap, 1, 16)
    for tiles in plan.batches():
        speed.observe_batch(tiles, plan.tile_pixels,
                            TRUTH.batch.at(tiles * plan.tile_pixels) if batch_seconds is None else batch_seconds)
    speed.observe_request(plan.image_pixels, TRUTH.request.at(plan.image_pixels) if request_seconds is None
                          else request_seconds)


def estimate_720p(speed: SpeedModel) -> float:
    return speed.seconds_for(plan_tiles(1280, 720, 288, 32, 1, 16))


class AlignedIdentity(torch.nn.Module):
    """Returns its input: a real module on a ``size_multiple`` grid, to count the tiles tiled_inference cuts."""

    def __init__(self, size_multiple: int) -> None:
        super().__init__()
        self.size_multiple = size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("height, width, tile_size, overlap, batch_size, align", [
    (720, 1280, 288, 32, 1, 16), (720, 1280, 64, 31, 3, 16), (8, 8, 288, 32, 1, 16), (100, 33, 64, 0, 4, 1),
    (300, 300, 100, 20, 2, 8), (513, 257, 256, 64, 1, 16),
])
def test_the_tile_plan_is_the_one_tiled_inference_runs(height, width, tile_size, overlap, batch_size, align):
    batches = []
    image = torch.zeros((1, 3, height, width), dtype=torch.uint8)
    tiled_inference(AlignedIdentity(align), image, tile_size, overlap, batch_size,
                    on_batch=lambda tiles, pixels, seconds: batches.append((tiles, pixels)))
    plan = plan_tiles(width, height, tile_size, overlap, batch_size, align)
    assert [(n, plan.tile_pixels) for n in plan.batches()] == batches


def test_tiny_requests_and_odd_tiling_do_not_poison_the_estimate():
    speed = SpeedModel(SpeedPrior(batch=Line(0.02, 2e-6), request=Line(0.04, 2e-7), size_multiple=16,
                                  source="a prior twice too slow"))
    truth = true_seconds(1280, 720)
    for _ in range(6):   # 8x8 requests whose fixed cost is all there is: 0.1 s each
        feed(speed, 8, 8, 288, 32, batch_seconds=0.05, request_seconds=0.05)
    feed(speed, 1280, 720, 64, 31)   # 920 tiles of 64x64
    old_rate = 0.1 / (8 * 8 / 1e6)   # the old per-request seconds per megapixel after such a request
    assert old_rate * 0.92 > 1000     # ... said a 720p image takes over 1000 s
    assert 0.5 * truth < estimate_720p(speed) < 2.5 * truth
    for _ in range(5):
        feed(speed, 1280, 720, 288, 32)
    assert estimate_720p(speed) == pytest.approx(truth, rel=0.3)


def test_a_worker_slower_than_its_prior_learns_within_a_few_requests():
    speed = SpeedModel(SpeedPrior(batch=Line(0.001, 1e-8), request=Line(0.002, 1e-8), size_multiple=16,
                                  source="a prior 100x too fast"))
    truth = true_seconds(1280, 720)
    assert estimate_720p(speed) < truth / 20
    for _ in range(3):
        feed(speed, 1280, 720, 288, 32)
    assert estimate_720p(speed) == pytest.approx(truth, rel=0.5)


def test_the_built_in_prior_bounds_a_fresh_worker_and_names_the_largest_size_that_fits():
    speed = SpeedModel(BUILT_IN_PRIOR)
    serving = PARAMS.serving.model_copy(update={"max_request_seconds": 200})

    def plan(width, height):
        return plan_tiles(width, height, 288, 32, 1, BUILT_IN_PRIOR.size_multiple)

    assert check_expected_time(speed, 1280, 720, serving, plan) < 30
    with pytest.raises(ApiError) as refused:
        check_expected_time(speed, 6600, 6000, serving, plan)
    assert refused.value.status == 413 and refused.value.code == "image_too_slow"
    fit = refused.value.detail.split("at most ")[1].split(" ")[0]
    width, height = (int(v) for v in fit.split("x"))
    assert 0.5 < width / height * 6000 / 6600 < 1.5
    assert 150 < speed.seconds_for(plan(width, height)) <= 200


def test_export_measures_a_speed_prior_into_model_json(tmp_path):
    model_dir = make_artifact(tmp_path, **SMALL)
    meta = json.loads((model_dir / "model.json").read_text())
    measured = meta[PRIOR_KEY]["torch"]
    assert measured["batch"]["per_pixel"] > 0 and measured["size_multiple"] == 1
    assert "measured at export" in measured["source"]
    prior = prior_from_meta(meta, "torch")
    assert prior.source.startswith("model.json speed_prior[torch]") and prior.batch.per_pixel > 0
    assert prior_from_meta(meta, "onnx") is BUILT_IN_PRIOR and prior_from_meta({}, "torch") is BUILT_IN_PRIOR


# --- real servers -------------------------------------------------------------------------------

def health(server) -> dict:
    return httpx.get(f"{server.url}/api/health", timeout=10).json()


def assert_error(response: httpx.Response, status: int, code: str, mentions: str = "") -> None:
    assert response.status_code == status, (response.status_code, response.headers)
    assert response.json()["error"] == code and mentions in response.json()["detail"], response.text


def wait_for(condition, timeout: float, step: float = 0.05) -> float:
    """Seconds until ``condition()`` holds; fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(step)
    return time.monotonic() - started


def test_six_tiny_requests_and_odd_tiling_do_not_lock_out_a_720p_image(tmp_path):
    model_dir = make_artifact(tmp_path, serving={"max_request_seconds": 10}, **SMALL)
    with running_server(model_dir) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        tiny = png(8, 8)
        for _ in range(6):
            assert client.post("/api/deblur", content=tiny).status_code == 200
        assert client.post("/api/deblur?tile_size=64&overlap=31", content=png(1280, 720)).status_code == 200
        assert client.post("/api/deblur", content=png(1280, 720)).status_code == 200   # before: 413 image_too_slow
        speed = health(server)["admission"]["speed"]
        assert speed["batch_seconds"]["observations"] > 800 and speed["seconds_per_megapixel"] < 10


def test_the_first_request_of_a_fresh_worker_is_bounded_by_the_prior_measured_at_export(tmp_path):
    model_dir = make_artifact(tmp_path, serving={"max_request_seconds": 3}, **SMALL)
    huge = encode(Image.new("RGB", (6000, 6600), (90, 120, 150)), "PNG")   # inside every size limit
    with running_server(model_dir) as server:
        started = time.monotonic()
        refused = httpx.post(f"{server.url}/api/deblur", content=huge, timeout=30)   # before: ran for minutes
        assert_error(refused, 413, "image_too_slow", "serving.max_request_seconds")
        assert time.monotonic() - started < 3
        assert health(server)["admission"]["speed"]["prior_source"].startswith("model.json speed_prior[torch]")
    meta = json.loads((model_dir / "model.json").read_text())
    del meta[PRIOR_KEY]                      # an artifact exported before speed priors: the built-in one
    (model_dir / "model.json").write_text(json.dumps(meta))
    with running_server(model_dir) as server:
        assert health(server)["admission"]["speed"]["prior_source"].startswith("built-in conservative prior")
        assert_error(httpx.post(f"{server.url}/api/deblur", content=huge, timeout=30), 413, "image_too_slow")


def test_a_request_the_estimate_got_wrong_stops_at_the_deadline_and_teaches_it(tmp_path):
    model_dir = make_artifact(tmp_path, serving={"max_request_seconds": 2, **ROOMY}, **SLOW)
    side = side_for(model_dir, 8)   # 64-pixel tiles: about 8 s of work, 0.8 s by the prior written below
    meta = json.loads((model_dir / "model.json").read_text())
    measured = prior_from_meta(meta, "torch")
    too_fast = SpeedPrior(batch=Line(measured.batch.fixed / 10, measured.batch.per_pixel / 10),
                          request=Line(measured.request.fixed / 10, measured.request.per_pixel / 10),
                          size_multiple=1, source="10x too fast")
    meta[PRIOR_KEY] = {"torch": too_fast.to_json()}
    (model_dir / "model.json").write_text(json.dumps(meta))
    body = png(side, side)
    with running_server(model_dir) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        started = time.monotonic()
        stopped = client.post("/api/deblur?tile_size=64&overlap=0", content=body)   # before: 200 after > 5 s
        assert_error(stopped, 503, "deadline_exceeded", "serving.max_request_seconds")
        assert 2 <= time.monotonic() - started < 4.5
        learned = health(server)["admission"]["speed"]
        batch = learned["batch_seconds"]   # a 64x64 tile batch, as the prior said and as learned
        assert batch["observations"] > 0
        assert batch["fixed"] + batch["per_megapixel"] * 4096e-6 > 3 * too_fast.batch.at(4096)
        assert_error(client.post("/api/deblur?tile_size=64&overlap=0", content=body), 413, "image_too_slow")
        assert client.post("/api/deblur", content=png(64, 48)).status_code == 200
        assert "deadline_exceeded after" in server.log()


def test_abandoned_requests_stop_and_the_worker_serves_the_next_one_promptly(tmp_path):
    model_dir = make_artifact(tmp_path, serving={"max_request_seconds": 100, **ROOMY}, **SLOW)
    side = side_for(model_dir, 5)
    body = png(side, side)

    def abandon(_) -> str:
        try:
            httpx.post(f"{server.url}/api/deblur?tile_size=64&overlap=0", content=body, timeout=1)
        except httpx.TimeoutException:
            return "timed out"
        return "answered"

    with running_server(model_dir) as server:
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(abandon, range(6)))
        assert outcomes == ["timed out"] * 6
        wait_for(lambda: health(server)["in_flight"] == 0, timeout=4)   # before: 6 for about 30 s
        started = time.monotonic()
        assert httpx.post(f"{server.url}/api/deblur", content=png(64, 48), timeout=30).status_code == 200
        assert time.monotonic() - started < 3
        log = server.log()
        assert log.count("cancelled after") == 6 and log.count("the client disconnected") == 6
        assert log.count('"POST /api/deblur HTTP/1.1" 200') == 1   # before: seven


def test_sigterm_stops_a_busy_worker_within_the_grace(tmp_path):
    model_dir = make_artifact(tmp_path, serving={"max_request_seconds": 100, "shutdown_grace_seconds": 1, **ROOMY},
                              **SLOW)
    side = side_for(model_dir, 15)   # 64-pixel tiles: about 15 s of work
    body = png(side, side)
    with running_server(model_dir) as server:
        url = f"{server.url}/api/deblur?tile_size=64&overlap=0"
        with ThreadPoolExecutor(2) as pool:
            answers = [pool.submit(httpx.post, url, content=body, timeout=60) for _ in range(2)]   # one runs, one waits
            wait_for(lambda: health(server)["in_flight"] == 2, timeout=10)
            time.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            server.process.wait(timeout=15)   # before: still running 95 s later
            took = time.monotonic() - started
            details = sorted(answer.result().json()["detail"] for answer in answers)
            assert all(answer.result().json()["error"] == "shutting_down" for answer in answers)
        assert "serving.shutdown_grace_seconds" in details[1] and "admits no new requests" in details[0], details
        assert took < 1 + 4, took   # grace + 4 s; before: it computed both images first (over 15 s here)
        assert "SIGTERM: admitting no new requests" in server.log()


def request_with_expect(port: int, length: int, body: bytes, statuses: list[str]) -> None:
    """POST ``length`` bytes, sending them only after ``100 Continue`` (as curl does for large bodies)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST /api/deblur HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
                     "Content-Type: application/octet-stream\r\nExpect: 100-continue\r\n\r\n".encode())
        reply = sock.recv(65536)
        if reply.startswith(b"HTTP/1.1 100"):
            view = memoryview(body)
            for start in range(0, length, 1 << 20):
                sock.sendall(view[start:start + (1 << 20)])
            reply = reply.split(b"\r\n\r\n", 1)[1] or sock.recv(65536)
        statuses.append(reply.split(b" ", 2)[1].decode())


def test_a_burst_of_large_uploads_stays_within_the_memory_budget(tmp_path):
    model_dir = make_artifact(tmp_path, serving={"max_body_mb": 50, "max_buffered_mb": 100}, **SMALL)
    body = np.full(45 * 2**20, 7, np.uint8).tobytes()   # one 45 MB buffer shared by all uploads (not an image)
    with running_server(model_dir) as server:
        process = psutil.Process(server.process.pid)
        baseline = process.memory_info().rss
        peak, done = [baseline], threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak.append(process.memory_info().rss)
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        statuses: list[str] = []
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(lambda _: request_with_expect(server.port, len(body), body, statuses), range(20)))
        done.set()
        watcher.join()
        grew_mb = (max(peak) - baseline) / 2**20
        assert sorted(set(statuses)) == ["415", "503"] and len(statuses) == 20, statuses
        assert grew_mb < 350, grew_mb   # before: all 20 bodies read, about 900 MB more
        assert health(server)["admission"]["memory"]["used_mb"] == 0
        # decoded pixels count too: 3000x3000 needs about 137 MB of working memory, over the 100 MB budget
        assert_error(httpx.post(f"{server.url}/api/deblur", content=png(3000, 3000), timeout=60), 413,
                     "image_too_large", "serving.max_buffered_mb")
        assert httpx.post(f"{server.url}/api/deblur", content=png(1000, 1000), timeout=60).status_code == 200
        assert health(server)["admission"]["memory"]["used_mb"] == 0
