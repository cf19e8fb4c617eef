"""The package's layers (documentation/architecture.md): each imports only from itself and below, no circles.

Read from the source (AST), nothing imported; imports inside functions count as much as those at
the top. The layer order is written here once.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# bottom first: a layer may import itself and the layers before it
LAYERS = ("core", "data", "psf", "inference", "models", "evaluation", "artifact", "tracking", "training",
          "service", "stages", "cli")
ROOT_ENTRY = ("__main__", "cli")   # ``python -m deblur`` belongs to the cli layer; the package root imports nothing


def modules(src: Path, package: str = "deblur") -> dict[str, Path]:
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        rel = path.relative_to(src).with_suffix("")
        found[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return ROOT_ENTRY[1] if parts[1] == ROOT_ENTRY[0] else parts[1]


def violations(src: Path, layers: tuple[str, ...] = LAYERS, package: str = "deblur") -> list[str]:
    """Every upward import, module outside a layer and import circle, one line each."""
    known = modules(src, package)
    graph = {name: imported(name, path, known) for name, path in known.items()}
    rank = {layer: i for i, layer in enumerate(layers)}
    found = []
    for name in sorted(graph):
        own = layer_of(name)
        if own is not None and own not in rank:
            found.append(f"{name}: in no layer (known: {', '.join(layers)})")
            continue
        for target in sorted(graph[name]):
            theirs = layer_of(target)
            if own is None and theirs is not None:
                found.append(f"{name} imports {target}: the package root imports nothing")
            elif theirs in rank and own in rank and rank[theirs] > rank[own]:
                found.append(f"{name} imports {target}: layer {own!r} is below {theirs!r}")
    found += [f"circle: {' -> '.join(c)}" for c in circles(graph)]
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), ignoring a package
    ``__init__`` that imports its own children."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w.startswith(v + "."):      # a package importing its own submodule
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_imports_only_its_own_layer_and_below_without_circles():
    assert violations(SRC) == []


def test_every_layer_exists_and_every_subpackage_is_a_layer():
    packages = {p.name for p in (SRC / "deblur").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    loose = {p.stem for p in (SRC / "deblur").glob("*.py")} - {"__init__", "__main__"}
    assert packages == set(LAYERS)
    assert loose == set()


@pytest.fixture
def toy(tmp_path):
    """A tiny package with layers low < high, clean to start with."""
    for rel, text in {"pkg/__init__.py": "", "pkg/low/__init__.py": "", "pkg/high/__init__.py": "",
                      "pkg/low/a.py": "import os\n", "pkg/low/b.py": "from pkg.low import a\n",
                      "pkg/high/c.py": "from pkg.low.b import thing\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_the_check_finds_an_upward_import_even_inside_a_function(toy):
    assert violations(toy, ("low", "high"), "pkg") == []
    (toy / "pkg/low/d.py").write_text("def f():\n    from pkg.high.c import thing\n")
    assert violations(toy, ("low", "high"), "pkg") == ["pkg.low.d imports pkg.high.c: layer 'low' is below 'high'"]


def test_the_check_finds_a_circle_inside_one_layer(toy):
    (toy / "pkg/low/a.py").write_text("from pkg.low.b import x\n")
    assert violations(toy, ("low", "high"), "pkg") == ["circle: pkg.low.a -> pkg.low.b"]


def test_the_check_finds_a_module_outside_the_layers(toy):
    (toy / "pkg/loose.py").write_text("")
    (toy / "pkg/extra").mkdir()
    (toy / "pkg/extra/__init__.py").write_text("")
    assert violations(toy, ("low", "high"), "pkg") == ["pkg.extra: in no layer (known: low, high)",
                                                       "pkg.loose: in no layer (known: low, high)"]
