"""Shared fixtures: the repo's params.yaml shrunk to a tiny CPU run, tiny pairs built once per session,
and a private MLflow store."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from deblur.core.config import Params, load_params, set_dotted
from deblur.data.ingest import run_ingest
from deblur.data.synthesize import run_synthesize

ROOT = Path(__file__).resolve().parents[1]

# Dotted params.yaml keys -> values that keep every stage small and fast; extend as stages need.
TINY_OVERRIDES: dict[str, object] = {
    "ingest.embedded.photos": ["astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "immunohistochemistry"],
    "ingest.embedded.test_photos": ["astronaut", "chelsea"],
    "ingest.embedded.photo_max_side": 64,
    "ingest.embedded.val_fraction": 0.2,
    "ingest.embedded.dead_leaves.count": 6,
    "ingest.embedded.dead_leaves.size": 48,
    "ingest.embedded.dead_leaves.test_fraction": 0.2,
    "synthesize.motion.min_kernel_size": 5,
    "synthesize.motion.max_kernel_size": 15,
}

# A tiny stacked-conv training run on the tiny data: what most stage tests train.
TRAIN_OVERRIDES: dict[str, object] = {
    **TINY_OVERRIDES,
    "model.name": "stacked_conv",
    "train.init_from": None,
    "model.stacked_conv": {"channels": 8, "depth": 3},
    "train.patch_size": 32,
    "train.batch_size": 2,
    "train.max_steps": 6,
    "train.val_every": 3,
    "train.log_every": 1,
    "train.val_max_images": 2,
}
# The whole pipeline on the tiny run (evaluate and register too).
PIPELINE_OVERRIDES: dict[str, object] = {
    **TRAIN_OVERRIDES,
    "evaluate.classical_baseline": "wiener",
    "evaluate.triptychs": 2,
    "tiling.tile_size": 32,
    "tiling.overlap": 8,
}


def write_params(path: Path, overrides: dict[str, object]) -> Path:
    """Write the repo's params.yaml with dotted ``overrides`` applied to ``path``."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        set_dotted(raw, dotted, value)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def project_copy(root: Path, names: tuple[str, ...], overrides: dict[str, object], env: dict) -> Path:
    """The repository's ``names`` (files or folders, no __pycache__) copied into ``root`` with ``overrides`` on its
    params.yaml, made a fresh git + DVC repo with one commit (``env`` needs a git identity). Returns ``root``."""
    for name in names:
        src, dst = ROOT / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    write_params(root / "params.yaml", overrides)
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return root


def params_with(**extra) -> Params:
    """The tiny training run's params with dotted ``extra`` overrides."""
    return load_params(ROOT / "params.yaml", overrides={**TRAIN_OVERRIDES, **extra})


@pytest.fixture
def tiny_overrides() -> dict[str, object]:
    """A fresh copy of TINY_OVERRIDES, free to modify in a test."""
    return dict(TINY_OVERRIDES)


@pytest.fixture
def tiny_params(tiny_overrides) -> Params:
    return load_params(ROOT / "params.yaml", overrides=tiny_overrides)


@pytest.fixture
def tiny_params_file(tmp_path, tiny_overrides) -> Path:
    """tmp_path/params.yaml holding the tiny params (for stage scripts run as subprocesses)."""
    return write_params(tmp_path / "params.yaml", tiny_overrides)


@pytest.fixture(autouse=True)
def _no_leaked_mlflow_experiment():
    """mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID for subprocesses: it must not outlive the
    test that set it (an id from another store; `mlflow run --experiment-name` refuses both)."""
    before = os.environ.get("MLFLOW_EXPERIMENT_ID")
    yield
    if before is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = before


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A private sqlite MLflow store in tmp_path, exported as MLFLOW_TRACKING_URI (subprocesses inherit it).

    Also changes into tmp_path, where MLflow puts the artifacts (./mlruns) of a sqlite store.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DEBLUR_PIPELINE_ID", "pytest")
    return uri


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``pipelines/<script>`` with this interpreter in ``cwd``; output captured as text."""
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def make_gopro_tree(root: Path, size=(64, 48)) -> dict[str, list[str]]:
    """GOPRO_Large layout: 2 train sequences and 1 test sequence, 2 frames each."""
    layout = {"train": ["GOPR0001_11_00", "GOPR0002_11_01"], "test": ["GOPR0003_11_02"]}
    rng = np.random.default_rng(0)
    for split, sequences in layout.items():
        for sequence in sequences:
            for kind in ("sharp", "blur", "blur_gamma"):
                folder = root / split / sequence / kind
                folder.mkdir(parents=True)
                for frame in ("000001.png", "000002.png"):
                    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / frame)
    return layout


# --- tiny pairs, built once per session ---------------------------------------------------------

_PAIRS_CACHE = Path(tempfile.mkdtemp(prefix="deblur-test-pairs-"))
atexit.register(shutil.rmtree, _PAIRS_CACHE, ignore_errors=True)


def _pairs_key(params: Params) -> str:
    """What the pairs depend on: the seed and the ingest and synthesize sections."""
    dump = params.model_dump(mode="json", by_alias=True)
    wanted = {k: dump[k] for k in ("seed", "ingest", "synthesize")}
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]


def tiny_pairs(params: Params) -> Path:
    """The synthesize stage's output for ``params``, ingested and synthesized once per session (read-only)."""
    folder = _PAIRS_CACHE / _pairs_key(params)
    if not (folder / "pairs").is_dir():
        run_synthesize(params, run_ingest(params, folder / "ingested"), folder / "pairs")
    return folder / "pairs"


def copy_pairs(params: Params, dest: Path) -> Path:
    """A private copy of ``tiny_pairs(params)`` at ``dest`` (for tests that run stages in their own folder)."""
    shutil.copytree(tiny_pairs(params), dest)
    return dest


@pytest.fixture(scope="session")
def pairs_dir() -> Path:
    """The pairs of the tiny training run (TRAIN_OVERRIDES), shared by the whole session: do not write into it."""
    return tiny_pairs(load_params(ROOT / "params.yaml", overrides=TRAIN_OVERRIDES))
