"""Synthesize: pair layout, blur_types.json, determinism, GoPro pass-through, read_pairs, the stage script."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_gopro_tree, run_script

from deblur.core.config import BLUR_TYPES, load_params
from deblur.data.ingest import IngestError, read_manifest, run_ingest
from deblur.data.pairs import PairsError, read_pairs
from deblur.data.synthesize import run_synthesize
from deblur.core.imageio import read_rgb
from deblur.tracking.runs import files_digest


@pytest.fixture
def manifest(tmp_path, tiny_params) -> Path:
    return run_ingest(tiny_params, tmp_path / "ingested")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_layout_and_index_content(tmp_path, tiny_params, manifest):
    params = tiny_params.model_copy(update={"synthesize": tiny_params.synthesize.model_copy(
        update={"pairs_per_image": 2, "test_pairs_per_image": 6})})
    summary = run_synthesize(params, manifest, tmp_path / "pairs")
    rows = read_manifest(manifest)
    for split in ("train", "val", "test"):
        split_dir = tmp_path / "pairs" / split
        entries = _lines(split_dir / "blur_types.json")
        names = sorted(r.name for r in rows if r.split == split)
        per_image = 6 if split == "test" else 2
        assert sorted(e["id"] for e in entries) == sorted(f"{n}_{k}" for n in names for k in range(per_image))
        assert summary.pairs_per_split[split] == len(entries)
        for e in entries:
            assert e["clear_image"] == f"clear_images/{e['id']}.png" and e["blur_image"] == f"blur_images/{e['id']}.png"
            assert e["blur_type"] in BLUR_TYPES and e["kernel"]["file"] == f"kernels/{e['id']}.npy"
            kernel = np.load(split_dir / e["kernel"]["file"])
            assert list(kernel.shape) == e["kernel"]["shape"] and kernel.dtype == np.float32
            clear, blurred = read_rgb(split_dir / e["clear_image"]), read_rgb(split_dir / e["blur_image"])
            assert clear.shape == blurred.shape and not np.array_equal(clear, blurred)
            source_row = next(r for r in rows if r.name == e["name"])
            assert (split_dir / e["clear_image"]).read_bytes() == Path(source_row.path).read_bytes()
            assert 0 <= e["noise_sigma"] <= params.synthesize.noise_sigma_max
    n_test = sum(r.split == "test" for r in rows)
    assert sum(summary.pairs_per_blur_type.values()) == 2 * (len(rows) - n_test) + 6 * n_test
    assert all(np.isfinite(v) and v < 40 for v in summary.input_psnr.values())

    records = read_pairs(tmp_path / "pairs", "test")
    by_image: dict[str, list[str]] = {}
    for r in records:
        by_image.setdefault(r.name, []).append(r.blur_type)
    for types in by_image.values():   # test blur types taken in turn: each image gets every type, none thrice
        assert set(types) == set(BLUR_TYPES) and max(types.count(t) for t in BLUR_TYPES) == 2
    assert all(r.kernel_path.is_file() and r.clear_path.is_file() for r in records)
    assert any(r.is_synthetic_scene for r in records) and not all(r.is_synthetic_scene for r in records)


def test_output_is_deterministic_and_independent_of_row_order(tmp_path, tiny_params, manifest):
    run_synthesize(tiny_params, manifest, tmp_path / "a")
    reversed_manifest = tmp_path / "reversed.jsonl"
    reversed_manifest.write_text("".join(reversed(manifest.read_text().splitlines(keepends=True))))
    run_synthesize(tiny_params, reversed_manifest, tmp_path / "b")
    assert files_digest(tmp_path / "a") == files_digest(tmp_path / "b")
    changed = tiny_params.model_copy(update={"seed": 5})
    run_synthesize(changed, manifest, tmp_path / "c")
    blurred = [files_digest(tmp_path / run / "train" / "blur_images") for run in ("a", "c")]
    assert blurred[0] != blurred[1]


def test_gopro_rows_pass_through_as_real_blur(tmp_path, tiny_overrides):
    make_gopro_tree(tmp_path / "GOPRO_Large")
    params = load_params(ROOT / "params.yaml", overrides={
        **tiny_overrides, "ingest.source": "gopro", "ingest.gopro.root": str(tmp_path / "GOPRO_Large")})
    manifest = run_ingest(params, tmp_path / "ingested")
    summary = run_synthesize(params, manifest, tmp_path / "pairs")
    assert summary.pairs_per_blur_type["real"] == 6 and summary.pairs_per_split == {"train": 2, "val": 2, "test": 2}
    rows = {r.name: r for r in read_manifest(manifest)}
    for split in ("train", "val", "test"):
        for record in read_pairs(tmp_path / "pairs", split):
            assert record.blur_type == "real" and record.kernel_path is None and record.id in rows
            assert record.blur_path.read_bytes() == Path(rows[record.id].blur_path).read_bytes()
            assert record.clear_path.read_bytes() == Path(rows[record.id].path).read_bytes()


def test_changed_or_missing_sharp_image_stops_with_nothing_written(tmp_path, tiny_params, manifest):
    row = read_manifest(manifest)[0]
    Path(row.path).write_bytes(Path(row.path).read_bytes() + b"\0")
    with pytest.raises(IngestError, match="changed since ingest"):
        run_synthesize(tiny_params, manifest, tmp_path / "pairs")
    Path(row.path).unlink()
    with pytest.raises(IngestError, match="listed in the manifest but missing"):
        run_synthesize(tiny_params, manifest, tmp_path / "pairs")
    assert not (tmp_path / "pairs").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pairs.")]


def test_read_pairs_errors_name_the_problem(tmp_path, tiny_params, manifest):
    with pytest.raises(PairsError, match="split 'val' not found"):
        read_pairs(tmp_path / "nothing", "val")
    with pytest.raises(PairsError, match="unknown split 'dev'"):
        read_pairs(tmp_path / "nothing", "dev")
    run_synthesize(tiny_params, manifest, tmp_path / "pairs")
    record = read_pairs(tmp_path / "pairs", "train")[0]
    record.blur_path.unlink()
    with pytest.raises(PairsError, match=f"{record.blur_path.name} does not exist"):
        read_pairs(tmp_path / "pairs", "train")
    (tmp_path / "pairs" / "val" / "blur_types.json").write_text("{not json\n")
    with pytest.raises(PairsError, match=r"blur_types.json:1: not a pair record"):
        read_pairs(tmp_path / "pairs", "val")


def test_synthesize_script_logs_an_mlflow_run(tmp_path, tiny_params_file, mlflow_uri):
    import mlflow                                                # heavy: imported only here

    params = load_params(tiny_params_file)
    run_ingest(params, Path("data/ingested"))                    # cwd is tmp_path (mlflow_uri fixture)
    result = run_script("synthesize.py", "--params", "params.yaml", "--manifest", "data/ingested/manifest.jsonl",
                        "--out", "data/pairs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pairs = tmp_path / "data" / "pairs"

    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'synthesize'")
    assert run.data.params["synthesize.gamma"] == str(params.synthesize.gamma)
    assert "synthesize.motion.max_kernel_size" in run.data.params and "ingest.source" not in run.data.params
    total = 0
    for split in ("train", "val", "test"):
        n = len(read_pairs(pairs, split))
        assert run.data.metrics[f"pairs_{split}"] == n
        total += n
    per_type = sum(run.data.metrics[f"pairs_{t}"] for t in (*BLUR_TYPES, "real"))
    assert per_type == total == run.data.metrics["pairs_total"]
    assert run.data.tags["data_hash"] == files_digest(sorted(pairs.glob("*/blur_types.json")))
    assert run.data.tags["manifest_hash"] == files_digest(tmp_path / "data" / "ingested" / "manifest.jsonl")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert "data/synthesize_samples.png" in artifacts and "data/train" in artifacts

    result = run_script("synthesize.py", "--params", "params.yaml", "--manifest", "missing.jsonl",
                        "--out", "data/pairs", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "error: missing.jsonl: manifest not found; run the ingest stage first"


def test_sharp_in_photos_are_distinct_images_not_copies_of_one(tmp_path, tiny_params, manifest):
    from deblur.stages.evaluate import evaluation_inputs

    run_synthesize(tiny_params, manifest, tmp_path / "pairs")
    records, photos = evaluation_inputs(tmp_path / "pairs", tiny_params.evaluate.model_copy(update={"sharp_in_images": 5}))
    names = {r.clear_path: r.name for r in records}
    photo_names = [names[p] for p in photos]
    assert len(set(photo_names)) == len(photo_names) == 2      # the two test photos, each once
    assert not any(r.is_synthetic_scene for r in records if r.clear_path in photos)
