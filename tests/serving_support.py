"""Shared by the serving tests: real checkpoints, serving artifacts, image files and server processes."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from deblur.core.config import load_params
from deblur.models.build import build_model
from deblur.artifact.export import export_serving_artifact

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")


def make_checkpoint(path: Path, name: str = "stacked_conv", seed: int = 0, **arch) -> Path:
    """A random-init checkpoint of ``name`` (architecture kwargs overridden by ``arch``)."""
    section = getattr(PARAMS.model, name).model_copy(update=arch)
    cfg = PARAMS.model.model_copy(update={"name": name, name: section})
    torch.manual_seed(seed)
    model = build_model(cfg)
    torch.save({"model_config": cfg.model_dump(), "state_dict": model.state_dict(),
                "train_patch_size": 96, "step": 0}, path)
    return path


def make_artifact(tmp: Path, serving: dict | None = None, tiling: dict | None = None,
                  name: str = "stacked_conv", kernel_aware: dict | None = None, **arch) -> Path:
    """A serving artifact in ``tmp/model`` from a small random-init model, with settings overridden;
    ``kernel_aware`` (params.yaml's section updated by it, ``{}`` for as is) writes the thorough mode's
    settings into model.json, None leaves them out (an artifact exported before kernel-aware restoration)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if name == "stacked_conv" and not arch:
        arch = {"channels": 8, "depth": 3}
    ckpt = make_checkpoint(tmp / "checkpoint.pt", name, **arch)
    meta = {"name": "deblur-test", "version": "7", "alias": "champion", "run_id": "run123", "metrics": {"psnr": 30.0}}
    return export_serving_artifact(
        ckpt, tmp / "model", meta,
        tiling=PARAMS.tiling.model_copy(update=tiling or {}),
        serving=PARAMS.serving.model_copy(update=serving or {}),
        kernel_aware=None if kernel_aware is None else PARAMS.kernel_aware.model_copy(update=kernel_aware),
    )


def smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic photo-like uint8 RGB image (smooth gradients and a few edges)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin((x + y) / 9.0)], axis=2)
    img[height // 3: height // 2, width // 4: width // 2] = rng.random(3)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m deblur.service`` as a real subprocess on a free loopback port."""

    def __init__(self, model_dir: Path | None, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix="deblur-server-")) / "server.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DEBLUR_")}
        full_env.update(env or {})
        self._log = self.log_path.open("w")
        self.started = time.perf_counter()
        model_args = ["--model-dir", str(model_dir)] if model_dir is not None else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deblur.service", "--host", "127.0.0.1", "--port", str(self.port), *model_args],
            cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 180.0, need_model: bool = True) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                health = httpx.get(f"{self.url}/api/health", timeout=2).json()
                if health["ready"] or not need_model or health["error"]:
                    return health
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@contextmanager
def running_server(model_dir: Path | None, env: dict | None = None, need_model: bool = True):
    server = ServerProcess(model_dir, env)
    try:
        server.wait_ready(need_model=need_model)
        yield server
    finally:
        server.stop()


SECONDS_PER_TILE = """
import sys, time
from deblur.core.runtime_env import prefer_passive_openmp

prefer_passive_openmp()   # as a worker runs its threads
import numpy as np
from deblur.artifact.torch_model import load_serving_model

model, tile = load_serving_model(sys.argv[1]), int(sys.argv[2])
rgb = np.random.default_rng(0).integers(0, 256, (4 * tile, 4 * tile, 3), dtype=np.uint8)
model.deblur(rgb, tile, 0)   # warm-up
runs = []
for _ in range(3):
    started = time.perf_counter()
    model.deblur(rgb, tile, 0)
    runs.append(time.perf_counter() - started)
print(min(runs) / 16)
"""


def seconds_per_tile(model_dir: Path, tile: int = 64) -> float:
    """Seconds per ``tile`` x ``tile`` tile (overlap 0) of the artifact's model, measured now in a fresh
    process with a worker's thread settings: the fastest of three runs, so work sized from it lasts at
    least as long on this machine. Not the export prior: that is measured in the test process, whose
    OpenMP threads spin (torch was imported before any OMP_WAIT_POLICY could be set), and on a loaded
    machine it came out 20x slower than a worker, so work sized from it ended too soon."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", SECONDS_PER_TILE, str(model_dir), str(tile)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    return float(run.stdout.split()[-1])


def wait_for(condition, timeout: float, step: float = 0.05) -> float:
    """Seconds until ``condition()`` holds; fails after ``timeout`` (an upper bound on an event, not a speed)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(step)
    return time.monotonic() - started
