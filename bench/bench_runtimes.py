"""Serving runtimes side by side in one run: torch vs ONNX Runtime (deblur.onnx_runtime).

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

Rounds alternate the order (torch, onnx, then onnx, torch, ...); the table gives the median
over rounds. CPU load from other processes slows both; compare within one run only.

    python bench/bench_runtimes.py [--checkpoint checkpoints/pretrained/nafnet16.pt] [--rounds 2]
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
    from deblur.config import load_params
    from deblur.serving import export_serving_artifact

    params = load_params(ROOT / "params.yaml")
    started = time.perf_counter()
    export_serving_artifact(checkpoint, out, {"name": "bench", "version": "1", "alias": "champion"},
                            tiling=params.tiling, serving=params.serving, onnx=True)
    meta = json.loads((out / "model.json").read_text())
    return {"export_total_seconds": round(time.perf_counter() - started, 1), "onnx": meta["onnx"],
            "model_pt_mb": round((out / "model.pt").stat().st_size / 1e6, 2),
            "model_onnx_mb": round((out / "model.onnx").stat().st_size / 1e6, 2)}


def quality_720p(artifact: Path, threads: int) -> dict:
    """ONNX Runtime against torch through each runtime's own tiled path, on a 720p photo."""
    from deblur.onnx_runtime import load_onnx_serving_model
    from deblur.serving import load_serving_model

    rgb = photo(1280, 720)
    results, seconds = {}, {}
    for runtime, load in (("torch", load_serving_model), ("onnx", load_onnx_serving_model)):
        model = load(artifact, threads)
        model.deblur(rgb[:288, :288])   # warm-up
        started = time.perf_counter()
        results[runtime] = model.deblur(rgb)
        seconds[runtime] = round(time.perf_counter() - started, 2)
    diff = np.abs(results["torch"].astype(int) - results["onnx"].astype(int))
    return {"psnr_onnx_vs_torch_db": round(psnr(results["onnx"], results["torch"]), 2),
            "max_abs_diff": int(diff.max()), "pixels_differing": int((diff > 0).sum()),
            "psnr_torch_vs_input_db": round(psnr(results["torch"], rgb), 2),
            "in_process_720p_seconds": seconds}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def serve_and_measure(artifact: Path, runtime: str, bodies: dict[str, bytes], blocker: Path,
                      big: bool = True) -> dict:
    """Start a server on ``artifact`` (its model.json says ``runtime``), time the first response and each body."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBLUR_")}
    if runtime == "onnx":
        env["PYTHONPATH"] = os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{runtime}-", suffix=".log", delete=False)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "deblur.service", "--host", "127.0.0.1", "--port", str(port),
                                "--model-dir", str(artifact)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    out: dict = {"runtime": runtime}
    try:
        first = bodies["first"]
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{runtime} server exited: {Path(log.name).read_text()[-3000:]}")
            if time.perf_counter() - started > 300:
                raise TimeoutError(f"{runtime} server gave no response in 300 s")
            try:
                reply = httpx.post(f"{url}/api/deblur", content=first, headers={"Content-Type": "image/jpeg"},
                                   timeout=300)
                if reply.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        out["cold_start_seconds"] = round(time.perf_counter() - started, 2)
        health = httpx.get(f"{url}/api/health", timeout=10).json()
        out["served_by"] = health["model"].get("runtime")
        out["load_seconds"] = health["model"]["load_seconds"]
        for label, body in bodies.items():
            if label == "first" or (label == "4096" and not big):
                continue
            times = []
            for _ in range(3 if label == "720p" else 1):
                mark = time.perf_counter()
                reply = httpx.post(f"{url}/api/deblur", content=body, headers={"Content-Type": "image/jpeg"},
                                   timeout=600)
                if reply.status_code != 200:
                    raise RuntimeError(f"{runtime} {label}: HTTP {reply.status_code} {reply.text[:300]}")
                times.append(time.perf_counter() - mark)
            out[f"latency_{label}_seconds"] = round(min(times), 2)
        out["peak_rss_mb"] = round(peak_rss_mb(process.pid), 1)
        out["torch_imported"] = "torch" in Path(f"/proc/{process.pid}/maps").read_text()
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return out


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
    med = report["median"]
    rows = [("cold start to first response (s)", "cold_start_seconds"), ("model load (s)", "load_seconds"),
            ("1280x720 JPEG latency (s, best of 3)", "latency_720p_seconds"),
            ("4096x4096 JPEG latency (s, first round)", "latency_4096_seconds"), ("peak RSS (MB)", "peak_rss_mb")]
    lines = [
        "# Serving runtimes: torch vs ONNX Runtime",
        "",
        f"`python bench/bench_runtimes.py` on {report['machine']}, {report['date']}; checkpoint "
        f"`{report['checkpoint']}`, {report['rounds']} round(s), median shown (every round in runtimes.json).",
        "",
        "| | torch | onnx |",
        "|---|---|---|",
        *(f"| {label} | {med['torch'][key]} | {med['onnx'][key]} |" for label, key in rows),
        f"| installed packages (MB, requirement set with dependencies) | {report['packages']['torch']['mb']} | "
        f"{report['packages']['onnx']['mb']} |",
        f"| model file (MB) | {report['export']['model_pt_mb']} (model.pt) | {report['export']['model_onnx_mb']} "
        "(model.onnx) |",
        "",
        f"ONNX export: {report['export']['onnx']['export_seconds']} s (whole artifact export with both speed "
        f"priors {report['export']['export_total_seconds']} s); check tiles {report['export']['onnx']['check_psnr_db']} dB.",
        f"ONNX Runtime vs torch on a 1280x720 photo through the service's tiling: "
        f"{report['quality']['psnr_onnx_vs_torch_db']} dB PSNR, max |diff| {report['quality']['max_abs_diff']} "
        f"(uint8), {report['quality']['pixels_differing']} values differ; in process "
        f"{report['quality']['in_process_720p_seconds']} s.",
        f"The ONNX server ran with `import torch` blocked: torch mapped into it: "
        f"{any(r['torch_imported'] for r in report['runs'] if r['runtime'] == 'onnx')}.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "pretrained" / "nafnet16.pt")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--big", type=int, default=4096, help="side of the large square request")
    parser.add_argument("--artifact", type=Path, default=None,
                        help="a serving artifact exported with model.onnx (skips the export)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    work = Path(tempfile.mkdtemp(prefix="bench-runtimes-"))
    try:
        both = work / "both"
        if args.artifact:
            shutil.copytree(args.artifact, both)
            meta = json.loads((both / "model.json").read_text())
            export = {"export_total_seconds": None, "onnx": meta["onnx"],
                      "model_pt_mb": round((both / "model.pt").stat().st_size / 1e6, 2),
                      "model_onnx_mb": round((both / "model.onnx").stat().st_size / 1e6, 2)}
        else:
            export = export_artifact(args.checkpoint, both)
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
            (artifacts[runtime] / "model.json").write_text(json.dumps(meta, indent=2))
        blocker = work / "block_torch"
        blocker.mkdir()
        (blocker / "sitecustomize.py").write_text(BLOCK_TORCH)
        bodies = {"first": jpeg(photo(256, 256)), "720p": jpeg(photo(1280, 720)), "4096": jpeg(photo(args.big, args.big))}
        runs = []
        for r in range(args.rounds):
            for runtime in (RUNTIMES if r % 2 == 0 else RUNTIMES[::-1]):
                run = {"round": r, **serve_and_measure(artifacts[runtime], runtime, bodies, blocker, big=r == 0)}
                print(run, flush=True)
                runs.append(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = ("cold_start_seconds", "load_seconds", "latency_720p_seconds", "latency_4096_seconds", "peak_rss_mb")
    median = {rt: {k: round(statistics.median(r[k] for r in runs if r["runtime"] == rt and k in r), 2) for k in keys}
              for rt in RUNTIMES}
    packages = {}
    for runtime, path in REQUIREMENTS.items():
        mb, names = installed_mb(requirement_names(path))
        packages[runtime] = {"requirements": str(path.relative_to(ROOT)), "mb": mb, "distributions": names}
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "checkpoint": str(args.checkpoint.relative_to(ROOT) if args.checkpoint.is_relative_to(ROOT)
                                else args.checkpoint),
              "rounds": args.rounds, "big_side": args.big, "export": export, "quality": quality,
              "runs": runs, "median": median, "packages": packages}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtimes.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / "runtimes.md")
    print((args.out / "runtimes.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
