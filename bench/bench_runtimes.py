"""Serving runtimes side by side in one run: torch vs ONNX Runtime (deblur.artifact.onnx_model).

From one checkpoint (default: the shipped NAFNet-16) it exports one serving artifact with
both ``model.pt`` and ``model.onnx`` and measures:

- export: seconds of the ONNX export; PSNR of ONNX Runtime against torch on a 1280x720 photo
  through the default tiling (whole service path: same tiles, same blend, uint8 output);
- per runtime, a real ``python -m deblur.service`` process on loopback (the ONNX one with
  ``import torch`` made impossible): cold start (process start to the first deblurred
  response, model load included), latency of a 1280x720 and a 4096x4096 JPEG, peak RSS of
  the process (VmHWM);
- installed size of each runtime's requirement set (function_app/requirements*.txt, with
  their dependencies, from importlib.metadata), and of the Function package's model files.

Cold starts alternate the order of fresh processes (torch, onnx, then onnx, torch, ...);
latencies come from both servers up at once, requests alternating between them, so load
from other processes slows both alike. Compare within one run only.

    python bench/bench_runtimes.py [--checkpoint checkpoints/pretrained/nafnet16.pt] [--rounds 3]
    python bench/bench_runtimes.py --artifact DIR   # an exported artifact with model.onnx: no export

Writes bench/results/runtimes.json and bench/results/runtimes.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import io
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
RUNTIMES = ("torch", "onnx")
REQUIREMENTS = {"torch": ROOT / "function_app" / "requirements.txt",
                "onnx": ROOT / "function_app" / "requirements-onnx.txt"}
BLOCK_TORCH = 'import sys\nsys.modules["torch"] = None   # `import torch` raises ImportError in this process\n'


def photo(width: int, height: int) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.chelsea()).resize((width, height), Image.Resampling.BICUBIC))


def jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def export_artifact(checkpoint: Path, out: Path) -> dict:
    """One serving artifact with model.pt and model.onnx; returns the export numbers."""
    from deblur.core.config import load_params
    from deblur.artifact.export import export_serving_artifact
    from deblur.artifact.meta import read_artifact_meta

    params = load_params(ROOT / "params.yaml")
    started = time.perf_counter()
    export_serving_artifact(checkpoint, out, {"name": "bench", "version": "1", "alias": "champion"},
                            tiling=params.tiling, serving=params.serving, onnx=True)
    meta = read_artifact_meta(out)   # with runtime.json: the export seconds are there
    return {"export_total_seconds": round(time.perf_counter() - started, 1), "onnx": meta["onnx"]}


def quality_720p(artifact: Path, threads: int) -> dict:
    """ONNX Runtime against torch through each runtime's own tiled path, on a 720p photo."""
    from deblur.artifact.onnx_model import load_onnx_serving_model
    from deblur.artifact.torch_model import load_serving_model

    rgb = photo(1280, 720)
    results, seconds = {}, {}
    for runtime, load in (("torch", load_serving_model), ("onnx", load_onnx_serving_model)):
        model = load(artifact, threads)
        model.deblur(rgb[:288, :288])   # warm-up
        started = time.perf_counter()
        results[runtime] = model.deblur(rgb)
        seconds[runtime] = round(time.perf_counter() - started, 2)
    diff = np.abs(results["torch"].astype(int) - results["onnx"].astype(int))
    return {"psnr_onnx_vs_torch_db": round(float(psnr(results["onnx"], results["torch"])), 2),
            "max_abs_diff": int(diff.max()), "pixels_differing": int((diff > 0).sum()),
            "psnr_torch_vs_input_db": round(float(psnr(results["torch"], rgb)), 2),
            "in_process_720p_seconds": seconds}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


class Server:
    """``python -m deblur.service`` on ``artifact`` (whose model.json says which runtime); the ONNX one
    runs with ``import torch`` made impossible."""

    def __init__(self, artifact: Path, runtime: str, blocker: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEBLUR_")}
        if runtime == "onnx":
            env["PYTHONPATH"] = os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.runtime, self.port = runtime, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{runtime}-", suffix=".log", delete=False)
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deblur.service", "--host", "127.0.0.1", "--port", str(self.port),
             "--model-dir", str(artifact)], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def first_response_seconds(self, body: bytes) -> float:
        """Seconds from process start to the first deblurred response (the model loads in between)."""
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.runtime} server exited: {Path(self.log.name).read_text()[-3000:]}")
            if time.perf_counter() - self.started > 300:
                raise TimeoutError(f"{self.runtime} server gave no response in 300 s")
            try:
                if self.post(body).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.05)

    def post(self, body: bytes) -> httpx.Response:
        return httpx.post(f"{self.url}/api/deblur", content=body, headers={"Content-Type": "image/jpeg"}, timeout=600)

    def timed(self, label: str, body: bytes) -> float:
        mark = time.perf_counter()
        reply = self.post(body)
        if reply.status_code != 200:
            raise RuntimeError(f"{self.runtime} {label}: HTTP {reply.status_code} {reply.text[:300]}")
        return time.perf_counter() - mark

    def facts(self) -> dict:
        health = httpx.get(f"{self.url}/api/health", timeout=10).json()
        return {"served_by": health["model"].get("runtime"), "load_seconds": health["model"]["load_seconds"],
                "peak_rss_mb": round(peak_rss_mb(self.process.pid), 1),
                "torch_mapped": "libtorch" in Path(f"/proc/{self.process.pid}/maps").read_text()}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def cold_starts(artifacts: dict[str, Path], blocker: Path, body: bytes, rounds: int) -> list[dict]:
    """One fresh server per round and runtime, alternating the order: time to the first response."""
    runs = []
    for r in range(rounds):
        for runtime in (RUNTIMES if r % 2 == 0 else RUNTIMES[::-1]):
            server = Server(artifacts[runtime], runtime, blocker)
            try:
                seconds = server.first_response_seconds(body)
                runs.append({"round": r, "runtime": runtime, "cold_start_seconds": round(seconds, 2), **server.facts()})
            finally:
                server.stop()
            print(runs[-1], flush=True)
    return runs


def latencies(artifacts: dict[str, Path], blocker: Path, bodies: dict[str, bytes], repeats: dict[str, int]) -> dict:
    """Both servers up at once, requests alternating between them, so load from other processes hits both alike."""
    servers = {runtime: Server(artifacts[runtime], runtime, blocker) for runtime in RUNTIMES}
    try:
        for server in servers.values():
            server.first_response_seconds(bodies["first"])
        times: dict[str, dict[str, list[float]]] = {rt: {label: [] for label in repeats} for rt in RUNTIMES}
        for label, count in repeats.items():
            for i in range(count):
                for runtime in (RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]):
                    times[runtime][label].append(round(servers[runtime].timed(label, bodies[label]), 2))
                    print(runtime, label, times[runtime][label][-1], flush=True)
        return {rt: {"seconds": times[rt], **servers[rt].facts()} for rt in RUNTIMES}
    finally:
        for server in servers.values():
            server.stop()


def requirement_names(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0])
    return names


def installed_mb(names: list[str]) -> tuple[float, list[str]]:
    """Size of the installed files of ``names`` and everything they require (extras left out)."""
    seen: dict[str, float] = {}
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            seen[name] = 0.0
            continue
        seen[name] = sum(Path(dist.locate_file(f)).stat().st_size for f in dist.files or []
                         if Path(dist.locate_file(f)).is_file()) / 1e6
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[=<>!~\[; (]", req, maxsplit=1)[0])
    return round(sum(seen.values()), 1), sorted(seen)


def write_markdown(report: dict, path: Path) -> None:
    summary, export, quality = report["summary"], report["export"], report["quality"]
    big = report["big_side"]
    rows = [("cold start to first response (s, median of fresh processes)", "cold_start_seconds"),
            ("model load (s)", "load_seconds"), ("peak RSS at the first response (MB)", "idle_rss_mb"),
            ("1280x720 JPEG latency (s, median)", "latency_720p_seconds"),
            (f"{big}x{big} JPEG latency (s, median)", "latency_big_seconds"),
            (f"peak RSS after the {big}x{big} requests (MB)", "peak_rss_mb"),
            ("torch mapped into the process", "torch_mapped")]
    export_total = f" (whole artifact export {export['export_total_seconds']} s)" if export["export_total_seconds"] else ""
    lines = [
        "# Serving runtimes: torch vs ONNX Runtime",
        "",
        f"`python bench/bench_runtimes.py` on {report['machine']}, {report['date']}; checkpoint "
        f"`{report['checkpoint']}`, `serving.threads` {report['threads']}. Cold starts: {report['rounds']} fresh "
        "processes per runtime, alternating; latencies: both servers up at once, requests alternating between "
        "them (other jobs on the machine slow both alike). Every single time is in runtimes.json.",
        "",
        "| | torch | onnx |",
        "|---|---|---|",
        *(f"| {label} | {summary['torch'][key]} | {summary['onnx'][key]} |" for label, key in rows),
        "| every 1280x720 request, in order (s) | " + " | ".join(
            ", ".join(map(str, report["latency"][rt]["seconds"]["720p"])) for rt in RUNTIMES) + " |",
        "| every cold start, in order (s) | " + " | ".join(
            ", ".join(str(r["cold_start_seconds"]) for r in report["cold_starts"] if r["runtime"] == rt)
            for rt in RUNTIMES) + " |",
        f"| installed packages (MB, requirement set with dependencies) | {report['packages']['torch']['mb']} | "
        f"{report['packages']['onnx']['mb']} |",
        f"| model file (MB) | {export['model_pt_mb']} (model.pt) | {export['model_onnx_mb']} (model.onnx) |",
        "",
        f"ONNX export: {export['onnx']['export_seconds']} s{export_total}; ONNX Runtime vs torch on the export "
        f"check tiles: {export['onnx']['check_psnr_db']} dB.",
        f"ONNX Runtime vs torch on a 1280x720 photo through the service's tiling: "
        f"{quality['psnr_onnx_vs_torch_db']} dB PSNR, max |diff| {quality['max_abs_diff']} (uint8), "
        f"{quality['pixels_differing']} values differ; in process {quality['in_process_720p_seconds']} s.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "pretrained" / "nafnet16.pt")
    parser.add_argument("--artifact", type=Path, default=None,
                        help="a serving artifact exported with model.onnx (skips the export)")
    parser.add_argument("--rounds", type=int, default=3, help="cold starts per runtime")
    parser.add_argument("--repeats", type=int, default=5, help="1280x720 requests per runtime")
    parser.add_argument("--big", type=int, default=4096, help="side of the large square request")
    parser.add_argument("--big-repeats", type=int, default=1, help="large requests per runtime")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-runtimes-"))
    try:
        both = work / "both"
        if args.artifact:
            from deblur.artifact.meta import read_artifact_meta   # torch-free

            shutil.copytree(args.artifact, both)
            export = {"export_total_seconds": None, "onnx": read_artifact_meta(both)["onnx"]}
        else:
            export = export_artifact(args.checkpoint, both)
        export.update(model_pt_mb=round((both / "model.pt").stat().st_size / 1e6, 2),
                      model_onnx_mb=round((both / "model.onnx").stat().st_size / 1e6, 2))
        print(f"export: {export}", flush=True)
        threads = json.loads((both / "model.json").read_text())["serving"]["threads"]
        quality = quality_720p(both, threads)
        print(f"quality: {quality}", flush=True)
        artifacts = {}
        for runtime in RUNTIMES:   # the same files, model.json saying which runtime serves them
            artifacts[runtime] = work / runtime
            shutil.copytree(both, artifacts[runtime])
            meta = json.loads((both / "model.json").read_text())
            meta["serving"]["runtime"] = runtime
            meta["serving"]["max_request_seconds"] = 3600   # measure, do not refuse (a loaded machine is slow)
            (artifacts[runtime] / "model.json").write_text(json.dumps(meta, indent=2))
        blocker = work / "block_torch"
        blocker.mkdir()
        (blocker / "sitecustomize.py").write_text(BLOCK_TORCH)
        bodies = {"first": jpeg(photo(256, 256)), "720p": jpeg(photo(1280, 720)), "big": jpeg(photo(args.big, args.big))}
        starts = cold_starts(artifacts, blocker, bodies["first"], args.rounds)
        latency = latencies(artifacts, blocker, bodies, {"720p": args.repeats, "big": args.big_repeats})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def of(runtime: str, key: str) -> list:
        return [r[key] for r in starts if r["runtime"] == runtime]

    summary = {rt: {
        "cold_start_seconds": round(statistics.median(of(rt, "cold_start_seconds")), 2),
        "load_seconds": round(statistics.median(of(rt, "load_seconds")), 2),
        "idle_rss_mb": round(statistics.median(of(rt, "peak_rss_mb")), 1),
        "latency_720p_seconds": round(statistics.median(latency[rt]["seconds"]["720p"]), 2),
        "latency_big_seconds": round(statistics.median(latency[rt]["seconds"]["big"]), 2),
        "peak_rss_mb": latency[rt]["peak_rss_mb"],
        "torch_mapped": latency[rt]["torch_mapped"] or any(of(rt, "torch_mapped")),
    } for rt in RUNTIMES}
    packages = {}
    for runtime, path in REQUIREMENTS.items():
        mb, names = installed_mb(requirement_names(path))
        packages[runtime] = {"requirements": str(path.relative_to(ROOT)), "mb": mb, "distributions": names}
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "checkpoint": str(args.checkpoint.relative_to(ROOT) if args.checkpoint.is_relative_to(ROOT)
                                else args.checkpoint) + (f" (exported earlier to {args.artifact})" if args.artifact else ""),
              "threads": threads, "rounds": args.rounds, "big_side": args.big, "export": export, "quality": quality,
              "cold_starts": starts, "latency": latency, "summary": summary, "packages": packages}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtimes.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / "runtimes.md")
    print((args.out / "runtimes.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
