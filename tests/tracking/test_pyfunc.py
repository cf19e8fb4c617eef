"""The pyfunc contract (documentation/model_contract.md): in Python, through a real `mlflow models serve`,
the logged files, and the training data a train run records as its MLflow dataset input."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from PIL import Image

from conftest import TRAIN_OVERRIDES, write_params
from deblur.models.build import model_from_checkpoint
from deblur.core.config import TilingConfig
from deblur.data.pairs import read_pairs
from deblur.tracking.pyfunc import PIP_REQUIREMENTS, example_png_base64, image_from_array, log_deblur_model
from deblur.stages.train import run_train
from deblur.inference.tiling import deblur_array
from deblur.training.resume import train_data_hash
from serving_support import encode, free_port, make_checkpoint, smooth_rgb

TILING = TilingConfig.model_validate({"tile_size": 128, "overlap": 16, "batch_size": 4})


def trained_looking_checkpoint(path: Path) -> Path:
    """A tiny stacked_conv checkpoint with seeded noise on every weight, so it is not the identity a fresh model is."""
    make_checkpoint(path, "stacked_conv", channels=8, depth=3)
    state = torch.load(path, weights_only=False)
    generator = torch.Generator().manual_seed(1)
    for key, value in state["state_dict"].items():
        if value.is_floating_point():
            state["state_dict"][key] = value + 0.05 * torch.randn(value.shape, generator=generator)
    torch.save(state, path)
    return path


def b64(img: Image.Image, fmt: str = "PNG") -> str:
    return base64.b64encode(encode(img, fmt)).decode("ascii")


def png_pixels(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def refused(data) -> str:
    with pytest.raises(MlflowException) as err:
        image_from_array(np.asarray(data) if not isinstance(data, np.ndarray) else data, max_pixels=10_000)
    return str(err.value)


def test_arrays_are_converted_or_refused_with_what_to_send():
    rgb = smooth_rgb(12, 10)
    assert np.array_equal(image_from_array(rgb)[0], rgb) and image_from_array(rgb)[1] is None
    gray = rgb[..., 1]
    for shape in (gray, gray[..., None]):
        out, alpha = image_from_array(shape)
        assert out.shape == (12, 10, 3) and alpha is None and all(np.array_equal(out[..., c], gray) for c in range(3))
    rgba = np.concatenate([rgb, np.full((12, 10, 1), 77, np.uint8)], axis=2)
    out, alpha = image_from_array(rgba)
    assert np.array_equal(out, rgb) and np.array_equal(alpha, np.full((12, 10), 77, np.uint8))
    as_json = np.array(rgb.tolist(), dtype=object)  # what MLflow's server hands over for {"inputs": [[[...]]]}
    assert np.array_equal(image_from_array(as_json)[0], rgb)
    assert np.array_equal(image_from_array(rgb.astype(np.int64))[0], rgb)

    message = refused(rgb / 255.0)
    assert "floating-point pixel values (float64, 0..1)" in message
    assert "uint8 values 0..255" in message and "base64 PNG" in message and "round(x * 255)" in message
    assert "floating-point" in refused(np.array((rgb / 255.0).tolist(), dtype=object))
    assert "floating-point" in refused(rgb.astype(np.float32))      # even whole numbers: the rule is "integers only"
    wide = rgb.astype(np.int32)
    wide[0, 0, 0], wide[1, 1, 1] = -1, 256
    assert "pixel values -1..256 are outside 0..255" in refused(wide)
    assert "shape (12, 10, 2)" in refused(rgb[..., :2])
    assert "shape (1, 12, 10, 3)" in refused(rgb[None])
    assert "array of bool" in refused(rgb > 100)
    assert "ragged" in refused(np.array([[1, 2, 3], [4, 5]], dtype=object))
    assert "got no pixels" in refused(np.zeros((0, 4, 3), np.uint8)) and "got no pixels" in refused(np.array([]))
    assert "200x100 = 20000 pixels exceeds the limit of 10000" in refused(np.zeros((100, 200, 3), np.uint8))


@pytest.mark.slow
def test_train_stage_logs_its_pairs_as_an_mlflow_dataset(tmp_path, pairs_dir, mlflow_uri):  # noqa: F811
    params_file = write_params(tmp_path / "params.yaml", {**TRAIN_OVERRIDES, "train.max_steps": 2, "train.val_every": 2})
    info = run_train(params_file, pairs_dir, tmp_path / "ck", tmp_path / "curve.csv", tmp_path / "run.json")

    inputs = mlflow.MlflowClient(mlflow_uri).get_run(info["run_id"]).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "pairs" and dataset.digest == info["data_hash"] == train_data_hash(pairs_dir)
    assert json.loads(dataset.source)["uri"] == str(pairs_dir.resolve())
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    pairs = len(read_pairs(pairs_dir, "train")) + len(read_pairs(pairs_dir, "val"))
    assert json.loads(dataset.profile)["num_rows"] == pairs > 0


class ModelServer:
    """`mlflow models serve --env-manager local` as a real subprocess (its own process group) on a free port."""

    def __init__(self, model_uri: str, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "OMP_NUM_THREADS": "1"}
        self._log = log_path.open("w")
        self.log_path = log_path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", self.url.rsplit(":", 1)[1]],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"mlflow models serve not ready after {timeout} s:\n{self.log_path.read_text()}")

    def invoke(self, body: dict) -> httpx.Response:
        return httpx.post(f"{self.url}/invocations", json=body, timeout=120)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)  # the CLI execs uvicorn in a child: stop the whole group
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()


@pytest.mark.slow
def test_mlflow_models_serve_follows_the_contract(tmp_path, mlflow_uri):
    ckpt = trained_looking_checkpoint(tmp_path / "checkpoint.pt")
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("contract-test")
    with mlflow.start_run():
        log_deblur_model(ckpt, TILING, max_pixels=2_000_000, registered_model_name="deblur-contract")
    model_uri = "models:/deblur-contract/1"

    # the logged files: model from code, pinned requirements with PyTorch's CPU index, an input example
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / "logged")))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and not (local / "python_model.pkl").exists()
    assert (local / "pyfunc_model.py").is_file() and (local / "artifacts" / "checkpoint.pt").is_file()
    assert flavor["config"] == {"tiling": TILING.model_dump(), "max_pixels": 2_000_000}
    requirements = (local / "requirements.txt").read_text().splitlines()
    assert requirements == PIP_REQUIREMENTS
    assert requirements[0] == "--extra-index-url https://download.pytorch.org/whl/cpu"
    for line in requirements[1:]:
        package, version = line.split("==")
        assert metadata.version(package).split("+")[0] == version, line   # the versions this venv runs
    python_env = yaml.safe_load((local / "python_env.yaml").read_text())
    assert python_env["dependencies"] == ["-r requirements.txt"] and python_env["python"].startswith("3.11")
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example == {"dataframe_split": {"columns": ["image"], "data": [[example_png_base64()]]}}

    model = model_from_checkpoint(ckpt)
    photo = smooth_rgb(720, 1280, seed=3)
    expected_photo = deblur_array(model, photo, TILING)
    assert np.abs(expected_photo.astype(int) - photo).mean() > 1          # not the identity: pixels must move
    small = smooth_rgb(48, 64, seed=4)
    expected_small = deblur_array(model, small, TILING)
    loaded = mlflow.pyfunc.load_model(model_uri)
    assert np.array_equal(loaded.predict(small), expected_small)

    photo_request = {"dataframe_records": [{"image": b64(Image.fromarray(photo))}]}
    json_uint8 = len(json.dumps({"inputs": photo.tolist()}))
    assert json_uint8 > 10 * len(json.dumps(photo_request))

    server = ModelServer(model_uri, tmp_path / "serve.log")
    try:
        server.wait_ready()
        response = server.invoke(photo_request)
        assert response.status_code == 200, response.text
        [row] = response.json()["predictions"]
        assert np.array_equal(np.asarray(png_pixels(row["image"])), expected_photo)

        response = server.invoke({"inputs": small.tolist()})
        assert response.status_code == 200, response.text
        assert np.array_equal(np.array(response.json()["predictions"], dtype=np.uint8), expected_small)

        response = server.invoke({"inputs": (small / 255.0).tolist()})
        assert response.status_code == 400
        assert "floating-point pixel values" in response.json()["message"]
        assert "uint8 values 0..255" in response.json()["message"]

        gray = small[..., 0]
        expected_gray = deblur_array(model, np.repeat(gray[..., None], 3, axis=2), TILING)
        response = server.invoke({"inputs": gray.tolist()})
        assert response.status_code == 200, response.text
        assert np.array_equal(np.array(response.json()["predictions"], dtype=np.uint8), expected_gray)
        response = server.invoke({"inputs": [b64(Image.fromarray(gray, "L")), b64(Image.fromarray(small), "WEBP")]})
        assert response.status_code == 200, response.text
        gray_out, webp_out = response.json()["predictions"]
        assert np.array_equal(np.asarray(png_pixels(gray_out["image"])), expected_gray)
        assert png_pixels(webp_out["image"]).size == (64, 48)

        alpha = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
        rgba = np.concatenate([small, alpha[..., None]], axis=2)
        response = server.invoke({"dataframe_split": {"columns": ["image"], "data": [[b64(Image.fromarray(rgba, "RGBA"))]]}})
        assert response.status_code == 200, response.text
        out = png_pixels(response.json()["predictions"][0]["image"])
        assert out.mode == "RGBA" and np.array_equal(np.asarray(out), np.dstack([expected_small, alpha]))
        response = server.invoke({"inputs": rgba.tolist()})
        assert np.array_equal(np.array(response.json()["predictions"], dtype=np.uint8), np.dstack([expected_small, alpha]))

        response = server.invoke({"dataframe_records": [{"image": "not*base64"}]})
        assert response.status_code == 400 and "not valid base64" in response.json()["message"]
        response = server.invoke({"dataframe_records": [{"image": base64.b64encode(b"hello").decode()}]})
        assert response.status_code == 400 and "not a recognised image format" in response.json()["message"]
        response = server.invoke({"inputs": small.tolist(), "params": {"tile_size": 32, "overlap": 20}})
        assert response.status_code == 400 and "overlap 20 must be less than half of tile_size 32" in response.text
        response = server.invoke({"inputs": small.tolist(), "params": {"tile_size": 32, "overlap": 8}})
        assert np.array_equal(np.array(response.json()["predictions"], dtype=np.uint8),
                              deblur_array(model, small, TILING.model_copy(update={"tile_size": 32, "overlap": 8})))
    finally:
        server.stop()
