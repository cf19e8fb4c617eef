"""HTTP serving: latency, throughput, cold start and memory of ``python -m deblur.service``.

Starts the real server on a free loopback port with the given serving artifact and sends
JPEG photos (scikit-image's 'chelsea', resized) of each size at each concurrency:

- latency p50/p95 and throughput per (size, concurrency), errors (must be 0);
- cold start: process start to the first successful deblur response (model load included);
- peak RSS of the server process (VmHWM) after the load phases;
- peak RSS of one ``--big`` x ``--big`` request in a fresh server process;
- in process, the same model: tiled (batched, feathered, grid-aligned) vs the naive loop
  (one tile at a time, uniform averaging), time and PSNR against whole-image inference.

The bench restarts itself with the server's allocator settings (``deblur.service.MALLOC_ENV``).

    python bench/bench_serving.py --model-dir function_app/model [--label unet] [--requests 4]

Adds its entry (by --label) to bench/results/serving.json and rewrites bench/results/serving.md.
Every request loop is bounded by --requests and --budget-s.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def photo_jpeg(width: int, height: int) -> bytes:
    from skimage import data

    img = Image.fromarray(data.chelsea()).resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


class Server:
    """The web app in its own process; ``cold_start_s`` is spawn to first successful deblur."""

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEBLUR_")}
        self.log = (log_dir / f"server-{self.port}.log").open("w")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deblur.service", "--host", "127.0.0.1", "--port", str(self.port),
             "--model-dir", str(model_dir)], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def first_response(self, body: bytes, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}, see {self.log.name}")
            try:
                if httpx.post(f"{self.url}/api/deblur", content=body, timeout=timeout).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError("no successful response")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def load_phase(url: str, body: bytes, concurrency: int, requests: int, budget_s: float) -> dict:
    """``requests`` POSTs with ``concurrency`` in flight; stops starting new ones after ``budget_s``."""
    started = time.perf_counter()

    def one(_: int) -> tuple[float, int, float]:
        if time.perf_counter() - started > budget_s:
            return math.nan, -1, math.nan
        t0 = time.perf_counter()
        response = httpx.post(f"{url}/api/deblur", content=body, headers={"Content-Type": "image/jpeg"}, timeout=600)
        infer = float(response.headers.get("X-Inference-Ms", "nan"))
        return time.perf_counter() - t0, response.status_code, infer

    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    done = [o for o in outcomes if o[1] != -1]
    latencies = sorted(o[0] for o in done)
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "skipped_by_budget": len(outcomes) - len(done),
        "errors": sum(1 for o in done if o[1] != 200),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)], 3)
        if latencies else None,
        "inference_p50_ms": round(statistics.median(o[2] for o in done), 1) if done else None,
        "throughput_rps": round(len(done) / wall, 3),
        "wall_s": round(wall, 2),
    }


def tiled_vs_naive(model_dir: Path, width: int, height: int, threads: int) -> dict:
    """The artifact's model in process: batched feathered tiles vs the naive loop, against whole-image inference."""
    import torch

    from deblur.artifact.torch_model import load_serving_model
    from deblur.inference.tiling import naive_tiled_inference, tiled_inference

    served = load_serving_model(model_dir, threads=threads)
    rgb = np.asarray(Image.open(io.BytesIO(photo_jpeg(width, height))).convert("RGB"))
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    t = served.tiling
    with torch.inference_mode():
        started = time.perf_counter()
        whole = served.model(image).clamp(0, 1)
        whole_s = time.perf_counter() - started
    started = time.perf_counter()
    tiled = tiled_inference(served.model, image, t.tile_size, t.overlap, t.batch_size)
    tiled_s = time.perf_counter() - started
    started = time.perf_counter()
    naive = naive_tiled_inference(served.model, image, t.tile_size, t.overlap)
    naive_s = time.perf_counter() - started

    def psnr(a, b) -> float:
        mse = torch.mean((a.double() - b.double()) ** 2).item()
        return round(10 * math.log10(1 / mse), 2) if mse > 0 else math.inf

    return {"size": f"{width}x{height}", "tiling": t.model_dump(), "whole_image_s": round(whole_s, 2),
            "tiled_s": round(tiled_s, 2), "naive_s": round(naive_s, 2),
            "tiled_vs_whole_psnr_db": psnr(tiled, whole), "naive_vs_whole_psnr_db": psnr(naive, whole)}


def big_request(model_dir: Path, side: int, log_dir: Path) -> dict:
    """Peak RSS of one side x side request in a fresh server process."""
    server = Server(model_dir, log_dir)
    try:
        server.first_response(photo_jpeg(64, 64))
        before = peak_rss_mb(server.process.pid)
        body = photo_jpeg(side, side)
        started = time.perf_counter()
        response = httpx.post(f"{server.url}/api/deblur", content=body, headers={"Content-Type": "image/jpeg"},
                              timeout=900)
        return {"size": f"{side}x{side}", "status": response.status_code,
                "seconds": round(time.perf_counter() - started, 1), "body_mb": round(len(body) / 1e6, 2),
                "response_mb": round(len(response.content) / 1e6, 2),
                "peak_rss_mb_before": round(before, 1), "peak_rss_mb": round(peak_rss_mb(server.process.pid), 1)}
    finally:
        server.stop()


def run(args: argparse.Namespace) -> dict:
    meta = json.loads((args.model_dir / "model.json").read_text())
    log_dir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    result = {
        "label": args.label or meta.get("architecture"),
        "model": {k: meta.get(k) for k in ("name", "version", "alias", "architecture", "weights_dtype")},
        "tiling": meta["tiling"], "threads": meta["serving"]["threads"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    server = Server(args.model_dir, log_dir)
    try:
        result["cold_start_s"] = round(server.first_response(photo_jpeg(256, 256)), 2)
        phases = []
        for size in args.sizes:
            width, height = (int(v) for v in size.split("x"))
            body = photo_jpeg(width, height)
            for concurrency in args.concurrency:
                count = max(args.requests, concurrency)
                phase = load_phase(server.url, body, concurrency, count, args.budget_s)
                phases.append({"size": size, **phase})
                print(json.dumps(phases[-1]), flush=True)
        result["load"] = phases
        result["errors"] = sum(p["errors"] for p in phases)
        result["server_peak_rss_mb"] = round(peak_rss_mb(server.process.pid), 1)
    finally:
        server.stop()
    if args.big:
        result["big_request"] = big_request(args.model_dir, args.big, log_dir)
        print(json.dumps(result["big_request"]), flush=True)
    width, height = (int(v) for v in args.compare_size.split("x"))
    result["tiled_vs_naive"] = tiled_vs_naive(args.model_dir, width, height, result["threads"])
    print(json.dumps(result["tiled_vs_naive"]), flush=True)
    return result


def markdown(entries: dict) -> str:
    lines = ["# Serving benchmark", "", "Written by bench/bench_serving.py; one section per model label.", ""]
    for label, r in entries.items():
        lines += [f"## {label}: {r['model']['architecture']} ({r['model']['weights_dtype']}), "
                  f"tile {r['tiling']['tile_size']}/{r['tiling']['overlap']}, batch {r['tiling']['batch_size']}, "
                  f"{r['threads']} threads", "",
                  f"{r['machine']['cpus']} CPUs, load average at start {r['machine']['load_avg_at_start']}, "
                  f"{r['when']}.",
                  f"Cold start (process start to first response): **{r['cold_start_s']} s**. "
                  f"Server peak RSS: **{r['server_peak_rss_mb']} MB**. Errors: **{r['errors']}**.", "",
                  "| size | concurrency | requests | p50 s | p95 s | inference p50 ms | throughput req/s | errors |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in r["load"]:
            lines.append(f"| {p['size']} | {p['concurrency']} | {p['requests']} | {p['latency_p50_s']} | "
                         f"{p['latency_p95_s']} | {p['inference_p50_ms']} | {p['throughput_rps']} | {p['errors']} |")
        big = r.get("big_request")
        if big:
            lines += ["", f"One {big['size']} request in a fresh process: status {big['status']}, {big['seconds']} s, "
                      f"peak RSS {big['peak_rss_mb']} MB (idle after load {big['peak_rss_mb_before']} MB)."]
        t = r["tiled_vs_naive"]
        lines += ["", f"In process at {t['size']}: whole image {t['whole_image_s']} s; tiled (batched, feathered) "
                  f"{t['tiled_s']} s, {t['tiled_vs_whole_psnr_db']} dB vs whole; naive loop {t['naive_s']} s, "
                  f"{t['naive_vs_whole_psnr_db']} dB vs whole.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the HTTP service on this machine.")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--label", default=None, help="entry name in the results (default: the architecture)")
    parser.add_argument("--sizes", nargs="+", default=["1280x720", "2048x2048"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=4,
                        help="requests per (size, concurrency), at least the concurrency")
    parser.add_argument("--budget-s", type=float, default=120, help="no new requests of a phase after this long")
    parser.add_argument("--big", type=int, default=4096, help="side of the fresh-process memory request (0: skip)")
    parser.add_argument("--compare-size", default="1280x720", help="image size of the tiled-vs-naive comparison")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    args = parser.parse_args(argv)
    from deblur.service.server import MALLOC_ENV

    if not all(k in os.environ for k in MALLOC_ENV):  # the server's allocator settings, here too
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**MALLOC_ENV, **os.environ})
    result = run(args)
    entries = json.loads(args.out.read_text()) if args.out.is_file() else {}
    entries[result["label"]] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(entries, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(entries))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 1 if result["errors"] or result.get("big_request", {}).get("status", 200) != 200 else 0


if __name__ == "__main__":
    sys.exit(main())
