"""Ingest: GoPro trees, folders of odd image files, embedded photos + dead leaves, the stage script."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_gopro_tree, run_script, write_params
from PIL import Image

from deblur.core.config import load_params
from deblur.data.deadleaves import dead_leaves, layer_defocus_radii
from deblur.data.ingest import IngestError, hash_split, read_manifest, run_ingest, unique_names
from deblur.core.imageio import read_rgb
from deblur.tracking.runs import files_digest


def _params(tiny_overrides, **overrides):
    return load_params(ROOT / "params.yaml", overrides={**tiny_overrides, **overrides})


def _no_leftovers(parent: Path, out_name: str) -> bool:
    return not any(p.name.startswith(f".{out_name}.") for p in parent.iterdir())


# --- gopro ---------------------------------------------------------------------------------

def test_gopro_pairs_referenced_in_place_with_whole_sequences_per_split(tmp_path, tiny_overrides):
    root = tmp_path / "GOPRO_Large"
    layout = make_gopro_tree(root)
    params = _params(tiny_overrides, **{"ingest.source": "gopro", "ingest.gopro.root": str(root),
                                         "ingest.gopro.blur_dir": "blur_gamma"})
    rows = read_manifest(run_ingest(params, tmp_path / "ingested"))

    assert len(rows) == 6
    assert {r.split for r in rows} == {"train", "val", "test"}
    by_sequence = {}
    for row in rows:
        sequence = row.name.split("__")[0]
        by_sequence.setdefault(sequence, set()).add(row.split)
        assert Path(row.path).is_file() and Path(row.path).parent.name == "sharp"
        assert Path(row.blur_path).parent.name == "blur_gamma"
        assert Path(row.blur_path).name == Path(row.path).name
        assert (row.width, row.height, row.source) == (64, 48, "gopro")
        assert row.sha256 == hashlib.sha256(Path(row.path).read_bytes()).hexdigest()
    assert all(len(splits) == 1 for splits in by_sequence.values())
    assert by_sequence[layout["test"][0]] == {"test"}
    assert not (tmp_path / "ingested" / "images").exists()


@pytest.mark.parametrize("damage, needle", [
    (lambda root: (root / "train/GOPR0002_11_01/blur/000002.png").unlink(),
     "GOPR0002_11_01/sharp/000002.png: no partner"),
    (lambda root: Image.new("RGB", (32, 48)).save(root / "test/GOPR0003_11_02/blur/000001.png"), "size 32x48 differs"),
    (lambda root: (root / "test/GOPR0003_11_02/sharp/000001.png").write_bytes(b"not a png"), "unreadable image header"),
])
def test_gopro_damage_is_a_clear_error_and_leaves_nothing(tmp_path, tiny_overrides, damage, needle):
    root = tmp_path / "GOPRO_Large"
    make_gopro_tree(root)
    damage(root)
    params = _params(tiny_overrides, **{"ingest.source": "gopro", "ingest.gopro.root": str(root)})
    with pytest.raises(IngestError, match=needle):
        run_ingest(params, tmp_path / "out" / "ingested")
    assert not (tmp_path / "out" / "ingested").exists()
    assert _no_leftovers(tmp_path / "out", "ingested")


def test_gopro_bad_root_and_too_many_val_sequences(tmp_path, tiny_overrides):
    params = _params(tiny_overrides, **{"ingest.source": "gopro", "ingest.gopro.root": str(tmp_path / "nope")})
    with pytest.raises(IngestError, match="nope: GoPro root not found"):
        run_ingest(params, tmp_path / "ingested")
    make_gopro_tree(tmp_path / "g")
    params = _params(tiny_overrides, **{"ingest.source": "gopro", "ingest.gopro.root": str(tmp_path / "g"),
                                         "ingest.gopro.val_sequences": 2})
    with pytest.raises(IngestError, match="val_sequences=2 leaves no train sequence"):
        run_ingest(params, tmp_path / "ingested")


# --- folder --------------------------------------------------------------------------------

def _save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def make_odd_photos(root: Path) -> None:
    """One file per awkward format; expectations in test_folder_converts_every_format."""
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6                                    # rotate 90 degrees clockwise on display
    _save(root / "phone/IMG_0001.JPG", rotated, quality=95, exif=exif.tobytes())
    _save(root / "scan16.png", Image.fromarray(np.array([[65535, 25700]] * 4, dtype=np.uint16)))
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    _save(root / "palette.png", palette)
    _save(root / "rgba.png", Image.new("RGBA", (5, 5), (50, 60, 70, 0)))
    _save(root / "grey.png", Image.new("L", (7, 3), 77))
    _save(root / "print.jpg", Image.new("CMYK", (16, 8), (255, 0, 0, 0)), quality=95)
    _save(root / "sub dir/tiff.tif", Image.new("RGB", (6, 6), (1, 2, 3)))
    _save(root / "lossless.webp", Image.new("RGB", (6, 6), (9, 99, 199)), lossless=True)
    _save(root / "paint.BMP", Image.new("RGB", (6, 6), (200, 100, 0)))
    _save(root / "big.png", Image.new("RGB", (300, 150), (5, 5, 5)))
    (root / "notes.txt").write_text("not an image")
    _save(root / ".hidden/skip.png", Image.new("RGB", (6, 6)))


def test_folder_converts_every_format(tmp_path, tiny_overrides):
    photos = tmp_path / "photos"
    make_odd_photos(photos)
    params = _params(tiny_overrides, **{"ingest.source": "folder", "ingest.folder.root": str(photos),
                                         "ingest.folder.max_side": 100, "ingest.folder.val_fraction": 0.3,
                                         "ingest.folder.test_fraction": 0.3})
    rows = {r.name: r for r in read_manifest(run_ingest(params, tmp_path / "ingested"))}
    assert set(rows) == {"phone__IMG_0001", "scan16", "palette", "rgba", "grey", "print", "sub_dir__tiff",
                         "lossless", "paint", "big"}
    pixels = {name: read_rgb(row.path) for name, row in rows.items()}
    for name, row in rows.items():
        assert Path(row.path) == tmp_path / "ingested" / "images" / row.split / f"{name}.png"
        assert pixels[name].shape == (row.height, row.width, 3) and pixels[name].dtype == np.uint8
        assert row.source == "folder" and row.blur_path is None

    phone = pixels["phone__IMG_0001"]                  # EXIF applied: 40x20 stored -> 20 wide, 40 tall
    assert phone.shape == (40, 20, 3)
    assert phone[3, 10, 0] > 240 and phone[3, 10, 2] < 15    # stored left (red) is now on top
    assert phone[36, 10, 2] > 240 and phone[36, 10, 0] < 15
    np.testing.assert_array_equal(pixels["scan16"][0, :, 0], [255, 100])   # round(v / 257)
    assert (pixels["scan16"][..., 0] == pixels["scan16"][..., 2]).all()
    assert (pixels["palette"] == [10, 200, 30]).all()
    assert (pixels["rgba"] == [50, 60, 70]).all()      # colour kept where alpha is 0, alpha dropped
    assert (pixels["grey"] == 77).all()
    assert pixels["print"][4, 8, 0] < 10 and (pixels["print"][4, 8, 1:] > 245).all()   # cyan
    assert (pixels["sub_dir__tiff"] == [1, 2, 3]).all()
    assert (pixels["lossless"] == [9, 99, 199]).all()
    assert (pixels["paint"] == [200, 100, 0]).all()
    assert pixels["big"].shape == (50, 100, 3)           # longer side downscaled to max_side


def test_folder_bad_files_stop_or_are_skipped(tmp_path, tiny_overrides):
    photos = tmp_path / "photos"
    _save(photos / "good.png", Image.new("RGB", (8, 8), (1, 2, 3)))
    _save(photos / "whole.jpg", Image.new("RGB", (64, 64), (90, 90, 90)), quality=90)
    data = (photos / "whole.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (photos / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    overrides = {"ingest.source": "folder", "ingest.folder.root": str(photos), "ingest.folder.val_fraction": 0.0,
                 "ingest.folder.test_fraction": 0.0}

    with pytest.raises(IngestError, match=r"garbage\.png.*skip_bad_files"):
        run_ingest(_params(tiny_overrides, **overrides), tmp_path / "ingested")
    assert not (tmp_path / "ingested").exists() and _no_leftovers(tmp_path, "ingested")

    out = tmp_path / "ingested"
    rows = read_manifest(run_ingest(_params(tiny_overrides, **overrides, **{"ingest.skip_bad_files": True}), out))
    assert sorted(r.name for r in rows) == ["good", "whole"]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(s["path"]).name for s in skipped) == ["garbage.png", "truncated.jpg"]
    assert all(s["reason"] for s in skipped)


def test_folder_missing_or_empty_root(tmp_path, tiny_overrides):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no photos here")
    for root, needle in ((tmp_path / "absent", "photo folder not found"), (tmp_path / "empty", "no images")):
        params = _params(tiny_overrides, **{"ingest.source": "folder", "ingest.folder.root": str(root)})
        with pytest.raises(IngestError, match=needle):
            run_ingest(params, tmp_path / "ingested")


def test_folder_fraction_that_leaves_a_split_empty_names_the_key(tmp_path, tiny_overrides):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(photos / f"p{i}.png")
    params = _params(tiny_overrides, **{"ingest.source": "folder", "ingest.folder.root": str(photos),
                                        "ingest.folder.val_fraction": 0.01, "ingest.folder.test_fraction": 0.0})
    with pytest.raises(IngestError, match=r"ingest.folder.val_fraction: 0.01 of 3 images gave an empty val split"):
        run_ingest(params, tmp_path / "ingested")
    assert not (tmp_path / "ingested").exists() and _no_leftovers(tmp_path, "ingested")


def test_gopro_sharp_frames_feed_the_sharp_in_check(tmp_path, tiny_overrides):
    from deblur.data.synthesize import run_synthesize
    from deblur.stages.evaluate import evaluation_inputs

    make_gopro_tree(tmp_path / "GOPRO_Large")
    params = _params(tiny_overrides, **{"ingest.source": "gopro", "ingest.gopro.root": str(tmp_path / "GOPRO_Large")})
    run_synthesize(params, run_ingest(params, tmp_path / "ingested"), tmp_path / "pairs")
    records, photos = evaluation_inputs(tmp_path / "pairs", params.evaluate)
    assert {r.blur_type for r in records} == {"real"}
    assert len(photos) == min(2, params.evaluate.sharp_in_images) and all("clear_images" in str(p) for p in photos)


def test_hash_split_is_stable_and_follows_fractions():
    keys = [f"folder:img_{i:04d}.jpg" for i in range(4000)]
    splits = [hash_split(k, 0, 0.1, 0.2) for k in keys]
    assert abs(splits.count("val") / 4000 - 0.1) < 0.02 and abs(splits.count("test") / 4000 - 0.2) < 0.02
    assert [hash_split(k, 0, 0.1, 0.2) for k in keys[:50]] == splits[:50]      # one key never moves
    assert [hash_split(k, 1, 0.1, 0.2) for k in keys] != splits                 # the seed matters


def test_unique_names_disambiguate_clashes():
    names = unique_names([Path("a.jpg"), Path("a.png"), Path("x/b c.png")])
    assert names[2] == "x__b_c"
    assert names[0] != names[1] and all(n.startswith("a-") for n in names[:2])


# --- embedded ------------------------------------------------------------------------------

def test_embedded_is_deterministic_and_keeps_test_photos_in_test(tmp_path, tiny_params):
    first = read_manifest(run_ingest(tiny_params, tmp_path / "a"))
    second = read_manifest(run_ingest(tiny_params, tmp_path / "b"))
    assert [(r.name, r.split, r.sha256) for r in first] == [(r.name, r.split, r.sha256) for r in second]
    for r in first:
        assert Path(r.path).read_bytes() == (tmp_path / "b" / Path(r.path).relative_to(tmp_path / "a")).read_bytes()

    cfg = tiny_params.ingest.embedded
    photos = {r.name: r for r in first if r.source == "skimage"}
    assert set(photos) == set(cfg.photos)
    assert {n for n, r in photos.items() if r.split == "test"} == set(cfg.test_photos)
    assert {r.split for n, r in photos.items() if n not in cfg.test_photos} == {"train", "val"}
    leaves = [r for r in first if r.source == "dead_leaves"]
    assert len(leaves) == cfg.dead_leaves.count
    assert {r.split for r in leaves} == {"train", "val", "test"}
    assert max(max(r.width, r.height) for r in photos.values()) == cfg.photo_max_side
    assert read_rgb(photos["camera"].path).shape[2] == 3          # a greyscale photo, replicated to RGB

    other_seed = read_manifest(run_ingest(tiny_params.model_copy(update={"seed": 1}), tmp_path / "c"))
    assert {r.sha256 for r in other_seed if r.source == "dead_leaves"}.isdisjoint({r.sha256 for r in leaves})


def test_embedded_unknown_photo_is_named(tmp_path, tiny_overrides):
    params = _params(tiny_overrides, **{"ingest.embedded.photos": ["astronaut", "chelsea", "lena"]})
    with pytest.raises(IngestError, match=r"ingest.embedded.photos: unknown photo\(s\) \['lena'\]"):
        run_ingest(params, tmp_path / "ingested")


# --- dead leaves ---------------------------------------------------------------------------

def _gradient_energy(image: np.ndarray) -> float:
    grey = image.astype(np.float64).mean(axis=2)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


def test_dead_leaves_deterministic_with_depth_of_field(tiny_params):
    cfg = tiny_params.ingest.embedded.dead_leaves.model_copy(update={"size": 96})
    a = dead_leaves(np.random.default_rng(7), cfg)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, dead_leaves(np.random.default_rng(7), cfg))
    assert not np.array_equal(a, dead_leaves(np.random.default_rng(8), cfg))
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 200           # textured, not a few flat colours

    all_sharp = dead_leaves(np.random.default_rng(7), cfg.model_copy(update={"soft_fraction": 0.0}))
    all_soft = dead_leaves(np.random.default_rng(7), cfg.model_copy(update={"soft_fraction": 1.0, "max_defocus": 0.05}))
    assert _gradient_energy(all_soft) < 0.8 * _gradient_energy(all_sharp)


def test_layer_defocus_grows_away_from_the_focus_range(tiny_params):
    cfg = tiny_params.ingest.embedded.dead_leaves.model_copy(update={"layers": 8, "soft_fraction": 0.5})
    for seed in range(20):
        radii = layer_defocus_radii(np.random.default_rng(seed), cfg, 256)
        focus = np.flatnonzero(radii == 0)
        if focus.size:
            assert np.all(np.diff(focus) == 1)                       # one contiguous in-focus range
            assert np.all(np.diff(radii[: focus[0]]) < 0) and np.all(np.diff(radii[focus[-1] + 1:]) > 0)
        assert radii.max() <= cfg.max_defocus * 256 + 1e-9


def test_dead_leaves_speed(tiny_params):
    cfg = tiny_params.ingest.embedded.dead_leaves.model_copy(update={"size": 256})
    dead_leaves(np.random.default_rng(0), cfg)
    start = time.perf_counter()
    for seed in range(3):
        dead_leaves(np.random.default_rng(seed), cfg)
    assert (time.perf_counter() - start) / 3 < 1.0     # ~0.14 s on 2 idle cores; catches order-of-magnitude slips


# --- stage script --------------------------------------------------------------------------

def test_ingest_script_logs_an_mlflow_run(tmp_path, tiny_params_file, mlflow_uri):
    import mlflow                                                # heavy: imported only here

    result = run_script("ingest.py", "--params", "params.yaml", "--out", "data/ingested", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = tmp_path / "data" / "ingested" / "manifest.jsonl"
    rows = read_manifest(manifest)
    assert rows[0].path.startswith("data/ingested/images/")          # relative to the working directory

    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(load_params(tiny_params_file).tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'ingest'")
    assert run.data.params["ingest.source"] == "embedded" and run.data.params["seed"] == "0"
    assert "ingest.embedded.dead_leaves.count" in run.data.params and "train.lr" not in run.data.params
    for split in ("train", "val", "test"):
        assert run.data.metrics[f"images_{split}"] == sum(r.split == split for r in rows)
    assert run.data.metrics["skipped_files"] == 0
    assert run.data.tags["data_hash"] == files_digest(manifest)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/manifest.jsonl", "data/ingest_samples.png"} <= artifacts

    before = manifest.read_bytes()
    bad = write_params(tmp_path / "bad.yaml", {"ingest.source": "folder", "ingest.folder.root": "no/such/dir"})
    result = run_script("ingest.py", "--params", str(bad), "--out", "data/ingested", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "error: no/such/dir: photo folder not found (ingest.folder.root)"
    assert "Traceback" not in result.stderr
    assert manifest.read_bytes() == before                           # the previous output is untouched
    failed = client.search_runs([experiment.experiment_id], "tags.stage = 'ingest' and attributes.status = 'FAILED'")
    assert len(failed) == 1


def test_gopro_unreadable_pair_is_skipped_when_asked(tmp_path, tiny_overrides):
    root = tmp_path / "GOPRO_Large"
    make_gopro_tree(root)
    (root / "test/GOPR0003_11_02/blur/000002.png").write_bytes(b"broken")
    params = _params(tiny_overrides, **{"ingest.source": "gopro", "ingest.gopro.root": str(root),
                                         "ingest.skip_bad_files": True})
    out = tmp_path / "ingested"
    rows = read_manifest(run_ingest(params, out))
    assert len(rows) == 5 and "GOPR0003_11_02__000002" not in {r.name for r in rows}
    (skipped,) = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped["path"].endswith("GOPR0003_11_02/sharp/000002.png") and "blur/000002.png" in skipped["reason"]
