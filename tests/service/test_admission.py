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

from deblur.artifact.meta import RUNTIME_FILE, read_artifact_meta
from deblur.service.admission import check_expected_time
from deblur.service.errors import ApiError
from deblur.inference.cost_model import (BUILT_IN_PRIOR, PRIOR_KEY, Line, SpeedModel, SpeedPrior, plan_tiles, prior_from_meta)
from deblur.inference.tiling import tiled_inference
from serving_support import PARAMS, encode, make_artifact, running_server, seconds_per_tile, smooth_rgb, wait_for

SMALL = {"channels": 8, "depth": 3}      # a few ms per tile
SLOW = {"channels": 32, "depth": 6}      # seconds per 720p image with 64-pixel tiles: time to cancel it
ROOMY = {"max_buffered_mb": 16000}   # tests of time, not memory: the budget never refuses their large images
TRUTH = SpeedPrior(batch=Line(0.01, 1e-6), request=Line(0.02, 1e-7), size_multiple=16, source="test")


def png(width: int, height: int) -> bytes:
    return encode(Image.fromarray(smooth_rgb(height, width)), "PNG")


def side_for(model_dir, seconds: float) -> int:
    """Side of a square image whose 64-pixel tiles (overlap 0) take at least about ``seconds`` (at most
    5000) in a worker on this machine now: the tests below need work that lasts, whatever the CPU and its load."""
    return int(min(64 * math.ceil(math.sqrt(seconds / seconds_per_tile(model_dir))), 5000))


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


def test_export_measures_a_speed_prior_into_runtime_json(tmp_path):
    model_dir = make_artifact(tmp_path, **SMALL)
    assert PRIOR_KEY not in json.loads((model_dir / "model.json").read_text())   # timed here: not the same bytes twice
    measured = json.loads((model_dir / RUNTIME_FILE).read_text())[PRIOR_KEY]["torch"]
    assert measured["batch"]["per_pixel"] > 0 and measured["size_multiple"] == 1
    assert "measured at export" in measured["source"]
    meta = read_artifact_meta(model_dir)
    prior = prior_from_meta(meta, "torch")
    assert prior.source.startswith("runtime.json speed_prior[torch]") and prior.batch.per_pixel > 0
    assert prior == SpeedPrior.from_json(measured, "runtime.json speed_prior[torch]")
    assert prior_from_meta(meta, "onnx") is BUILT_IN_PRIOR and prior_from_meta({}, "torch") is BUILT_IN_PRIOR
    (model_dir / RUNTIME_FILE).unlink()             # a `dvc pull`: DVC ignores runtime.json, so it brings none
    assert prior_from_meta(read_artifact_meta(model_dir), "torch") is BUILT_IN_PRIOR


# --- real servers -------------------------------------------------------------------------------

def health(server) -> dict:
    return httpx.get(f"{server.url}/api/health", timeout=10).json()


def assert_error(response: httpx.Response, status: int, code: str, mentions: str = "") -> None:
    assert response.status_code == status, (response.status_code, response.headers)
    assert response.json()["error"] == code and mentions in response.json()["detail"], response.text



def test_six_tiny_requests_and_odd_tiling_do_not_lock_out_a_720p_image(tmp_path):
    model_dir = make_artifact(tmp_path, **SMALL)
    # the limit: 3x what the prior measured at export says the 920-tile request takes (at least 10 s), so
    # a prior measured on a loaded machine does not refuse it; poisoned by 8x8 requests, the old per-request
    # estimate said over 1000 s
    meta = json.loads((model_dir / "model.json").read_text())
    odd = SpeedModel(prior_from_meta(read_artifact_meta(model_dir), "torch")).seconds_for(
        plan_tiles(1280, 720, 64, 31, PARAMS.tiling.batch_size, 1))
    meta["serving"]["max_request_seconds"] = max(10.0, 3 * odd)
    (model_dir / "model.json").write_text(json.dumps(meta))
    with running_server(model_dir) as server, httpx.Client(base_url=server.url, timeout=600) as client:
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
        refused = httpx.post(f"{server.url}/api/deblur", content=huge, timeout=120)   # before: ran for minutes
        assert_error(refused, 413, "image_too_slow", "serving.max_request_seconds")
        speed = health(server)["admission"]["speed"]
        assert speed["batch_seconds"]["observations"] == 0      # refused before a single tile was computed
        assert speed["prior_source"].startswith("runtime.json speed_prior[torch]")
        measured = json.loads((model_dir / RUNTIME_FILE).read_text())[PRIOR_KEY]["torch"]
        assert speed["batch_seconds"]["fixed"] == pytest.approx(measured["batch"]["fixed"])   # the sidecar's numbers
        assert health(server)["model"]["run_id"] == "run123"                                  # also from runtime.json
    (model_dir / RUNTIME_FILE).unlink()     # a `dvc pull` of the artifact (DVC ignores runtime.json): the built-in one
    with running_server(model_dir) as server:
        speed = health(server)["admission"]["speed"]
        assert speed["prior_source"].startswith("built-in conservative prior")
        assert speed["batch_seconds"]["fixed"] == pytest.approx(BUILT_IN_PRIOR.batch.fixed)
        assert health(server)["model"]["run_id"] is None
        assert_error(httpx.post(f"{server.url}/api/deblur", content=huge, timeout=30), 413, "image_too_slow")


def test_a_request_the_estimate_got_wrong_stops_at_the_deadline_and_teaches_it(tmp_path):
    limit = 8
    model_dir = make_artifact(tmp_path, serving={"max_request_seconds": limit, **ROOMY}, **SLOW)
    side = side_for(model_dir, 5 * limit)   # 64-pixel tiles: 5x the limit in a worker here, now
    runtime = json.loads((model_dir / RUNTIME_FILE).read_text())
    measured = prior_from_meta(runtime, "torch")
    plan = plan_tiles(side, side, 64, 0, PARAMS.tiling.batch_size, 1)
    # a prior that estimates the image at 4.5 s: admitted with room to spare for reading it; learning from
    # two of its tile batches (each at most 4x the prediction) takes the estimate over the limit
    factor = SpeedModel(measured).seconds_for(plan) / 4.5
    too_fast = SpeedPrior(batch=Line(measured.batch.fixed / factor, measured.batch.per_pixel / factor),
                          request=Line(measured.request.fixed / factor, measured.request.per_pixel / factor),
                          size_multiple=1, source=f"{factor:.0f}x too fast")
    runtime[PRIOR_KEY] = {"torch": too_fast.to_json()}
    (model_dir / RUNTIME_FILE).write_text(json.dumps(runtime))
    body = png(side, side)
    batches = len(list(plan.batches()))
    with running_server(model_dir) as server, httpx.Client(base_url=server.url, timeout=600) as client:
        stopped = client.post("/api/deblur?tile_size=64&overlap=0", content=body)   # before: 200 after it all ran
        assert_error(stopped, 503, "deadline_exceeded", "serving.max_request_seconds")
        ran = float(stopped.json()["detail"].split("stopped after ")[1].split(" s")[0])
        assert ran >= limit, stopped.json()   # stopped at the next tile batch after the deadline
        learned = health(server)["admission"]["speed"]
        batch = learned["batch_seconds"]   # a 64x64 tile batch, as the prior said and as learned
        assert 0 < batch["observations"] < batches / 2, (batch["observations"], batches)   # stopped, not finished
        assert batch["fixed"] + batch["per_megapixel"] * 4096e-6 > 3 * too_fast.batch.at(4096)
        assert_error(client.post("/api/deblur?tile_size=64&overlap=0", content=body), 413, "image_too_slow")
        assert client.post("/api/deblur", content=png(64, 48)).status_code == 200
        assert "deadline_exceeded after" in server.log()


def test_abandoned_requests_stop_and_the_worker_serves_the_next_one_promptly(tmp_path):
    model_dir = make_artifact(tmp_path, serving={"max_request_seconds": 1000, **ROOMY}, **SLOW)
    side = side_for(model_dir, 10)   # 10 s of work each: far more than the clients wait for
    body = png(side, side)
    batches = len(list(plan_tiles(side, side, 64, 0, PARAMS.tiling.batch_size, 1).batches()))

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
        wait_for(lambda: health(server)["in_flight"] == 0, timeout=120)   # before: 6 until all six were computed
        computed = health(server)["admission"]["speed"]["batch_seconds"]["observations"]
        assert computed < batches, (computed, batches)   # not even one of the six ran to its end
        next_one = httpx.post(f"{server.url}/api/deblur", content=png(64, 48), timeout=120)
        assert next_one.status_code == 200   # sent with nothing in flight: nothing abandoned is ahead of it
        log = server.log()
        assert log.count("cancelled after") == 6 and log.count("the client disconnected") == 6
        assert log.count('"POST /api/deblur HTTP/1.1" 200') == 1   # before: seven


def test_sigterm_answers_the_queue_at_once_and_stops_the_running_request_after_the_grace(tmp_path):
    grace = 4
    model_dir = make_artifact(tmp_path, serving={"max_request_seconds": 1000, "shutdown_grace_seconds": grace,
                                                 **ROOMY}, **SLOW)
    side = side_for(model_dir, 30)   # 64-pixel tiles: 30 s of work, far beyond the grace
    body = png(side, side)
    answered: dict[int, float] = {}

    def post(number: int) -> httpx.Response:
        response = httpx.post(f"{server.url}/api/deblur?tile_size=64&overlap=0", content=body, timeout=300)
        answered[number] = time.monotonic()
        return response

    with running_server(model_dir) as server:
        with ThreadPoolExecutor(2) as pool:
            answers = [pool.submit(post, number) for number in range(2)]   # one runs, one waits
            # both admitted and the running one past its first tile batch: one is computing, one is queued
            wait_for(lambda: (h := health(server))["in_flight"] == 2
                     and h["admission"]["speed"]["batch_seconds"]["observations"] > 0, timeout=120)
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(timeout=120)   # before #13: still running 95 s later
            replies = [answer.result() for answer in answers]
        assert [r.json()["error"] for r in replies] == ["shutting_down"] * 2, [r.text for r in replies]
        queued, running = sorted(range(2), key=lambda n: "grace" in replies[n].json()["detail"])
        assert "admits no new requests" in replies[queued].json()["detail"]
        assert f"after the {grace} s grace (serving.shutdown_grace_seconds)" in replies[running].json()["detail"]
        # the queued request was answered at once, while the running one still had its grace to go
        # (before: only when the running one stopped, the two answers a few ms apart)
        assert answered[running] - answered[queued] > grace / 2, answered
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


def test_sockets_that_send_only_headers_hold_no_memory_and_lock_no_upload_out(tmp_path):
    """16 connections declaring 40 MiB each and sending nothing more: before, each reserved its
    Content-Length up front, the 640 MiB budget was gone, and every real upload got 503 ``busy`` until
    the 30 s pause limit closed them. Bytes are now held as they arrive."""
    model_dir = make_artifact(tmp_path, serving={"max_body_mb": 50, "max_buffered_mb": 640}, **SMALL)
    declared = 40 * 2**20
    with running_server(model_dir) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in range(16)]
        try:
            for sock in idle:
                sock.sendall(f"POST /api/deblur HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                             f"Content-Length: {declared}\r\n\r\n".encode())
            # every one of them has reached the route and waits for its body (before: each held 40 MiB)
            wait_for(lambda: (m := health(server)["admission"]["memory"]).get("receiving_bodies") == 16
                     or m["used_mb"] >= 16 * 40, timeout=60)
            for width, height in ((64, 48), (1280, 720)):
                served = httpx.post(f"{server.url}/api/deblur", content=png(width, height), timeout=120)
                assert served.status_code == 200, served.text   # before: 503 busy
            memory = health(server)["admission"]["memory"]
            assert memory["used_mb"] == 0 and memory["receiving_bodies"] == 16, memory   # before: 640 MiB held
            # a 30 MiB upload while they wait: its bytes are held as they arrive, and given back
            big = np.random.default_rng(0).integers(0, 256, 30 * 2**20, np.uint8).tobytes()
            assert_error(httpx.post(f"{server.url}/api/deblur", content=big, timeout=120), 415,
                         "unsupported_media_type")
            assert health(server)["admission"]["memory"]["used_mb"] == 0
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: health(server)["admission"]["memory"]["receiving_bodies"] == 0, timeout=60)
        assert "Traceback" not in server.log()
