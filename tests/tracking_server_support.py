"""A real MLflow tracking server on PostgreSQL (scripts/tracking_server.sh), on free loopback ports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from conftest import ROOT
from serving_support import free_port

SCRIPT = ROOT / "scripts" / "tracking_server.sh"


def postgres_missing() -> str | None:
    """Why the server cannot start here (a skip reason), or None when PostgreSQL's binaries are installed."""
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) and not shutil.which("initdb"):
        return "PostgreSQL server binaries not found: apt-get install postgresql (CI's .ci/run does)"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser: postgres cannot be started as an unprivileged user"
    return None


@dataclass
class TrackingServer:
    uri: str                 # http://127.0.0.1:<port>, the MLFLOW_TRACKING_URI clients use
    directory: Path          # TRACKING_DIR: pg/, artifacts/, logs/
    env: dict[str, str]      # the script's settings, for `status` and `stop`

    @property
    def artifacts(self) -> Path:
        return self.directory / "artifacts"

    def script(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), command], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def log(self) -> str:
        path = self.directory / "logs" / "mlflow-server.log"
        return path.read_text()[-5000:] if path.is_file() else "(no server log)"


@contextmanager
def tracking_server(workers: int = 1) -> Iterator[TrackingServer]:
    """Start PostgreSQL + ``mlflow server`` with the project's script in a fresh directory; stop and delete after.

    The directory is made under the system temp dir, not pytest's tmp_path: the ``postgres`` user the
    script runs the database as (when tests run as root) must be able to enter it.
    """
    directory = Path(tempfile.mkdtemp(prefix="deblur-tracking-"))
    port, pgport = free_port(), free_port()
    env = {**os.environ, "TRACKING_DIR": str(directory), "TRACKING_PORT": str(port), "PGPORT": str(pgport),
           "MLFLOW_WORKERS": str(workers), "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow")}
    for key in ("TRACKING_HOST", "ARTIFACTS_DESTINATION", "MLFLOW_EXTRA_ARGS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    server = TrackingServer(f"http://127.0.0.1:{port}", directory, env)
    try:
        started = server.script("start")
        if started.returncode != 0:
            raise RuntimeError(f"tracking_server.sh start failed ({started.returncode}):\n{started.stdout}\n"
                               f"{started.stderr}\n{server.log()}")
        yield server
    finally:
        server.script("stop", timeout=120)
        shutil.rmtree(directory, ignore_errors=True)
