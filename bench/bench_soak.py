"""Soak and bursts: a real ``python -m deblur.service`` under sustained mixed load, then abuse.

Starts the server on loopback (``--model-dir``; default ``function_app/model`` if it holds a
``model.json``, else a serving artifact exported here from ``checkpoints/pretrained/nafnet16.pt``
with params.yaml's ``tiling`` and ``serving``) and runs these phases in order:

- ``baseline``: one client, sequential 1280x720 JPEG photos: the same-run latency reference;
- ``soak``: ``--clients`` clients for ``--minutes`` sending a seeded mix (720p JPEG and PNG,
  512x512, 64x64, multipart, bad requests); p50/p95/max latency per kind, throughput,
  statuses;
- ``uploads``: 20 concurrent ~45 MB uploads with ``Content-Length`` (an 8-bit 6700x6700 BMP:
  over ``max_pixels``, so it measures holding bodies, not inference); one body buffer shared;
- ``pixels40mp``: ten concurrent 6400x6250 (40 MP) PNGs that compress to a few MB;
- ``abandoned``: six 720p requests abandoned after 1 s (client timeout), then one normal one;
  ``in_flight`` from ``/api/health`` until it is back to 0;
- ``tiny``: six 8x8 requests, then one 720p request (does the speed check get poisoned?);
- ``slow_clients``: ``--slow-clients`` raw sockets that send half a request and stall (half
  within the headers, half within a declared body) while one client keeps sending 720p photos.

The server's RSS (process and children, psutil) is sampled every 50 ms throughout: peak per
phase and overall, against the Consumption plan's 1.5 GB. Every phase records what the server
answered (status codes, never assumed 200) and the time to answer. Before each phase the bench
waits up to ``--settle-s`` for ``in_flight`` to reach 0, else restarts the server (recorded);
``--fresh-server-per-burst`` starts every burst on a new server instead of the warm one.

    nice -n 19 python bench/bench_soak.py [--minutes 10] [--clients 4] [--only soak,tiny] [--skip-bursts]

Writes ``bench/results/soak.json`` and ``soak.md`` (``--out``); runs shorter than 10 minutes are
marked short.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PRETRAINED = ROOT / "checkpoints" / "pretrained" / "nafnet16.pt"
BURSTS = ("uploads", "pixels40mp", "abandoned", "tiny", "slow_clients")
PHASES = ("baseline", "soak", *BURSTS)
CONSUMPTION_PLAN_MB = 1536  # Azure Functions Consumption plan: 1.5 GB per instance
MB = 2 ** 20
SOAK_MIX = {  # kind: weight in the soak's seeded request mix
    "jpeg_720p": 35, "png_720p": 12, "jpeg_512": 20, "png_64": 15, "multipart_720p": 8, "bad": 10,
}
FULL_SOAK_MINUTES = 10
STREAM_ABOVE = 8 * MB  # request bodies larger than this are sent in slices


# ---------------------------------------------------------------- request bodies

def photos() -> list[np.ndarray]:
    """Real colour photos shipped with scikit-image (no download)."""
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]


def cover(rgb: np.ndarray, width: int, height: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """``rgb`` scaled to cover width x height, then centre-cropped to it."""
    img = Image.fromarray(rgb)
    scale = max(width / img.width, height / img.height)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, resample)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


class Bodies:
    """Every request body of the run, built once (the big ones only when their burst runs)."""

    def __init__(self) -> None:
        rgbs = photos()
        self.jpeg_720p = [encode(cover(p, 1280, 720), "JPEG", quality=92) for p in rgbs]
        self.png_720p = [encode(cover(p, 1280, 720), "PNG") for p in rgbs[:2]]
        self.jpeg_512 = [encode(cover(p, 512, 512), "JPEG", quality=92) for p in rgbs]
        self.png_64 = [encode(cover(p, 64, 64), "PNG") for p in rgbs]
        self.png_8 = encode(cover(rgbs[1], 8, 8), "PNG")
        rng = np.random.default_rng(0)
        self.bad = [  # (label, body, content type, query)
            ("garbage", rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes(), "application/octet-stream", {}),
            ("truncated_jpeg", self.jpeg_720p[0][: len(self.jpeg_720p[0]) // 3], "image/jpeg", {}),
            ("empty", b"", "image/jpeg", {}),
            ("bad_tile_size", self.jpeg_512[0], "image/jpeg", {"tile_size": "100000"}),
        ]

    @staticmethod
    def upload_45mb() -> bytes:
        """An uncompressed 8-bit 6700x6700 BMP (44.9 MB): read in full, then over ``max_pixels``."""
        from skimage import data

        return encode(Image.fromarray(data.camera()).resize((6700, 6700), Image.Resampling.NEAREST), "BMP")

    @staticmethod
    def png_40mp() -> bytes:
        """A 6400x6250 photo PNG (40.0 MP) upscaled 5x with nearest neighbour, so it compresses small."""
        return encode(cover(photos()[0], 1280, 1250).resize((6400, 6250), Image.Resampling.NEAREST), "PNG")


# ---------------------------------------------------------------- server and memory

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_rss(process: psutil.Process) -> int:
    """RSS of a process and its children, in bytes (0 once it is gone)."""
    try:
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


class RssSampler(threading.Thread):
    """Samples the server's RSS (process + children) and this bench's own every ``interval`` s."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.interval = interval
        self.server: psutil.Process | None = None
        self.phase = "startup"
        self.peaks: dict[str, int] = {}
        self.bench_peak = 0
        self.current = 0
        self.trace: list[tuple[float, int]] = []  # (seconds since start, max MB in that second)
        self.started = time.monotonic()
        self._stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        second, second_max = -1, 0
        while not self._stop.is_set():
            rss = tree_rss(self.server) if self.server is not None else 0
            self.current = rss
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            self.bench_peak = max(self.bench_peak, me.memory_info().rss)
            now = int(time.monotonic() - self.started)
            if now != second:
                if second >= 0:
                    self.trace.append((second, round(second_max / MB)))
                second, second_max = now, 0
            second_max = max(second_max, rss)
            self._stop.wait(self.interval)

    def peak_mb(self, phase: str) -> float:
        return round(self.peaks.get(phase, 0) / MB, 1)

    def stop(self) -> None:
        self._stop.set()


class Server:
    """``python -m deblur.service`` on loopback; its process is handed to the RSS sampler."""

    def __init__(self, model_dir: Path, port: int | None, log_dir: Path, sampler: RssSampler) -> None:
        self.model_dir, self.log_dir, self.sampler = model_dir, log_dir, sampler
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.starts = 0
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Start and wait until the model is loaded; returns seconds from spawn to ready."""
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEBLUR_")}
        self.log_path = self.log_dir / f"server-{self.starts}.log"
        log = self.log_path.open("w")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deblur.service", "--host", "127.0.0.1", "--port", str(self.port),
             "--model-dir", str(self.model_dir)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.sampler.server = psutil.Process(self.process.pid)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            health = self.health(timeout=2)
            if health.get("ready"):
                return time.perf_counter() - started
            if health.get("error"):
                raise RuntimeError(f"server could not load the model: {health['error']}")
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after 300 s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def health(self, timeout: float = 5) -> dict:
        """``/api/health`` as a dict; ``{}`` when it does not answer."""
        try:
            return httpx.get(f"{self.url}/api/health", timeout=timeout).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def wait_idle(self, timeout: float) -> float | None:
        """Seconds until ``in_flight`` is 0 (None if not within ``timeout`` or the server is gone)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                return None
            health = self.health()
            if health and health.get("in_flight", 0) == 0:
                return round(time.monotonic() - started, 2)
            time.sleep(0.25)
        return None

    def stop(self, grace: float) -> dict:
        """SIGTERM, then SIGKILL after ``grace`` s; says which ended it."""
        if self.process is None or self.process.poll() is not None:
            return {"already_exited": None if self.process is None else self.process.returncode}
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
            return {"exited_after_sigterm_s": round(time.monotonic() - started, 2),
                    "returncode": self.process.returncode}
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return {"killed_after_s": round(time.monotonic() - started, 2)}


# ---------------------------------------------------------------- requests and summaries

@dataclass
class Outcome:
    kind: str
    status: int | str          # HTTP status, or "timeout" / "disconnected" / "connect_error" from the client
    seconds: float             # until the response was read (or the client gave up)
    answer_s: float | None     # until the status line arrived
    response_bytes: int = 0
    error: str = ""            # the JSON error code of a non-200 answer


def send(client: httpx.Client, url: str, kind: str, body: bytes | None, content_type: str | None = None,
         params: dict | None = None, files: dict | None = None, timeout: float = 240) -> Outcome:
    """One POST /api/deblur; the response is streamed and discarded (client memory stays bounded)."""
    headers = {"Content-Type": content_type} if content_type else {}
    if body is not None and len(body) > STREAM_ABOVE:
        # in 1 MB slices with an explicit Content-Length: whole, httpx/h11 would copy each body once more
        headers["Content-Length"] = str(len(body))
        view = memoryview(body)
        body = (view[i: i + MB] for i in range(0, len(view), MB))
    started = time.perf_counter()
    answer_s = None
    try:
        with client.stream("POST", f"{url}/api/deblur", content=body, files=files, params=params,
                           headers=headers, timeout=timeout) as response:
            answer_s = time.perf_counter() - started
            size, error = 0, ""
            if response.status_code == 200:
                for chunk in response.iter_bytes():
                    size += len(chunk)
            else:
                text = response.read()
                size = len(text)
                try:
                    error = str(json.loads(text).get("error", ""))
                except (ValueError, AttributeError):
                    error = "non-json"
        return Outcome(kind, response.status_code, time.perf_counter() - started, answer_s, size, error)
    except httpx.TimeoutException:
        status = "timeout"
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        status = "disconnected"
    except httpx.ConnectError:
        status = "connect_error"
    return Outcome(kind, status, time.perf_counter() - started, answer_s)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))]


def summarize(outcomes: list[Outcome]) -> dict:
    """Count, latency p50/p95/max over answered requests, p50 of the 200s, time to the status line
    (p50, max), statuses (client-side ones included) and the JSON error codes."""
    answered = sorted(o.seconds for o in outcomes if isinstance(o.status, int))
    ok = sorted(o.seconds for o in outcomes if o.status == 200)
    answer = sorted(o.answer_s for o in outcomes if o.answer_s is not None)

    def r(value):
        return None if value is None else round(value, 3)

    return {
        "count": len(outcomes),
        "p50_s": r(percentile(answered, 50)), "p95_s": r(percentile(answered, 95)),
        "max_s": r(answered[-1] if answered else None), "ok_p50_s": r(percentile(ok, 50)),
        "answer_p50_s": r(percentile(answer, 50)), "answer_max_s": r(answer[-1] if answer else None),
        "statuses": dict(sorted(Counter(str(o.status) for o in outcomes).items())),
        "errors": dict(sorted(Counter(o.error for o in outcomes if o.error).items())),
    }


def each(outcomes: list[Outcome]) -> list[list]:
    """Per request: [kind, status, seconds to the status line, seconds in all]."""
    return [[o.kind, o.status, None if o.answer_s is None else round(o.answer_s, 2), round(o.seconds, 2)]
            for o in outcomes]


def by_kind(outcomes: list[Outcome]) -> dict:
    kinds = sorted({o.kind for o in outcomes})
    return {kind: summarize([o for o in outcomes if o.kind == kind]) for kind in kinds}


def busy_cpu_seconds(times) -> float:
    """Non-idle CPU seconds of the machine (guest time is already inside user time)."""
    idle = sum(getattr(times, f, 0) for f in ("idle", "iowait", "guest", "guest_nice"))
    return sum(times) - idle


class Load:
    """Machine load over a phase: load average, CPU busy (cores) of everyone, the server and this bench."""

    def __init__(self, server: psutil.Process | None) -> None:
        self.server = server
        self.started = time.monotonic()
        self.loadavg = os.getloadavg()
        self.cpu = psutil.cpu_times()
        self.server_cpu = self._cpu(server)
        self.bench_cpu = self._cpu(psutil.Process())

    @staticmethod
    def _cpu(process: psutil.Process | None) -> float:
        if process is None:
            return 0.0
        try:
            t = process.cpu_times()
            return t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            return 0.0

    def result(self) -> dict:
        wall = max(time.monotonic() - self.started, 1e-6)
        busy_cores = (busy_cpu_seconds(psutil.cpu_times()) - busy_cpu_seconds(self.cpu)) / wall
        server = (self._cpu(self.server) - self.server_cpu) / wall
        bench = (self._cpu(psutil.Process()) - self.bench_cpu) / wall
        return {"wall_s": round(wall, 1), "loadavg_start": round(self.loadavg[0], 2),
                "loadavg_end": round(os.getloadavg()[0], 2), "busy_cores": round(busy_cores, 2),
                "server_cores": round(server, 2), "bench_cores": round(bench, 2),
                "other_cores": round(max(busy_cores - server - bench, 0), 2)}


# ---------------------------------------------------------------- phases

class Bench:
    def __init__(self, args: argparse.Namespace, model_dir: Path, serving: dict) -> None:
        self.args, self.serving = args, serving
        self.bodies = Bodies()
        self.sampler = RssSampler()
        self.log_dir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
        self.server = Server(model_dir, args.port, self.log_dir, self.sampler)
        self.grace = float(serving.get("shutdown_grace_seconds", 20)) + 15
        self.events: list[dict] = []

    def client(self) -> httpx.Client:
        return httpx.Client(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))

    def photo(self, client: httpx.Client, i: int, kind: str = "jpeg_720p", timeout: float | None = None) -> Outcome:
        body = self.bodies.jpeg_720p[i % len(self.bodies.jpeg_720p)]
        return send(client, self.server.url, kind, body, "image/jpeg", timeout=timeout or self.args.request_timeout)

    def pace(self, sent: float) -> None:
        """A client's next request starts at least ``--min-interval-s`` after its previous one."""
        time.sleep(max(0.0, sent + self.args.min_interval_s - time.monotonic()))

    def before_phase(self, phase: str) -> dict:
        """The server idle (restarted if it stays busy or died), the sampler on ``phase``."""
        note = {}
        if self.server.process.poll() is not None:
            note = {"restarted": f"server had exited with {self.server.process.returncode}"}
        elif self.args.fresh_server_per_burst and phase in BURSTS:
            note = {"restarted": "--fresh-server-per-burst", "stop": self.server.stop(self.grace)}
        else:
            idle = self.server.wait_idle(self.args.settle_s)
            if idle is None:
                note = {"restarted": f"still busy after {self.args.settle_s:g} s",
                        "stop": self.server.stop(self.grace)}
            elif idle > 0.5:
                note = {"waited_for_idle_s": idle}
        if "restarted" in note:
            note["ready_after_s"] = round(self.server.start(), 2)
            self.events.append({"before": phase, **note})
            print(f"  server restarted before {phase}: {note['restarted']}", flush=True)
        self.sampler.phase = phase
        return note

    def run_phase(self, phase: str) -> dict:
        print(f"== {phase} (server RSS now {self.sampler.current / MB:.0f} MB)", flush=True)
        note = self.before_phase(phase)
        load = Load(self.sampler.server)
        try:
            result = getattr(self, f"phase_{phase}")()
        except Exception as exc:  # recorded; the next phase restarts the server if it is gone
            result = {"failed": f"{type(exc).__name__}: {exc}", "requests": {}}
        result["load"] = load.result()
        result["peak_rss_mb"] = self.sampler.peak_mb(phase)
        if note:
            result["before"] = note
        print(f"   {phase}: {json.dumps({k: v for k, v in result.items() if k != 'each'})[:800]}", flush=True)
        return result

    def phase_baseline(self) -> dict:
        with self.client() as client:
            outcomes = [self.photo(client, i) for i in range(self.args.baseline_requests)]
        return {"requests": by_kind(outcomes)}

    def soak_request(self, client: httpx.Client, rng: np.random.Generator) -> Outcome:
        b, timeout, url = self.bodies, self.args.request_timeout, self.server.url
        kinds, weights = zip(*SOAK_MIX.items())
        kind = kinds[rng.choice(len(kinds), p=np.array(weights) / sum(weights))]
        pick = int(rng.integers(0, 1 << 30))
        if kind == "jpeg_720p":
            return send(client, url, kind, b.jpeg_720p[pick % len(b.jpeg_720p)], "image/jpeg", timeout=timeout)
        if kind == "png_720p":
            return send(client, url, kind, b.png_720p[pick % len(b.png_720p)], "image/png",
                        params={"format": "jpeg"}, timeout=timeout)
        if kind == "jpeg_512":
            return send(client, url, kind, b.jpeg_512[pick % len(b.jpeg_512)], "image/jpeg", timeout=timeout)
        if kind == "png_64":
            return send(client, url, kind, b.png_64[pick % len(b.png_64)], "image/png", timeout=timeout)
        if kind == "multipart_720p":
            body = b.jpeg_720p[pick % len(b.jpeg_720p)]
            return send(client, url, kind, None, files={"image": ("photo.jpg", body, "image/jpeg")},
                        params={"format": "webp"}, timeout=timeout)
        label, body, content_type, params = b.bad[pick % len(b.bad)]
        return send(client, url, f"bad_{label}", body, content_type, params=params, timeout=timeout)

    def phase_soak(self) -> dict:
        from deblur.core.progress import progress

        seconds = self.args.minutes * 60
        deadline = time.monotonic() + seconds
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def client_loop(index: int) -> None:
            rng = np.random.default_rng([self.args.seed, index])
            with self.client() as client:
                while time.monotonic() < deadline:
                    sent = time.monotonic()
                    outcome = self.soak_request(client, rng)
                    with lock:
                        outcomes.append(outcome)
                    self.pace(sent)

        started = time.monotonic()
        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(self.args.clients)]
        for t in threads:
            t.start()
        with progress(total=int(seconds), desc="soak", unit="s") as bar:
            while any(t.is_alive() for t in threads):
                time.sleep(1)
                with lock:
                    statuses = Counter(str(o.status) for o in outcomes)
                bar.set_postfix_str(f"{len(outcomes)} done {dict(statuses)} RSS {self.sampler.current / MB:.0f} MB",
                                    refresh=False)
                bar.update(min(int(time.monotonic() - started), int(seconds)) - bar.n)
        wall = time.monotonic() - started
        answered = [o for o in outcomes if isinstance(o.status, int)]
        return {"clients": self.args.clients, "minutes": self.args.minutes, "wall_s": round(wall, 1),
                "throughput_rps": round(len(answered) / wall, 3),
                "ok_per_minute": round(60 * sum(o.status == 200 for o in outcomes) / wall, 2),
                "overall": summarize(outcomes), "requests": by_kind(outcomes)}

    def concurrent(self, count: int, request) -> list[Outcome]:
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda i: request(i), range(count)))

    def phase_uploads(self) -> dict:
        body = Bodies.upload_45mb()  # one buffer for all 20 requests

        def upload(_: int) -> Outcome:
            with self.client() as client:
                return send(client, self.server.url, "bmp_45mb", body, "image/bmp", timeout=self.args.request_timeout)

        outcomes = self.concurrent(20, upload)
        return {"body_mb": round(len(body) / MB, 1), "requests": by_kind(outcomes), "each": each(outcomes)}

    def phase_pixels40mp(self) -> dict:
        body = Bodies.png_40mp()

        def request(_: int) -> Outcome:
            with self.client() as client:
                return send(client, self.server.url, "png_40mp", body, "image/png", params={"format": "jpeg"},
                            timeout=self.args.request_timeout)

        outcomes = self.concurrent(10, request)
        return {"body_mb": round(len(body) / MB, 2), "requests": by_kind(outcomes), "each": each(outcomes)}

    def phase_abandoned(self) -> dict:
        def abandoned(i: int) -> Outcome:
            with self.client() as client:
                return self.photo(client, i, kind="abandoned_720p", timeout=1.0)

        outcomes = self.concurrent(6, abandoned)
        gave_up = time.monotonic()
        normal: list[Outcome] = []

        def normal_request() -> None:
            with self.client() as client:
                normal.append(self.photo(client, 0, kind="after_720p"))

        worker = threading.Thread(target=normal_request, daemon=True)
        worker.start()
        trace = []  # (seconds since the six gave up, in_flight incl. the normal request)
        while time.monotonic() - gave_up < self.args.request_timeout + self.args.settle_s:
            in_flight = self.server.health().get("in_flight")
            trace.append((round(time.monotonic() - gave_up, 2), in_flight))
            if in_flight == 0 and not worker.is_alive():
                break
            time.sleep(0.25)
        worker.join(timeout=self.args.request_timeout + 5)
        done = [*outcomes, *normal]
        return {"requests": by_kind(done), "each": each(done),
                "in_flight_at_give_up": trace[0][1] if trace else None,
                "in_flight_max_after_2s": max((n for t, n in trace if t >= 2 and n is not None), default=None),
                "in_flight_zero_after_s": next((t for t, n in trace if n == 0), None),
                "in_flight_trace": trace[:: max(1, len(trace) // 60)]}

    def phase_tiny(self) -> dict:
        before = self.server.health()
        with self.client() as client:
            outcomes = [send(client, self.server.url, "png_8x8", self.bodies.png_8, "image/png",
                             timeout=self.args.request_timeout) for _ in range(6)]
            outcomes.append(self.photo(client, 1, kind="after_720p"))
        after = self.server.health()
        speed_keys = [k for k in after if "speed" in k or "per_megapixel" in k or "admission" in k]
        return {"requests": by_kind(outcomes), "each": each(outcomes),
                "speed_before": {k: before.get(k) for k in speed_keys},
                "speed_after": {k: after.get(k) for k in speed_keys}}

    def phase_slow_clients(self) -> dict:
        count = self.args.slow_clients
        hold = self.args.slow_hold_s or (max(self.serving.get("header_timeout_seconds", 10),
                                             self.serving.get("body_timeout_seconds", 120)) + 10)
        host = f"127.0.0.1:{self.server.port}"
        partial = {
            "headers": f"POST /api/deblur HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\nContent-Le".encode(),
            "body": (f"POST /api/deblur HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
                     f"Content-Length: 200000\r\n\r\n").encode() + self.bodies.jpeg_720p[0][:1000],
        }
        selector = selectors.DefaultSelector()
        sockets, opened, refused = [], time.monotonic(), 0
        for i in range(count):
            group = "headers" if i % 2 == 0 else "body"
            try:
                sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=5)
                sock.sendall(partial[group])
            except OSError:
                refused += 1
                continue
            sock.setblocking(False)
            state = {"group": group, "closed_s": None, "status": None}
            selector.register(sock, selectors.EVENT_READ, state)
            sockets.append((sock, state))
        normal: list[Outcome] = []
        stop = threading.Event()

        def normal_client() -> None:
            with self.client() as client:
                i = 0
                while not stop.is_set():
                    sent = time.monotonic()
                    normal.append(self.photo(client, i, kind="normal_720p"))
                    i += 1
                    self.pace(sent)

        worker = threading.Thread(target=normal_client, daemon=True)
        worker.start()
        open_left = len(sockets)
        while time.monotonic() - opened < hold and open_left:
            for key, _ in selector.select(timeout=0.5):
                sock, state = key.fileobj, key.data
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if data and state["status"] is None:
                    first = data.split(b"\r\n", 1)[0].split()
                    state["status"] = int(first[1]) if len(first) > 1 and first[1].isdigit() else "garbled"
                if not data or state["status"] is not None:
                    state["closed_s"] = round(time.monotonic() - opened, 1)
                    selector.unregister(sock)
                    open_left -= 1
        held_s = time.monotonic() - opened
        stop.set()
        worker.join(timeout=self.args.request_timeout + 5)
        for sock, _ in sockets:
            sock.close()
        selector.close()
        groups = {}
        for group in partial:
            states = [s for _, s in sockets if s["group"] == group]
            closed = sorted(s["closed_s"] for s in states if s["closed_s"] is not None)
            groups[f"stalled_in_{group}"] = {
                "count": len(states), "closed_by_server": len(closed),
                "closed_p50_s": percentile(closed, 50), "closed_max_s": closed[-1] if closed else None,
                "answers": dict(Counter(str(s["status"]) for s in states if s["status"] is not None)),
                "still_open_at_end": len(states) - len(closed)}
        return {"slow_clients": count, "connect_failures": refused, "held_s": round(held_s, 1),
                "slow": groups, "requests": by_kind(normal)}

    def run(self, phases: list[str]) -> dict:
        self.sampler.start()
        result: dict = {"phases": {}}
        try:
            result["ready_after_s"] = round(self.server.start(), 2)
            result["idle_rss_mb"] = round(self.sampler.current / MB, 1)
            for phase in phases:
                result["phases"][phase] = self.run_phase(phase)
            self.sampler.phase = "shutdown"
            result["stop"] = self.server.stop(self.grace)
        finally:
            if self.server.process is not None and self.server.process.poll() is None:
                self.server.process.kill()
            self.sampler.stop()
        result["server_starts"] = self.server.starts
        result["restarts"] = self.events
        result["peak_rss_mb"] = round(max(self.sampler.peaks.values(), default=0) / MB, 1)
        result["bench_peak_rss_mb"] = round(self.sampler.bench_peak / MB, 1)
        result["rss_trace_mb"] = self.sampler.trace
        result["server_log"] = str(self.server.log_path)
        return result


# ---------------------------------------------------------------- setup and report

def resolve_model_dir(requested: Path | None, keep: Path) -> tuple[Path, str]:
    """The artifact to serve, and where it came from (exports the pretrained NAFNet-16 if needed)."""
    if requested is not None:
        return requested, str(requested)
    shipped = ROOT / "function_app" / "model"
    if (shipped / "model.json").is_file():
        return shipped, "function_app/model"
    out = keep / "model"
    code = ("import sys; from pathlib import Path; from deblur.core.config import load_params; "
            "from deblur.artifact.export import export_serving_artifact; p = load_params(Path(sys.argv[1])); "
            "export_serving_artifact(sys.argv[2], sys.argv[3], {'name': 'nafnet16-pretrained', 'version': 'none', "
            "'alias': 'none', 'run_id': None, 'metrics': {}}, tiling=p.tiling, serving=p.serving)")
    subprocess.run([sys.executable, "-c", code, str(ROOT / "params.yaml"), str(PRETRAINED), str(out)],
                   cwd=ROOT, check=True)
    return out, f"exported from {PRETRAINED.relative_to(ROOT)} with params.yaml's tiling and serving"


def machine() -> dict:
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    return {"cpu": cpu_model, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "bench_and_server_nice": os.nice(0)}


def git_commit() -> dict:
    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def fmt(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def statuses_text(summary: dict) -> str:
    text = ", ".join(f"{k}: {v}" for k, v in summary["statuses"].items())
    return text + (f" ({', '.join(f'{k} {v}' for k, v in summary['errors'].items())})" if summary["errors"] else "")


def speed_text(fields: dict) -> str:
    value = fields.get("seconds_per_megapixel")
    return f"{value:.3g}" if isinstance(value, (int, float)) else "-"


def markdown(r: dict) -> str:
    m, lines = r["machine"], []
    title = "# Soak and burst bench" + (" (SHORT RUN)" if r["short"] else "")
    lines += [title, "", "Written by `bench/bench_soak.py`; reading guide: documentation/serving.md, "
              "\"Soak and bursts\".", ""]
    if r["short"]:
        lines += [f"**Short run**: {r['args']['minutes']} minute(s) of soak, not the {FULL_SOAK_MINUTES}-minute "
                  "figures.", ""]
    lines += [f"- When: {r['when']}; commit `{r['git']['commit'][:12]}`" + (" (uncommitted changes)" if
              r["git"]["dirty"] else ""),
              f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; load average at start "
              f"{r['loadavg_start']}",
              f"- Model: {r['model']['source']} ({r['model'].get('architecture')}); tiling {r['model'].get('tiling')}",
              f"- Server: ready {r['ready_after_s']} s after spawn, idle RSS {r['idle_rss_mb']} MB; "
              f"{r['server_starts']} start(s); stop: {r['stop']}",
              f"- **Server peak RSS over the run: {r['peak_rss_mb']} MB** (Consumption plan line: "
              f"{CONSUMPTION_PLAN_MB} MB, {'under' if r['peak_rss_mb'] < CONSUMPTION_PLAN_MB else 'OVER'}); "
              f"the bench's own peak RSS {r['bench_peak_rss_mb']} MB", ""]
    lines += ["| phase | kind | count | p50 s | p95 s | max s | statuses (error codes) | phase peak RSS MB |",
              "|---|---|---|---|---|---|---|---|"]
    for phase, p in r["phases"].items():
        for kind, s in p["requests"].items():
            lines.append(f"| {phase} | {kind} | {s['count']} | {fmt(s['p50_s'])} | {fmt(s['p95_s'])} | "
                         f"{fmt(s['max_s'])} | {statuses_text(s)} | {p['peak_rss_mb']} |")
    lines += ["", "Load during each phase (cores busy over the phase: everyone / the server / this bench / "
              "the rest of the machine):", "",
              "| phase | wall s | load avg start/end | busy | server | bench | other |",
              "|---|---|---|---|---|---|---|"]
    for phase, p in r["phases"].items():
        ld = p["load"]
        lines.append(f"| {phase} | {ld['wall_s']} | {ld['loadavg_start']} / {ld['loadavg_end']} | {ld['busy_cores']} "
                     f"| {ld['server_cores']} | {ld['bench_cores']} | {ld['other_cores']} |")
    lines.append("")
    phases = {name: p for name, p in r["phases"].items() if "failed" not in p}
    for name, p in r["phases"].items():
        if "failed" in p:
            lines.append(f"- {name}: the bench failed: {p['failed']}")
    if "soak" in phases:
        s = phases["soak"]
        lines.append(f"- soak: {s['clients']} clients, {s['wall_s']} s, {s['throughput_rps']} answers/s, "
                     f"{s['ok_per_minute']} images/min; all requests: {statuses_text(s['overall'])}")
    if "uploads" in phases:
        lines.append(f"- uploads: 20 x {phases['uploads']['body_mb']} MB bodies at once")
    if "pixels40mp" in phases:
        lines.append(f"- pixels40mp: 10 x a {phases['pixels40mp']['body_mb']} MB 40 MP PNG at once")
    if "abandoned" in phases:
        a = phases["abandoned"]
        lines.append(f"- abandoned: in_flight {a['in_flight_at_give_up']} when the six clients gave up (the normal "
                     f"request included), at most {a['in_flight_max_after_2s']} from 2 s on, 0 after "
                     f"{fmt(a['in_flight_zero_after_s'])} s")
    if "tiny" in phases:
        t = phases["tiny"]
        lines.append(f"- tiny: /api/health seconds_per_megapixel before {speed_text(t['speed_before'])}, "
                     f"after {speed_text(t['speed_after'])} (all speed fields in the JSON)")
    if "slow_clients" in phases:
        sc = phases["slow_clients"]
        parts = [f"{g}: {v['closed_by_server']}/{v['count']} closed by the server (p50 {fmt(v['closed_p50_s'])} s, "
                 f"max {fmt(v['closed_max_s'])} s, answers {v['answers']})" for g, v in sc["slow"].items()]
        lines.append(f"- slow_clients: {sc['slow_clients']} sockets held {sc['held_s']} s "
                     f"({sc['connect_failures']} failed to connect); " + "; ".join(parts))
    if r["restarts"]:
        lines.append(f"- server restarts: {r['restarts']}")
    return "\n".join(lines) + "\n"


def parse_phases(args: argparse.Namespace) -> list[str]:
    wanted = [p.strip() for p in args.only.split(",")] if args.only else list(PHASES)
    unknown = [p for p in wanted if p not in PHASES]
    if unknown:
        raise SystemExit(f"--only: unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    return [p for p in wanted if not (args.skip_bursts and p in BURSTS)]   # in the order asked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Soak and burst bench of the HTTP service (real server process).")
    parser.add_argument("--minutes", type=float, default=FULL_SOAK_MINUTES, help="soak duration")
    parser.add_argument("--clients", type=int, default=4, help="concurrent soak clients")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="serving artifact (default: function_app/model, else the pretrained NAFNet-16 exported)")
    parser.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json", help="JSON result; markdown beside it")
    parser.add_argument("--only", default=None, help=f"comma-separated phases to run, in this order, of {', '.join(PHASES)}")
    parser.add_argument("--skip-bursts", action="store_true", help="baseline and soak only")
    parser.add_argument("--baseline-requests", type=int, default=5)
    parser.add_argument("--slow-clients", type=int, default=250, help="half-sent sockets in the slow_clients burst")
    parser.add_argument("--slow-hold-s", type=float, default=None,
                        help="how long they are held (default: the larger serving timeout + 10 s)")
    parser.add_argument("--request-timeout", type=float, default=240,
                        help="client timeout per request (Azure's load balancer cuts at 230 s)")
    parser.add_argument("--settle-s", type=float, default=120,
                        help="wait this long for in_flight 0 before a phase, else restart the server")
    parser.add_argument("--fresh-server-per-burst", action="store_true",
                        help="start each burst on a new server process (default: the warm one from the soak)")
    parser.add_argument("--min-interval-s", type=float, default=0.5,
                        help="a soak or normal client waits this long between request starts (fast errors)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    phases = parse_phases(args)
    keep = Path(tempfile.mkdtemp(prefix="bench-soak-model-"))
    model_dir, source = resolve_model_dir(args.model_dir, keep)
    meta = json.loads((model_dir / "model.json").read_text())
    bench = Bench(args, model_dir, meta.get("serving", {}))
    result = {
        "short": args.minutes < FULL_SOAK_MINUTES,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "phases_run": phases,
        "machine": machine(), "git": git_commit(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "model": {"source": source, "architecture": meta.get("architecture"), "tiling": meta.get("tiling"),
                  "serving": meta.get("serving")},
        "soak_mix": SOAK_MIX, "consumption_plan_mb": CONSUMPTION_PLAN_MB,
    }
    print(f"soak bench: phases {', '.join(phases)}; model {source}; logs in {bench.log_dir}", flush=True)
    try:
        result.update(bench.run(phases))
    finally:
        shutil.rmtree(keep, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}; server peak RSS {result['peak_rss_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
