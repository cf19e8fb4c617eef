"""What each pipeline stage reads, declared once.

``STAGES`` maps a stage to the ``params.yaml`` sections (or dotted keys) it reads and the data
it depends on. The code it depends on is not listed by hand: it is the import closure of its
script inside ``src/deblur`` (``code_files``). From this table come the params each stage logs
to MLflow, the train stage's resume key, and the test that checks ``dvc.yaml`` against it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from deblur.core.files import sha256_file

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PROJECT_DIR = PACKAGE_DIR.parents[1]

# The serving artifact the register stage writes (a dvc.yaml out), relative to the project: the default
# folder of the service, `deblur predict` and the import commands (deblur.artifact.meta re-exports it).
DEFAULT_MODEL_DIR = Path("function_app/model")

# Sections that say where results are logged, not what is computed: read by every stage,
# deliberately no DVC param (renaming the MLflow experiment re-runs nothing).
UNTRACKED_SECTIONS = ("tracking",)


@dataclass(frozen=True)
class StageSpec:
    name: str
    params: tuple[str, ...]      # params.yaml sections or dotted keys
    data: tuple[str, ...]        # data deps, as written in dvc.yaml (``${...}`` is DVC templating)

    @property
    def script(self) -> Path:
        return PROJECT_DIR / "pipelines" / f"{self.name}.py"

    @property
    def module(self) -> str:
        return f"deblur.stages.{self.name}"


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("ingest", ("seed", "ingest"), ("${ingest.folder.root}", "${ingest.gopro.root}")),
    StageSpec("synthesize", ("seed", "synthesize"), ("data/ingested",)),
    StageSpec("train", ("seed", "model", "loss", "train", "synthesize"),
              ("data/pairs/train", "data/pairs/val", "checkpoints/pretrained")),
    StageSpec("evaluate", ("seed", "evaluate", "tiling", "synthesize.gamma", "kernel_aware"),
              ("checkpoints/best.pt", "reports/train_run.json", "data/pairs/test")),
    StageSpec("register", ("seed", "register", "evaluate", "tiling", "serving", "synthesize.gamma", "train.init_from",
                           "kernel_aware"),
              ("checkpoints/best.pt", "checkpoints/pretrained", "reports/train_run.json", "reports/per_image.csv",
               "reports/sharp_in.csv", "data/pairs/test")),
)}

# Train keys that change neither the samples nor the updates: a run interrupted with other
# values still resumes.
RESUME_NEUTRAL_TRAIN_KEYS = ("num_workers", "log_every")


def _module_file(module: str) -> Path | None:
    """The source file of ``deblur.x.y`` inside this package, or None when it is not ours."""
    parts = module.split(".")
    if parts[0] != "deblur":
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (imports inside functions run too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    package = ".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts) if path.is_relative_to(PACKAGE_DIR) else ""
    if path.name == "__init__.py":
        package += ".__init__"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: -node.level]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # ``from deblur import tracking``
    return found


@lru_cache(maxsize=None)
def _closure(start: Path) -> tuple[Path, ...]:
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imported_modules(path):
            parts = module.split(".")
            # importing deblur.a.b runs deblur/__init__.py and deblur/a/__init__.py first
            for depth in range(1, len(parts) + 1):
                found = _module_file(".".join(parts[:depth]))
                if found is not None and found not in seen:
                    todo.append(found)
    return tuple(sorted(seen))


def code_files(stage: str) -> list[Path]:
    """The stage's script (when this is a source checkout) and every ``src/deblur`` file it imports."""
    spec = STAGES[stage]
    start = spec.script if spec.script.is_file() else _module_file(spec.module)
    return list(_closure(start))


def code_digests(stage: str) -> dict[str, str]:
    """sha256 (12 hex digits) of each code file of ``stage``, by path relative to the project."""
    out = {}
    for path in code_files(stage):
        name = path.relative_to(PROJECT_DIR).as_posix() if path.is_relative_to(PROJECT_DIR) else path.name
        out[name] = sha256_file(path)[:12]
    return out


def params_subset(dump: dict, keys: tuple[str, ...]) -> dict:
    """The parts of a params dump (``by_alias``) named by sections or dotted keys."""
    out: dict = {}
    for key in keys:
        node, target = dump, out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
            target = target.setdefault(part, {})
        target[leaf] = node[leaf]
    return out


def logged_param(name: str, keys: tuple[str, ...]) -> bool:
    """Whether flat param ``name`` (``train.lr``) falls under one of ``keys``."""
    return any(name == key or name.startswith(f"{key}.") for key in keys)
