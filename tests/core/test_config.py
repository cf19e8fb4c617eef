"""params.yaml is the one home of every setting, and bad params fail with a named key."""

import re
from pathlib import Path

import pytest
import yaml

from deblur.core.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_repo_params_load_and_digest_is_stable():
    a, b = load_params(ROOT / "params.yaml"), load_params(ROOT / "params.yaml")
    assert a.digest() == b.digest()
    assert a.model.name in ("unet", "nafnet", "stacked_conv")
    assert a.flat()["train.lr"] == str(a.train.lr)


def _write(tmp_path, mutate):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r["train"].update(learning_rate=1.0), "train.learning_rate: unknown key"),
    (lambda r: r["train"].update(lr=-1), "train.lr"),
    (lambda r: r["ingest"].update(source="flickr"), "ingest.source"),
    (lambda r: r["synthesize"]["blur_mix"].update(zoom=0.2), "unknown blur type"),
    (lambda r: r["tiling"].update(overlap=200), "overlap 200 must be less than half"),
    (lambda r: r.pop("loss"), "loss: Field required"),
])
def test_invalid_params_name_the_key(tmp_path, mutate, needle):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    p = load_params(ROOT / "params.yaml", overrides={"train.max_steps": 3})
    assert p.train.max_steps == 3
    with pytest.raises(ConfigError, match="no section 'nosuch'"):
        load_params(ROOT / "params.yaml", overrides={"nosuch.key": 1})


def test_every_config_in_repo_loads():
    for path in [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        load_params(path)


def test_extends_overlays_only_the_keys_it_names(tmp_path):
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"extends: {ROOT / 'params.yaml'}\ntrain: {{max_steps: 7}}\nmodel: {{nafnet: {{width: 8}}}}\n")
    base, p = load_params(ROOT / "params.yaml"), load_params(profile)
    assert p.train.max_steps == 7 and p.model.nafnet.width == 8
    assert p.train.lr == base.train.lr and p.model.nafnet.enc_blocks == base.model.nafnet.enc_blocks
    chained = tmp_path / "chained.yaml"
    chained.write_text("extends: profile.yaml\ntrain: {lr: 0.5}\n")
    c = load_params(chained, overrides={"train.batch_size": 3})
    assert (c.train.max_steps, c.train.lr, c.train.batch_size) == (7, 0.5, 3)


@pytest.mark.parametrize("text, needle", [
    ("extends: nope.yaml\n", "nope.yaml: parameter file not found"),
    ("extends: loop.yaml\n", "'extends' loops back on itself"),
    ("extends: [a, b]\n", "'extends' must be a file path"),
    ("extends: {base}\ntrain: 3\n", "train: a section in the base file cannot be replaced"),
    ("extends: {base}\ntrain: {{steps: 3}}\n", "train.steps: unknown key"),
])
def test_bad_extends_names_the_file_and_key(tmp_path, text, needle):
    path = tmp_path / "loop.yaml"
    path.write_text(text.format(base=ROOT / "params.yaml"))
    with pytest.raises(ConfigError, match=re.escape(needle)) as err:
        load_params(path)
    assert "loop.yaml" in str(err.value) or "nope.yaml" in str(err.value)


def test_profiles_extend_params_instead_of_copying_it():
    """A profile names only what differs, so a params.yaml change reaches every profile."""
    base = load_params(ROOT / "params.yaml")
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert "extends:" in path.read_text(), path
        assert load_params(path).serving == base.serving, path
