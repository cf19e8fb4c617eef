"""params.yaml is the one home of every setting, and bad params fail with a named key."""

from pathlib import Path

import pytest
import yaml

from deblur.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]


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
