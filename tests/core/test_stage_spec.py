"""dvc.yaml and MLproject against the one stage table (deblur.core.stage_spec), and what stages really read."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TRAIN_OVERRIDES, write_params
from deblur.core.config import Params
from deblur.core.stage_spec import DEFAULT_MODEL_DIR, PROJECT_DIR, STAGES, UNTRACKED_SECTIONS, code_files

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
FIELD_TO_SECTION = {"registration": "register"}


def _code_deps(stage: str) -> set[str]:
    """dvc.yaml's code deps of ``stage``, folders expanded to their .py files."""
    out = set()
    for dep in DVC[stage]["deps"]:
        path = ROOT / dep
        if dep.startswith(("src/", "pipelines/")):
            files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
            out.update(p.relative_to(ROOT).as_posix() for p in files)
    return out


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_yaml_code_deps_are_the_import_closure(stage):
    closure = {p.relative_to(PROJECT_DIR).as_posix() for p in code_files(stage)}
    deps = _code_deps(stage)
    assert closure - deps == set(), f"dvc.yaml stage {stage!r} lacks code it imports"
    assert deps - closure == set(), f"dvc.yaml stage {stage!r} depends on code it never imports"


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_yaml_params_and_data_deps_come_from_the_stage_table(stage):
    assert tuple(DVC[stage]["params"]) == STAGES[stage].params
    data = [d for d in DVC[stage]["deps"] if not d.startswith(("src/", "pipelines/"))]
    assert tuple(data) == STAGES[stage].data


def test_closure_follows_imports_inside_functions_and_packages():
    train = {p.relative_to(PROJECT_DIR).as_posix() for p in code_files("train")}
    assert {"pipelines/train.py", "src/deblur/stages/train.py", "src/deblur/training/losses.py",
            "src/deblur/models/nafnet.py", "src/deblur/stages/__init__.py"} <= train
    assert "src/deblur/artifact/torch_model.py" not in train and "src/deblur/evaluation/scoring.py" not in train
    assert "src/deblur/models/nafnet.py" not in {p.relative_to(PROJECT_DIR).as_posix() for p in code_files("ingest")}


def _normalise(command: str) -> str:
    return " ".join(command.replace("{params_file}", "params.yaml").split())


def test_mlproject_entry_points_run_the_dvc_commands():
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    for stage in STAGES:
        assert _normalise(entry_points[stage]["command"]) == _normalise(DVC[stage]["cmd"]), stage
    assert entry_points["main"]["command"] == "dvc repro"


@contextmanager
def record_section_reads():
    """Record which top-level params sections are read (``params.train``...) while inside."""
    reads: set[str] = set()
    original = Params.__getattribute__
    fields = set(Params.model_fields)

    def recording(self, name):
        if name in fields:
            reads.add(FIELD_TO_SECTION.get(name, name))
        return original(self, name)

    Params.__getattribute__ = recording
    try:
        yield reads
    finally:
        Params.__getattribute__ = original


def _covered(section: str, declared: tuple[str, ...]) -> bool:
    return any(key == section or key.startswith(f"{section}.") for key in declared)


@pytest.mark.slow
def test_each_stage_reads_only_the_params_it_declares(tmp_path, mlflow_uri):
    from deblur.stages.evaluate import run_evaluate
    from deblur.stages.ingest import run_ingest_stage
    from deblur.stages.register import run_register
    from deblur.stages.synthesize import run_synthesize_stage
    from deblur.stages.train import run_train

    params = write_params(tmp_path / "params.yaml", {**TRAIN_OVERRIDES, "tiling.tile_size": 32, "tiling.overlap": 8,
                                                     "evaluate.classical_baseline": "wiener"})
    reports = tmp_path / "reports"
    runs = {
        "ingest": lambda: run_ingest_stage(params, tmp_path / "ingested"),
        "synthesize": lambda: run_synthesize_stage(params, tmp_path / "ingested" / "manifest.jsonl", tmp_path / "pairs"),
        "train": lambda: run_train(params, tmp_path / "pairs", tmp_path / "ck", reports / "curve.csv", reports / "run.json"),
        "evaluate": lambda: run_evaluate(params, reports / "run.json", tmp_path / "pairs", reports / "metrics.json",
                                         reports / "per_image.csv", reports / "per_blur.csv", reports / "sharp_in.csv",
                                         reports / "triptychs"),
        "register": lambda: run_register(params, reports / "run.json", reports / "per_image.csv",
                                         reports / "sharp_in.csv", tmp_path / "pairs", reports / "decision.json",
                                         tmp_path / "serving"),
    }
    read = defaultdict(set)
    for stage, run in runs.items():
        with record_section_reads() as reads:
            run()
        read[stage] = reads - set(UNTRACKED_SECTIONS)
        undeclared = {s for s in read[stage] if not _covered(s, STAGES[stage].params)}
        assert not undeclared, f"stage {stage!r} reads params {sorted(undeclared)} it does not declare"
    assert {"model", "loss", "train", "seed"} <= read["train"]
    assert {"evaluate", "tiling", "synthesize"} <= read["evaluate"]
    assert {"register", "tiling", "train"} <= read["register"]


def test_stage_script_without_the_package_says_to_activate_the_venv(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([sys.executable, "-S", str(ROOT / "pipelines" / "train.py"), "--help"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "cannot import the deblur package" in proc.stderr and "source .venv/bin/activate" in proc.stderr
    assert "make repro" in proc.stderr


def test_dvc_yaml_mlproject_and_makefile_name_the_serving_folder_of_the_code():
    """The serving artifact's folder is named once in Python (DEFAULT_MODEL_DIR); these files spell it out."""
    expected = DEFAULT_MODEL_DIR.as_posix()
    folder_option = re.compile(r"--(?:serving|model)-dir[ =](\S+)")
    mlproject = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["register"]["command"]
    makefile = folder_option.findall((ROOT / "Makefile").read_text())   # serve, function-package, bench

    assert folder_option.findall(DVC["register"]["cmd"]) == [expected]
    assert expected in [str(out) for out in DVC["register"]["outs"]]   # what `dvc pull` brings
    assert folder_option.findall(mlproject) == [expected]
    assert makefile and set(makefile) == {expected}
