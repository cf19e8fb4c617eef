"""Serving a photo on a busy machine: our server against ``mlflow models serve`` of the same model.

One 1280x720 JPEG (scikit-image's astronaut, scaled to cover and centre-cropped) is deblurred to
PNG, end to end over loopback, by:

- ``ours``: ``python -m deblur.service --model-dir ART`` (what ``make serve`` runs), ART exported
  from the registered model's checkpoint with params.yaml's ``tiling`` and ``serving``;
- ``mlflow``: ``mlflow models serve -m models:/deblur@champion --env-manager local`` (base64 PNG in
  a ``dataframe_split`` JSON, the contract of documentation/model_contract.md);
- ``ours_before`` (unless ``--no-before``): our server with libgomp's own default wait policy
  (``OMP_WAIT_POLICY=default`` is not a policy libgomp knows, so it warns and keeps its default),
  i.e. the service before it set ``OMP_WAIT_POLICY=PASSIVE``.

Each in two conditions, alternated within one run: ``idle`` (nothing of ours but the server) and
``busy`` (beside ``--hogs`` processes that spin a core each, as other jobs do on a shared
machine or an Azure Functions instance). Every repetition runs both conditions (their order
alternating) and, in each, one request per server (their order rotating), so slow drifts in the
machine's load fall on all alike. Per request: wall time, the server's CPU seconds (process and
children: what a spinning thread burns shows here) and the cores kept busy by the rest of the
machine (``other``, from /proc/stat minus our processes).

Model: ``--model-uri`` in ``--tracking-uri`` (default ``models:/deblur@champion`` in
``sqlite:///mlflow.db``, what ``make demo`` registers) if it resolves; else the shipped NAFNet-16
(``checkpoints/pretrained/nafnet16.pt``, the demo's champion) registered as ``deblur`` with the
alias ``champion`` in a temporary sqlite store, as the register stage logs it
(``deblur.tracking.pyfunc.log_deblur_model``).

    nice -n 10 python bench/bench_busy_serving.py [--repeats 5] [--hogs 2] [--no-before]

Writes bench/results/busy_serving.json and bench/results/busy_serving.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PRETRAINED = ROOT / "checkpoints" / "pretrained" / "nafnet16.pt"
CONDITIONS = ("idle", "busy")
SPIN = "while True:\n    pass\n"
# each server starts with the environment's thread settings removed: it runs with its own defaults
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_PROC_BIND")

REGISTER = """
import sys
import mlflow
from deblur.core.config import load_params
from deblur.tracking.pyfunc import log_deblur_model

params = load_params(sys.argv[1])
mlflow.set_tracking_uri(sys.argv[3])
mlflow.set_experiment("bench-busy-serving")
with mlflow.start_run(run_name="nafnet16-pretrained"):
    log_deblur_model(sys.argv[2], params.tiling, max_pixels=params.serving.max_pixels, registered_model_name="deblur")
client = mlflow.MlflowClient()
version = max(int(v.version) for v in client.search_model_versions("name='deblur'"))
client.set_registered_model_alias("deblur", "champion", str(version))
"""

EXPORT = """
import sys
from pathlib import Path
import mlflow
from deblur.core.config import load_params
from deblur.artifact.export import export_serving_artifact
from deblur.tracking.registry_io import parse_models_uri as _parse_models_uri

params, uri, out = load_params(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
mlflow.set_tracking_uri(sys.argv[4])
local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(out.parent / "download")))
weights = sorted(local.rglob("*.pt"))
assert len(weights) == 1, weights
name, alias, version = _parse_models_uri(uri)
client = mlflow.MlflowClient()
registered = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
export_serving_artifact(weights[0], out, {"model_name": name, "version": str(registered.version),
                                          "alias": alias or "none", "model_uri": uri, "run_id": registered.run_id,
                                          "metrics": {}}, tiling=params.tiling, serving=params.serving)
print(weights[0])
"""


def photo_jpeg(width: int = 1280, height: int = 720) -> bytes:
    from skimage import data

    img = Image.fromarray(data.astronaut())
    scale = max(width / img.width, height / img.height)
    img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                     Image.Resampling.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    buf = io.BytesIO()
    img.crop((left, top, left + width, top + height)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES and not k.startswith("DEBLUR_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


# ---------------------------------------------------------------- the model, registered and exported

def registered_model(tracking_uri: str | None, model_uri: str, work: Path) -> tuple[str, str, str]:
    """(tracking URI, model URI, where it came from): the asked one if it resolves, else NAFNet-16 registered here."""
    candidates = [tracking_uri] if tracking_uri else []
    if not tracking_uri and (ROOT / "mlflow.db").is_file():
        candidates.append(f"sqlite:///{ROOT / 'mlflow.db'}")
    for uri in candidates:
        check = subprocess.run([sys.executable, "-c", "import sys, mlflow; mlflow.set_tracking_uri(sys.argv[1]); "
                                "mlflow.models.get_model_info(sys.argv[2])", uri, model_uri],
                               cwd=ROOT, capture_output=True, text=True, env=clean_env())
        if check.returncode == 0:
            return uri, model_uri, f"{model_uri} in {uri}"
        print(f"{model_uri} not found in {uri}; registering {PRETRAINED.relative_to(ROOT)} in a temporary store",
              file=sys.stderr)
    store = f"sqlite:///{work / 'mlflow.db'}"
    subprocess.run([sys.executable, "-c", REGISTER, str(ROOT / "params.yaml"), str(PRETRAINED), store], cwd=work,
                   check=True, env=clean_env(MLFLOW_TRACKING_URI=store))
    return store, "models:/deblur@champion", (f"{PRETRAINED.relative_to(ROOT)} registered as deblur v1 "
                                              "@champion in a temporary sqlite store (log_deblur_model)")


def export_artifact(tracking_uri: str, model_uri: str, out: Path) -> str:
    run = subprocess.run([sys.executable, "-c", EXPORT, str(ROOT / "params.yaml"), model_uri, str(out), tracking_uri],
                         cwd=out.parent, check=True, capture_output=True, text=True,
                         env=clean_env(MLFLOW_TRACKING_URI=tracking_uri))
    return run.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------- servers, hogs, CPU accounting

class Server:
    def __init__(self, name: str, command: list[str], env: dict, ready_path: str, log_dir: Path, cwd: Path) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w")
        self.ready_path = ready_path
        command = [part.replace("{port}", str(self.port)) for part in command]
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                response = httpx.get(self.url + self.ready_path, timeout=5)
                if response.status_code == 200 and (self.ready_path != "/api/health" or response.json()["ready"]):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready after {timeout} s")

    def cpu_seconds(self) -> float:
        return tree_cpu(self.process.pid)

    def deblur(self, jpeg: bytes) -> httpx.Response:
        if self.name.startswith("ours"):
            response = httpx.post(f"{self.url}/api/deblur?format=png", content=jpeg,
                                  headers={"Content-Type": "image/jpeg"}, timeout=600)
            return response
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(jpeg).decode("ascii")]]}}
        return httpx.post(f"{self.url}/invocations", json=body, timeout=600)

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        self._log.close()


def tree_cpu(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


def busy_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return sum(getattr(times, field) for field in times._fields if field not in ("idle", "iowait"))


class Hogs:
    """``count`` processes spinning a core each (pure Python: no OpenMP of their own)."""

    def __init__(self, count: int) -> None:
        self.count, self.processes = count, []

    def start(self) -> None:
        self.processes = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(self.count)]
        time.sleep(1.0)

    def cpu_seconds(self) -> float:
        return sum(tree_cpu(p.pid) for p in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()
        self.processes = []


def check_png(response: httpx.Response, server: Server) -> tuple[int, int]:
    if server.name.startswith("ours"):
        data = response.content
    else:
        data = base64.b64decode(response.json()["predictions"][0]["image"])
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def timed_request(server: Server, jpeg: bytes, ours: list, hogs: Hogs) -> dict:
    before_busy, before_ours, before_server = busy_cpu_seconds(), sum(tree_cpu(p) for p in ours), server.cpu_seconds()
    before_hogs = hogs.cpu_seconds()
    started = time.perf_counter()
    response = server.deblur(jpeg)
    seconds = time.perf_counter() - started
    after_busy, after_ours, after_server = busy_cpu_seconds(), sum(tree_cpu(p) for p in ours), server.cpu_seconds()
    after_hogs = hogs.cpu_seconds()
    size = check_png(response, server) if response.status_code == 200 else None
    other = (after_busy - before_busy) - (after_ours - before_ours) - (after_hogs - before_hogs)
    return {"status": response.status_code, "seconds": round(seconds, 3), "size": size,
            "server_cpu_seconds": round(after_server - before_server, 3),
            "hog_cores": round((after_hogs - before_hogs) / seconds, 2),
            "other_cores": round(max(other, 0.0) / seconds, 2), "load_1min": round(os.getloadavg()[0], 2),
            **({"inference_ms": float(response.headers["X-Inference-Ms"])} if "X-Inference-Ms" in response.headers
               else {})}


# ---------------------------------------------------------------- report

def summarize(samples: list[dict]) -> dict:
    seconds = sorted(s["seconds"] for s in samples if s["status"] == 200)
    if not seconds:
        return {"n": 0, "errors": len(samples)}
    return {"n": len(seconds), "errors": len(samples) - len(seconds),
            "median_s": round(statistics.median(seconds), 2), "min_s": round(seconds[0], 2),
            "max_s": round(seconds[-1], 2), "mean_s": round(statistics.fmean(seconds), 2),
            "server_cpu_s_median": round(statistics.median(s["server_cpu_seconds"] for s in samples), 2),
            "other_cores_median": round(statistics.median(s["other_cores"] for s in samples), 2),
            "load_1min_median": round(statistics.median(s["load_1min"] for s in samples), 2)}


def write_markdown(report: dict, path: Path) -> None:
    summary = report["summary"]
    names = [n for n in ("ours", "ours_before", "mlflow") if n in summary]
    label = {"ours": "ours (`python -m deblur.service`)", "mlflow": "`mlflow models serve`",
             "ours_before": "ours before (libgomp's default wait policy)"}
    lines = [
        "# Serving on a busy machine",
        "",
        f"`python bench/bench_busy_serving.py`, {report['when']}, commit `{report['git']['commit'][:7]}`"
        f"{' (dirty)' if report['git']['dirty'] else ''}; {report['machine']['cpu']}, {report['machine']['cores']} "
        f"cores, bench nice {report['machine']['nice']} (servers and hogs inherit it).",
        "",
        f"Model: {report['model']['source']}; ours serves the artifact exported from its checkpoint "
        f"(`{report['model']['checkpoint_name']}`) with params.yaml's tiling {report['tiling']}. One 1280x720 JPEG "
        f"(astronaut) to PNG per request, {report['repeats']} repetitions per server and condition, conditions "
        f"alternated within the run; `busy` = {report['hogs']} processes spinning a core each.",
        "",
        "| server | condition | median s | min-max s | server CPU s per request (median) | other jobs' cores "
        "(median) | load, 1 min (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        for condition in CONDITIONS:
            s = summary[name][condition]
            if not s.get("n"):
                lines.append(f"| {label[name]} | {condition} | errors: {s.get('errors')} | | | | |")
                continue
            lines.append(f"| {label[name]} | {condition} | {s['median_s']} | {s['min_s']}-{s['max_s']} | "
                         f"{s['server_cpu_s_median']} | {s['other_cores_median']} | {s['load_1min_median']} |")
    lines += ["", "Median ratio mlflow / ours (above 1: ours is faster):"]
    for condition in CONDITIONS:
        ratio = report["ratios"].get(condition, {})
        parts = [f"mlflow/ours {ratio['mlflow_over_ours']}"] if "mlflow_over_ours" in ratio else []
        if "before_over_ours" in ratio:
            parts.append(f"before/ours {ratio['before_over_ours']}")
        lines.append(f"- {condition}: {', '.join(parts)}")
    lines += ["", f"Every request (wall and CPU seconds, hog and other cores, load): `{Path(report['out_json']).name}` "
              "(`samples`).", ""]
    path.write_text("\n".join(lines))


def git_commit() -> dict:
    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite:///mlflow.db if it exists")
    parser.add_argument("--model-uri", default="models:/deblur@champion")
    parser.add_argument("--repeats", type=int, default=5, help="requests per server and condition")
    parser.add_argument("--hogs", type=int, default=2, help="processes spinning a core each in the busy condition")
    parser.add_argument("--no-before", action="store_true", help="skip our server with libgomp's default policy")
    parser.add_argument("--out", type=Path, default=RESULTS / "busy_serving.json")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-busy-serving-"))
    log_dir = work / "logs"
    log_dir.mkdir()
    tracking_uri, model_uri, source = registered_model(args.tracking_uri, args.model_uri, work)
    artifact = work / "artifact"
    checkpoint = export_artifact(tracking_uri, model_uri, artifact)
    meta = json.loads((artifact / "model.json").read_text())
    print(f"model: {source}; artifact {artifact}", file=sys.stderr)

    ours_cmd = [sys.executable, "-m", "deblur.service", "--host", "127.0.0.1", "--port", "{port}", "--model-dir",
                str(artifact)]
    variants = {"ours": (ours_cmd, clean_env(), "/api/health")}
    if not args.no_before:
        variants["ours_before"] = (ours_cmd, clean_env(OMP_WAIT_POLICY="default"), "/api/health")
    variants["mlflow"] = ([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                           "local", "-h", "127.0.0.1", "-p", "{port}"],
                          clean_env(MLFLOW_TRACKING_URI=tracking_uri), "/ping")
    jpeg = photo_jpeg()
    hogs = Hogs(args.hogs)
    servers: list[Server] = []
    samples: list[dict] = []
    try:
        for name, (command, env, ready) in variants.items():
            servers.append(Server(name, command, env, ready, log_dir, ROOT if name.startswith("ours") else work))
        for server in servers:
            server.wait_ready()
            warm = server.deblur(jpeg)   # first request: lazy imports, first-call allocations
            assert warm.status_code == 200, (server.name, warm.status_code, warm.text[:500])
            print(f"{server.name}: ready, warm-up {check_png(warm, server)}", file=sys.stderr)
        pids = [server.process.pid for server in servers]
        for repeat in range(args.repeats):
            for condition in (CONDITIONS if repeat % 2 == 0 else CONDITIONS[::-1]):
                if condition == "busy":
                    hogs.start()
                else:
                    time.sleep(2.0)   # the machine settles after the hogs
                shift = repeat % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    sample = {"server": server.name, "condition": condition, "repeat": repeat,
                              **timed_request(server, jpeg, pids, hogs)}
                    samples.append(sample)
                    print(json.dumps(sample), file=sys.stderr)
                hogs.stop()
    finally:
        hogs.stop()
        for server in servers:
            server.stop()

    summary = {name: {c: summarize([s for s in samples if s["server"] == name and s["condition"] == c])
                      for c in CONDITIONS} for name in variants}
    ratios = {}
    for condition in CONDITIONS:
        ours = summary["ours"][condition].get("median_s")
        ratios[condition] = {}
        if ours and summary["mlflow"][condition].get("median_s"):
            ratios[condition]["mlflow_over_ours"] = round(summary["mlflow"][condition]["median_s"] / ours, 2)
        if ours and "ours_before" in summary and summary["ours_before"][condition].get("median_s"):
            ratios[condition]["before_over_ours"] = round(summary["ours_before"][condition]["median_s"] / ours, 2)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": git_commit(),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "nice": os.nice(0), "python": platform.python_version()},
        "model": {"source": source, "model_uri": model_uri, "checkpoint_name": Path(checkpoint).name,
                  "artifact_version": meta.get("version"), "weights_sha256": meta.get("weights_sha256")},
        "tiling": {k: meta["tiling"][k] for k in ("tile_size", "overlap", "batch_size")},
        "threads": meta["serving"]["threads"], "repeats": args.repeats, "hogs": args.hogs,
        "summary": summary, "ratios": ratios, "samples": samples, "log_dir": str(log_dir),
        "out_json": str(args.out),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
