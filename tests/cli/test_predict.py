"""`deblur predict` as a user runs it: a real subprocess on real image files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_support import make_artifact, make_checkpoint, smooth_rgb

from deblur.models.build import model_from_checkpoint
from deblur.cli.predict import collect_inputs
from deblur.inference.tiling import deblur_array

DEBLUR = [sys.executable, "-m", "deblur"]


def deblur(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*DEBLUR, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def photos(tmp_path) -> Path:
    """a.png, b.jpg, nested/c.webp (RGBA), a .tif, and a corrupt 'photo' among them."""
    root = tmp_path / "in"
    (root / "nested").mkdir(parents=True)
    Image.fromarray(smooth_rgb(37, 53, seed=1)).save(root / "a.png")
    Image.fromarray(smooth_rgb(40, 30, seed=2)).save(root / "b.jpg", quality=95)
    rgba = np.dstack([smooth_rgb(33, 35, seed=3), np.full((33, 35), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "nested" / "c.webp", lossless=True)
    Image.fromarray(smooth_rgb(20, 24, seed=4)).save(root / "d.tif")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root


def test_predict_writes_every_image_skips_the_broken_one_and_says_so(tmp_path, photos):
    model_dir = make_artifact(tmp_path / "m", tiling={"tile_size": 32, "overlap": 8, "batch_size": 1})
    out = tmp_path / "out"
    proc = deblur("predict", str(photos), "-o", str(out), "--model", str(model_dir), cwd=tmp_path)

    assert proc.returncode == 1, proc.stderr                     # one input failed
    assert "4 of 5 images written" in proc.stdout                # notes.txt is not an image: not an input
    assert "skipped" in proc.stderr and "broken.png" in proc.stderr and "not a recognised image format" in proc.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a.png", "b.jpg", "d.png", "nested/c.webp"]   # format kept; TIFF -> PNG

    # the same pixels as the library's tiled inference with the artifact's model and tiling
    model = model_from_checkpoint(model_dir / "model.pt")
    a = np.asarray(Image.open(photos / "a.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(out / "a.png")), deblur_array(model, a, (32, 8, 1)))
    c = Image.open(out / "nested" / "c.webp")
    assert c.mode == "RGBA" and np.asarray(c)[..., 3].min() == 200   # alpha kept
    assert Image.open(out / "b.jpg").size == (30, 40)


def test_predict_all_good_exits_0_with_a_chosen_format_and_tiling(tmp_path, photos):
    model_dir = make_artifact(tmp_path / "m")
    out = tmp_path / "out"
    proc = deblur("predict", str(photos / "a.png"), str(photos / "*.jpg"), "-o", str(out), "--model", str(model_dir),
                  "--format", "png", "--tile-size", "32", "--overlap", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    model = model_from_checkpoint(model_dir / "model.pt")
    b = np.asarray(Image.open(photos / "b.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(out / "b.png")), deblur_array(model, b, (32, 4, 1)))


def test_predict_refuses_to_start_with_a_clear_error(tmp_path, photos):
    model_dir = make_artifact(tmp_path / "m")
    nothing = deblur("predict", str(tmp_path / "empty*.png"), "-o", str(tmp_path / "o"), "--model", str(model_dir),
                     cwd=tmp_path)
    assert nothing.returncode == 2 and "no images found" in nothing.stderr
    no_model = deblur("predict", str(photos), "-o", str(tmp_path / "o"), "--model", str(tmp_path / "nowhere"),
                      cwd=tmp_path)
    assert no_model.returncode == 2 and "nowhere" in no_model.stderr and "Traceback" not in no_model.stderr
    bad_tiling = deblur("predict", str(photos), "-o", str(tmp_path / "o"), "--model", str(model_dir),
                        "--tile-size", "32", "--overlap", "16", cwd=tmp_path)
    assert bad_tiling.returncode == 2 and "overlap 16 must be less than half of tile_size 32" in bad_tiling.stderr


def test_same_names_from_different_places_do_not_overwrite_each_other(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        Image.fromarray(smooth_rgb(8, 8)).save(tmp_path / folder / "shot.png")
    jobs = collect_inputs([str(tmp_path / "x" / "shot.png"), str(tmp_path / "y" / "shot.png")])
    assert [str(j.relative) for j in jobs] == ["shot", "shot-2"]


@pytest.mark.slow
def test_predict_with_a_registered_model_uri(tmp_path, photos, mlflow_uri):
    import mlflow

    from deblur.tracking.pyfunc import SIGNATURE, DeblurPyfunc

    mlflow.set_tracking_uri(mlflow_uri)
    ckpt = make_checkpoint(tmp_path / "checkpoint.pt", "stacked_conv", channels=8, depth=3)
    mlflow.set_experiment("predict-test")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=DeblurPyfunc(), artifacts={"checkpoint": str(ckpt)},
                                       signature=SIGNATURE, registered_model_name="deblur-predict-test",
                                       model_config={"tiling": {"tile_size": 32, "overlap": 8, "batch_size": 1}})
    mlflow.MlflowClient().set_registered_model_alias("deblur-predict-test", "champion", info.registered_model_version)

    out = tmp_path / "out"
    proc = deblur("predict", str(photos / "a.png"), "-o", str(out), "--model", "models:/deblur-predict-test@champion",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "deblur-predict-test v1" in proc.stdout
    a = np.asarray(Image.open(photos / "a.png").convert("RGB"))
    expected = deblur_array(model_from_checkpoint(ckpt), a, (32, 8, 1))
    assert np.array_equal(np.asarray(Image.open(out / "a.png")), expected)
