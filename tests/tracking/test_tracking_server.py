"""The shared tracking server for real: PostgreSQL + `mlflow server` (scripts/tracking_server.sh) on loopback.

Two working copies log to one server; the registry, the gate's champion re-score, `mlflow models
predict` and the HTTP app all go through it, and artifacts land in the server's artifact store.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest

from conftest import PIPELINE_OVERRIDES, copy_pairs, run_script, write_params
from PIL import Image

from serving_support import ServerProcess, encode, smooth_rgb
from tracking_server_support import postgres_missing, tracking_server

pytestmark = pytest.mark.skipif(postgres_missing() is not None, reason=str(postgres_missing()))

# The gate's absolute bars off: a 6-step model must become the first champion; the champion comparison stays.
TEAM_OVERRIDES = {**PIPELINE_OVERRIDES, "register.min_gain_over_input_db": -100.0, "register.min_sharp_in_psnr": 0.0,
                  "register.min_pairs_per_blur_type": 1000, "evaluate.triptychs": 0}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server():
    with tracking_server() as running:
        yield running


@pytest.fixture
def global_tracking_uri_restored(monkeypatch):
    """The test points mlflow's process-wide tracking URI at the server; later tests get theirs back."""
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def run_pipeline_in_process(root: Path) -> tuple[dict, dict]:
    """ingest → synthesize → train → evaluate → register in ``root``, then register the same model again."""
    from deblur.stages.evaluate import run_evaluate
    from deblur.stages.ingest import run_ingest_stage
    from deblur.stages.register import run_register
    from deblur.stages.synthesize import run_synthesize_stage
    from deblur.stages.train import run_train

    params = root / "params.yaml"
    data, reports = root / "data", root / "reports"
    run_ingest_stage(params, data / "ingested")
    run_synthesize_stage(params, data / "ingested" / "manifest.jsonl", data / "pairs")
    run_train(params, data / "pairs", root / "checkpoints", reports / "train_curve.csv", reports / "train_run.json")
    run_evaluate(params, reports / "train_run.json", data / "pairs", reports / "metrics.json", reports / "per_image.csv",
                 reports / "psnr_per_blur.csv", reports / "sharp_in.csv", reports / "triptychs")

    def register(decision: str) -> dict:
        return run_register(params, reports / "train_run.json", reports / "per_image.csv", reports / "sharp_in.csv",
                            data / "pairs", reports / decision, root / "function_app" / "model")

    return register("registered_model.json"), register("registered_again.json")


def run_pipeline_as_scripts(root: Path) -> dict:
    """The stage scripts as separate processes in ``root`` (another working copy): what `dvc repro` runs."""
    from deblur.core.config import load_params

    params = load_params(root / "params.yaml")
    copy_pairs(params, root / "data" / "pairs")
    stages = {
        "train.py": ["--pairs", "data/pairs", "--checkpoints", "checkpoints", "--curve", "reports/train_curve.csv",
                     "--run-info", "reports/train_run.json"],
        "evaluate.py": ["--run-info", "reports/train_run.json", "--pairs", "data/pairs", "--metrics",
                        "reports/metrics.json", "--per-image", "reports/per_image.csv", "--per-blur",
                        "reports/psnr_per_blur.csv", "--sharp-in", "reports/sharp_in.csv", "--triptychs",
                        "reports/triptychs"],
        "register.py": ["--run-info", "reports/train_run.json", "--per-image", "reports/per_image.csv", "--sharp-in",
                        "reports/sharp_in.csv", "--pairs", "data/pairs", "--decision", "reports/registered_model.json",
                        "--serving-dir", "function_app/model"],
    }
    for script, args in stages.items():
        proc = run_script(script, "--params", "params.yaml", *args, cwd=root)
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads((root / "reports" / "registered_model.json").read_text())


def models_predict(uri: str, image: np.ndarray, workdir: Path) -> np.ndarray:
    """`mlflow models predict` on one uint8 (H, W, 3) image, in the pyfunc's tensor JSON format."""
    request, response = workdir / "predict_in.json", workdir / "predict_out.json"
    request.write_text(json.dumps({"inputs": image.tolist()}))
    proc = subprocess.run([str(BIN / "mlflow"), "models", "predict", "-m", uri, "-i", str(request), "-o",
                           str(response), "--content-type", "json", "--env-manager", "local"],
                          cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mlflow models predict failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    body = json.loads(response.read_text())
    return np.asarray(body["predictions"] if isinstance(body, dict) else body)


@pytest.mark.slow
def test_two_working_copies_share_runs_registry_and_champion_through_the_server(server, tmp_path, monkeypatch,
                                                                              global_tracking_uri_restored):
    client = mlflow.MlflowClient(server.uri)
    assert server.script("status").returncode == 0
    assert "already answers" in server.script("start").stdout          # start is idempotent
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)

    # team member A: the whole pipeline in-process; a first champion, then an equal challenger refused
    team_a = tmp_path / "team_a"
    team_a.mkdir()
    write_params(team_a / "params.yaml", TEAM_OVERRIDES)
    monkeypatch.chdir(team_a)
    monkeypatch.setenv("DEBLUR_PIPELINE_ID", "team-a")
    first, again = run_pipeline_in_process(team_a)
    assert first["promoted"] and first["version"] == "1" and "first champion" in first["reason"]
    assert first["tracking_uri"] == server.uri
    # the gate downloaded champion v1 from the server and re-scored it: identical, so not better
    assert not again["promoted"] and again["version"] == "2" and again["previous_champion_version"] == "1"
    assert again["previous_champion_psnr"] == pytest.approx(again["challenger_psnr"], abs=1e-4)
    assert [c["name"] for c in again["checks"] if not c["passed"]] == ["beats_champion"]
    assert "champion v1" in again["reason"]
    assert client.get_model_version_by_alias("deblur", "champion").version == "1"
    assert client.get_model_version_by_alias("deblur", "challenger").version == "2"
    assert json.loads((team_a / "function_app/model/model.json").read_text())["version"] == "1"

    # artifacts went through the server into its artifact store, none to a local ./mlruns
    from deblur.core.files import sha256_file
    from deblur.tracking import runs as tracking

    train_run = client.get_run(tracking.find_train_run(sha256_file(team_a / "checkpoints/best.pt")))
    assert train_run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = server.artifacts / train_run.info.experiment_id
    assert list(stored.rglob("MLmodel")) and list(stored.rglob("*.pt")) and list(stored.rglob("ingest_samples.png"))
    assert not (team_a / "mlruns").exists() and not (team_a / "mlartifacts").exists()
    # the MLflow UI is the server's own front page
    ui = httpx.get(server.uri, timeout=30)
    assert ui.status_code == 200 and "<title>MLflow</title>" in ui.text

    # the champion from the registry: in-process pyfunc, `mlflow models predict`, the HTTP app
    image = smooth_rgb(20, 28, seed=3)
    app = ServerProcess(None, env={"DEBLUR_MODEL_URI": "models:/deblur@champion", "MLFLOW_TRACKING_URI": server.uri})
    try:
        expected = mlflow.pyfunc.load_model("models:/deblur@champion").predict(image)
        assert expected.shape == (20, 28, 3) and expected.dtype == np.uint8
        predicted = models_predict("models:/deblur@champion", image, tmp_path)
        assert predicted.shape == (20, 28, 3)
        np.testing.assert_array_equal(predicted, expected)
        health = app.wait_ready()
        assert health["model"]["version"] == "1" and health["model_source"].startswith("models:/deblur@champion")
        response = httpx.post(f"{app.url}/api/deblur", content=encode(Image.fromarray(image), "PNG"), timeout=120)
        assert response.status_code == 200, response.text
        served = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
        np.testing.assert_array_equal(served, expected)
    finally:
        app.stop()

    # team member B: another working copy, its own data (seed 1), the stage scripts as processes
    team_b = tmp_path / "team_b"
    team_b.mkdir()
    write_params(team_b / "params.yaml", {**TEAM_OVERRIDES, "seed": 1})
    monkeypatch.setenv("DEBLUR_PIPELINE_ID", "team-b")
    decision = run_pipeline_as_scripts(team_b)
    assert decision["version"] == "3" and decision["previous_champion_version"] == "1"    # A's champion, re-scored
    beats = next(c for c in decision["checks"] if c["name"] == "beats_champion")
    assert "vs champion v1" in beats["detail"]
    champion = client.get_model_version_by_alias("deblur", "champion").version
    assert champion == ("3" if decision["promoted"] else "1")
    assert beats["passed"] is decision["promoted"]
    # B's serving artifact holds the champion after B's decision, A's v1 downloaded from the server if B lost
    assert json.loads((team_b / "function_app/model/model.json").read_text())["version"] == champion
    assert not (team_b / "mlruns").exists()
    runs = client.search_runs([train_run.info.experiment_id], filter_string="tags.stage = 'train'")
    assert sorted(r.data.tags["pipeline_id"] for r in runs) == ["team-a", "team-b"]
