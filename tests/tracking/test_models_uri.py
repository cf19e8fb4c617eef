"""A diffusion predictor given as a models:/ URI resolves through the registry in every stage process."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("stage", ["train", "evaluate", "register"])
def test_a_stage_process_resolves_models_uris_through_the_registry(stage, tmp_path):
    code = ("import sys; from pathlib import Path; import deblur.stages.%s; "
            "from deblur.core.model_sources import checkpoint_from_models_uri\n"
            "try:\n    checkpoint_from_models_uri('models:/nothing@champion', Path(sys.argv[1]))\n"
            "except Exception as err:\n    print(type(err).__name__, err)\n" % stage)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dl")], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # the registry was asked (and has no such model), not "import deblur.tracking.models_uri first"
    assert "models_uri first" not in out.stdout and "nothing" in out.stdout, out.stdout
