"""Rewrite each stage's code deps in dvc.yaml as its import closure (deblur.core.stage_spec.code_files).

    python scripts/sync_dvc_deps.py          # then `dvc status` shows which stages the change re-runs

tests/core/test_stage_spec.py fails until dvc.yaml matches; this writes what it expects. Only the
``pipelines/`` and ``src/deblur/`` lines of each stage's deps change; comments and data deps stay.
"""

from __future__ import annotations

import re

from deblur.core.stage_spec import PROJECT_DIR, STAGES, code_files

DVC_YAML = PROJECT_DIR / "dvc.yaml"


def main() -> None:
    lines = DVC_YAML.read_text().splitlines()
    out, stage, in_deps = [], None, False
    for line in lines:
        if (m := re.match(r"^  (\w+):\s*$", line)) and m.group(1) in STAGES:
            stage, in_deps = m.group(1), False
        if stage and re.match(r"^    deps:\s*$", line):
            in_deps = True
            out.append(line)
            out += [f"      - {p.relative_to(PROJECT_DIR).as_posix()}" for p in code_files(stage)]
            continue
        if in_deps and re.match(r"^      - (src/|pipelines/)", line):
            continue
        if in_deps and not line.startswith("      "):
            in_deps = False
        out.append(line)
    DVC_YAML.write_text("\n".join(out) + "\n")
    for name in STAGES:
        print(f"{name}: {len(code_files(name))} code files")


if __name__ == "__main__":
    main()
