"""Camera shake per kernel-size bucket: bucket bounds, per-bucket aggregation, the evaluate stage's keys, the bench."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import mlflow
import numpy as np
import pytest

from conftest import ROOT, TRAIN_OVERRIDES, copy_pairs, write_params
import torch

from deblur.tracking import runs as tracking
from deblur.models.checkpoint_file import save_atomic
from deblur.core.config import load_params
from deblur.data.pairs import read_pairs
from deblur.evaluation.scoring import (EvalResult, ImageResult, bucket_key, evaluate_model, kernel_bucket, kernel_buckets, write_per_image_csv)
from deblur.stages.evaluate import flat_test_metrics
from deblur.stages.register import read_per_image

# Camera shake only, kernels from 5 to 61 px on 64-px photos: several buckets get pairs.
SHAKE_OVERRIDES = {
    **TRAIN_OVERRIDES,
    "synthesize.blur_mix": {"motion": 1.0, "gaussian": 0.0, "defocus": 0.0, "lens": 0.0},
    "synthesize.motion.min_kernel_size": 5,
    "synthesize.motion.max_kernel_size": 61,
    "evaluate.classical_baseline": "wiener",
    "evaluate.triptychs": 0,
    "tiling.tile_size": 32,
    "tiling.overlap": 8,
}


@pytest.mark.parametrize(("size", "label"), [(1, "<=21"), (9, "<=21"), (21, "<=21"), (22, "23-41"), (23, "23-41"),
                                             (41, "23-41"), (42, ">=43"), (43, ">=43"), (61, ">=43"), (99, ">=43")])
def test_kernel_bucket_boundaries(size, label):
    assert kernel_bucket(size) == label


def test_bucket_labels_and_metric_keys():
    assert kernel_buckets() == [("<=21", 1, 21), ("23-41", 23, 41), (">=43", 43, None)]
    assert [bucket_key(label) for label, _, _ in kernel_buckets()] == ["kle21", "k23_41", "kge43"]


def test_only_camera_shake_with_a_kernel_is_bucketed():
    assert ImageResult("a", "motion", {}, kernel_size=23).kernel_bucket == "23-41"
    assert ImageResult("b", "gaussian", {}, kernel_size=13).kernel_bucket is None
    assert ImageResult("c", "real", {}, kernel_size=None).kernel_bucket is None
    assert ImageResult("d", "motion", {}).kernel_bucket is None


def _scores(model, inp, base, model_ssim, input_ssim):
    return {"model_psnr": model, "input_psnr": inp, "baseline_psnr": base, "model_ssim": model_ssim,
            "input_ssim": input_ssim}


def tiny_table() -> EvalResult:
    return EvalResult([
        ImageResult("m1", "motion", _scores(30.0, 25.0, 32.0, 0.90, 0.80), kernel_size=9),
        ImageResult("m2", "motion", _scores(28.0, 24.0, 30.0, 0.86, 0.70), kernel_size=21),
        ImageResult("m3", "motion", _scores(20.0, 21.0, 26.0, 0.60, 0.65), kernel_size=23),
        ImageResult("m4", "motion", _scores(22.0, 22.5, 27.0, 0.62, 0.66), kernel_size=41),
        ImageResult("g1", "gaussian", _scores(35.0, 30.0, 36.0, 0.95, 0.90), kernel_size=13),
    ], sharp_in_psnr=[])


def test_per_bucket_means_match_hand_computed_values():
    buckets = tiny_table().summary()["per_kernel_bucket"]["motion"]
    assert list(buckets) == ["<=21", "23-41", ">=43"]
    assert buckets["<=21"] == {"n": 2, "model_psnr": 29.0, "input_psnr": 24.5, "baseline_psnr": 31.0,
                               "model_ssim": 0.88, "input_ssim": 0.75, "gain_over_input_db": 4.5}
    assert buckets["23-41"] == {"n": 2, "model_psnr": 21.0, "input_psnr": 21.75, "baseline_psnr": 26.5,
                                "model_ssim": 0.61, "input_ssim": 0.655, "gain_over_input_db": -0.75}
    assert buckets[">=43"] == {"n": 0}         # no pairs: a count, no PSNR, no NaN


def test_flat_metrics_name_every_bucket_and_skip_empty_scores():
    flat = flat_test_metrics(tiny_table().summary())
    assert flat["test_motion_kle21_n"] == 2 and flat["test_motion_kle21_model_psnr"] == 29.0
    assert flat["test_motion_k23_41_input_ssim"] == 0.655 and flat["test_motion_k23_41_baseline_psnr"] == 26.5
    assert flat["test_motion_k23_41_gain_over_input_db"] == -0.75
    assert flat["test_motion_kge43_n"] == 0
    assert not any(k.startswith("test_motion_kge43_") and k != "test_motion_kge43_n" for k in flat)
    assert flat["test_motion_model_psnr"] == 25.0          # the per-blur-type keys are unchanged
    assert all(math.isfinite(v) for v in flat.values())


def test_per_image_csv_has_kernel_size_and_bucket(tmp_path):
    write_per_image_csv(tiny_table(), tmp_path / "per_image.csv")
    with open(tmp_path / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["kernel_size"] for r in rows] == ["9", "21", "23", "41", "13"]
    assert [r["kernel_bucket"] for r in rows] == ["<=21", "<=21", "23-41", "23-41", ""]
    model, _ = read_per_image(tmp_path / "per_image.csv")      # the register stage still reads it
    assert model.psnr == (30.0, 28.0, 20.0, 22.0, 35.0)


@pytest.fixture(scope="module")
def shake_world(tmp_path_factory):
    """Tiny camera-shake-only pairs and a tiny untrained stacked_conv checkpoint."""
    from deblur.models.build import build_model

    root = tmp_path_factory.mktemp("shake")
    params_file = write_params(root / "params.yaml", SHAKE_OVERRIDES)
    params = load_params(params_file)
    copy_pairs(params, root / "pairs")
    torch.manual_seed(0)
    model = build_model(params.model)
    save_atomic({"model_config": params.model.model_dump(mode="json"), "train_patch_size": params.train.patch_size,
                 "state_dict": model.state_dict(), "step": 0}, root / "tiny.pt")
    return root, params_file, params


def test_pairs_record_their_kernel_support(shake_world):
    root, _, _ = shake_world
    records = read_pairs(root / "pairs", "test")
    assert records and all(r.blur_type == "motion" for r in records)
    for r in records:
        kernel = np.load(r.kernel_path)
        assert r.kernel_size == kernel.shape[-1] and r.kernel_size % 2 == 1
        ys, xs = np.nonzero(kernel)       # support: the kernel's non-zero taps reach its border
        half = r.kernel_size // 2
        assert max(abs(ys - half).max(), abs(xs - half).max()) == half


def test_identity_model_scores_the_input_in_every_bucket(shake_world):
    root, _, params = shake_world
    records = read_pairs(root / "pairs", "test")
    result = evaluate_model(torch.nn.Identity(), records, params.tiling, params.evaluate, params.synthesize.gamma,
                            with_baseline=False)
    buckets = result.summary()["per_kernel_bucket"]["motion"]
    assert sum(b["n"] for b in buckets.values()) == len(records)
    for label, b in buckets.items():
        assert b["n"] == sum(kernel_bucket(r.kernel_size) == label for r in records)
        if b["n"]:
            assert b["model_psnr"] == pytest.approx(b["input_psnr"], abs=1e-6) and b["gain_over_input_db"] == 0


def test_evaluate_stage_writes_and_logs_bucket_metrics(shake_world, mlflow_uri):
    from deblur.stages.evaluate import run_evaluate

    root, params_file, params = shake_world
    with tracking.stage_run("train", params) as run_id:
        pass
    tracking.dump_json({"run_id": run_id, "checkpoint": str(root / "tiny.pt"), "data_hash": "x"}, root / "run.json")
    out = root / "reports"
    summary = run_evaluate(params_file, root / "run.json", root / "pairs", out / "metrics.json", out / "per_image.csv",
                           out / "per_blur.csv", out / "sharp_in.csv", out / "triptychs")

    buckets = json.loads((out / "metrics.json").read_text())["per_kernel_bucket"]["motion"]
    assert buckets == summary["per_kernel_bucket"]["motion"] and set(buckets) == {"<=21", "23-41", ">=43"}
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    filled = [label for label, b in buckets.items() if b["n"]]
    assert len(filled) >= 2, buckets          # 5..61 px kernels on the tiny test photos reach several buckets
    for label, b in buckets.items():
        mine = [r for r in rows if r["kernel_bucket"] == label]
        assert b["n"] == len(mine)
        if not mine:
            assert b == {"n": 0}
            continue
        for key in ("model_psnr", "input_psnr", "baseline_psnr", "model_ssim", "input_ssim"):
            assert b[key] == pytest.approx(np.mean([float(r[key]) for r in mine]), abs=2e-4)

    logged = mlflow.MlflowClient(mlflow_uri).get_run(run_id).data.metrics      # also copied onto the train run
    for label, b in buckets.items():
        key = f"test_motion_{bucket_key(label)}"
        assert logged[f"{key}_n"] == b["n"]
        if b["n"]:
            assert logged[f"{key}_model_psnr"] == pytest.approx(b["model_psnr"])
            assert logged[f"{key}_baseline_psnr"] == pytest.approx(b["baseline_psnr"])
        else:
            assert f"{key}_model_psnr" not in logged


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_quality_speed", ROOT / "bench" / "bench_quality_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_draws_seeded_kernels_inside_each_bucket():
    bench = _bench_module()
    params = load_params(ROOT / "params.yaml")
    photos = {"a": np.full((40, 48, 3), 128, np.uint8), "b": np.random.default_rng(0).integers(0, 256, (40, 48, 3),
                                                                                                dtype=np.uint8)}
    first, again = bench.shake_bucket_set(photos, params, seed=7), bench.shake_bucket_set(photos, params, seed=7)
    assert set(first) == {(name, label) for name in photos for label, _, _ in kernel_buckets()}
    for (name, label), (blurred, sharp, kernel) in first.items():
        assert kernel_bucket(kernel.shape[-1]) == label
        assert kernel.shape[-1] <= params.synthesize.motion.max_kernel_size
        np.testing.assert_array_equal(kernel, again[name, label][2])
        np.testing.assert_array_equal(blurred, again[name, label][0])
    assert not np.array_equal(first["a", "<=21"][2], first["b", "<=21"][2])    # each photo its own kernel
    assert bench.centre_crop(np.zeros((300, 451, 3), np.uint8), 256).shape == (256, 256, 3)
    assert bench.centre_crop(np.zeros((200, 100, 3), np.uint8), 256).shape == (200, 100, 3)


def test_bench_reuses_references_only_for_the_same_set(tmp_path, monkeypatch):
    bench = _bench_module()
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    meta = {"photos": {"a": [40, 48]}, "seed": 7, "crop": 512, "kernel_sizes": {"<=21": [9]}, "rl_iterations": 30}
    rows = [{"name": "blurred input", "kind": "reference", "per_image": {"a|<=21": {"psnr": 20.0}}},
            {"name": "Richardson-Lucy (true kernel)", "kind": "reference", "per_image": {}},
            {"name": "old.pt", "kind": "trained", "per_image": {}}]
    assert bench.reused_references(meta) == []
    (tmp_path / "shake_buckets.json").write_text(json.dumps({"meta": {**meta, "when": "then"}, "rows": rows}))
    assert [r["name"] for r in bench.reused_references(meta)] == ["blurred input", "Richardson-Lucy (true kernel)"]
    assert bench.reused_references({**meta, "seed": 8}) == []
