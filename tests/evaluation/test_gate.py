"""The evidence-based promotion gate (deblur.evaluation.gate), rule by rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deblur.core.config import RegisterConfig
from deblur.evaluation.gate import (Check, PairedScores, bootstrap_lower_bound, decide, paired_comparison, sign_test_p)

CFG = RegisterConfig(model_name="deblur", margin_db=0.05, confidence=0.95, bootstrap_samples=2000,
                     min_gain_over_input_db=0.0, min_pairs_per_blur_type=3, min_sharp_in_psnr=30.0)   # decide's seed: 0
SHARP_OK = [38.0, 41.5]
N = 24


def replace(cfg: RegisterConfig, **changes) -> RegisterConfig:
    """``cfg`` with ``changes``, validated again (a pydantic model: dataclasses.replace does not apply)."""
    return RegisterConfig.model_validate({**cfg.model_dump(), **changes})


def base_psnr(n: int = N, seed: int = 1) -> np.ndarray:
    """Per-image difficulty: test images spread over ~12 dB, far more than models differ."""
    return np.random.default_rng(seed).uniform(20.0, 32.0, size=n)


def scores(psnr, types=None, ids=None) -> PairedScores:
    psnr = [float(p) for p in psnr]
    ids = ids or [f"img{i:02d}" for i in range(len(psnr))]
    types = types or ["gaussian" if i % 2 else "motion" for i in range(len(psnr))]
    return PairedScores(tuple(ids), tuple(types), tuple(psnr))


def by_name(decision) -> dict[str, Check]:
    return {c.name: c for c in decision.checks}


def failed_names(decision) -> list[str]:
    return [c.name for c in decision.checks if not c.passed]


def test_clear_gain_over_champion_is_promoted():
    base = base_psnr()
    noise = np.random.default_rng(2).normal(0.0, 0.05, size=N)
    challenger, champion, inp = scores(base + 0.5 + noise), scores(base), scores(base - 1.0)

    d = decide(challenger, inp, SHARP_OK, champion, None, CFG, champion_label="champion v3")

    assert d.promote is True
    assert failed_names(d) == []
    check = by_name(d)["beats_champion"]
    assert check.values["mean_diff"] == pytest.approx(0.5 + noise.mean())
    assert 0.4 < check.values["lower_bound"] < check.values["mean_diff"]
    assert (check.values["wins"], check.values["losses"], check.values["ties"]) == (N, 0, 0)
    assert check.values["sign_p"] == pytest.approx(2 * 0.5**N)
    assert d.reason.startswith("promoted: beats champion v3")
    assert "+0.5" in check.detail and "95% lower bound" in check.detail and "p<0.01" in check.detail
    assert [c.name for c in d.checks] == ["beats_input", "blur_type:gaussian", "blur_type:motion", "sharp_in",
                                          "beats_champion"]


def test_tiny_noisy_gain_is_refused_on_confidence_even_with_zero_margin():
    base = base_psnr()
    diffs = np.where(np.arange(N) % 2 == 0, 0.51, -0.49)  # mean +0.01, noise +-0.5
    cfg = replace(CFG, margin_db=0.0)

    d = decide(scores(base + diffs), scores(base - 1.0), SHARP_OK, scores(base), None, cfg)

    assert d.promote is False
    assert failed_names(d) == ["beats_champion"]
    values = by_name(d)["beats_champion"].values
    assert values["mean_diff"] == pytest.approx(0.01)
    assert values["mean_diff"] >= cfg.margin_db
    assert values["lower_bound"] < -0.1
    assert (values["wins"], values["losses"]) == (12, 12)
    assert values["sign_p"] == pytest.approx(1.0)
    assert d.reason.startswith("refused: ")
    assert "beats_champion" in d.reason


def test_gain_on_average_but_loss_on_motion_is_refused():
    base = base_psnr()
    types = ["motion"] * 6 + ["gaussian"] * 18
    gain = np.array([-0.3] * 6 + [1.0] * 18)

    d = decide(scores(base + gain, types), scores(base, types), SHARP_OK, None, None, CFG)

    assert d.promote is False
    assert by_name(d)["beats_input"].passed is True
    assert by_name(d)["beats_input"].values["mean_gain"] == pytest.approx(0.675)
    assert by_name(d)["blur_type:gaussian"].passed is True
    assert failed_names(d) == ["blur_type:motion"]
    motion = by_name(d)["blur_type:motion"]
    assert "over 6 pairs (-0.30 dB)" in motion.detail
    assert "blur_type:motion" in d.reason


def test_too_few_pairs_of_a_blur_type_do_not_refuse():
    base = base_psnr()
    types = ["lens"] * 2 + ["gaussian"] * 22
    gain = np.array([-2.0] * 2 + [1.0] * 22)
    challenger, inp = scores(base + gain, types), scores(base, types)

    d = decide(challenger, inp, SHARP_OK, None, None, CFG)

    assert d.promote is True
    lens = by_name(d)["blur_type:lens"]
    assert lens.passed is True
    assert "too few pairs (2) to judge" in lens.detail
    assert d.reason.startswith("promoted: first champion")

    strict = decide(challenger, inp, SHARP_OK, None, None, replace(CFG, min_pairs_per_blur_type=2))
    assert failed_names(strict) == ["blur_type:lens"]


@pytest.mark.parametrize("sharp_in", [None, []])
def test_missing_sharp_in_is_refused(sharp_in):
    base = base_psnr()
    d = decide(scores(base + 1.0), scores(base), sharp_in, None, None, CFG)

    assert d.promote is False
    assert failed_names(d) == ["sharp_in"]
    assert "no sharp-in images" in by_name(d)["sharp_in"].detail
    assert "no sharp-in images" in d.reason


def test_sharp_in_below_limit_is_refused():
    base = base_psnr()
    d = decide(scores(base + 1.0), scores(base), [41.0, 29.99, 35.0], None, None, CFG)

    assert failed_names(d) == ["sharp_in"]
    assert by_name(d)["sharp_in"].values["worst"] == pytest.approx(29.99)
    assert "worst sharp-in PSNR 29.99 dB over 3 images" in d.reason


def test_first_champion_worse_than_its_init_from_is_refused():
    base = base_psnr()
    challenger, inp = scores(base + 0.8), scores(base)

    d = decide(challenger, inp, SHARP_OK, None, scores(base + 1.0), CFG, init_label="deblur v2")

    assert d.promote is False
    assert failed_names(d) == ["beats_init_from"]
    check = by_name(d)["beats_init_from"]
    assert check.values["mean_diff"] == pytest.approx(-0.2)
    assert "vs deblur v2" in check.detail and "-0.20 dB" in check.detail
    assert "beats_init_from" in d.reason

    better = decide(challenger, inp, SHARP_OK, None, scores(base + 0.7), CFG)
    assert better.promote is True
    assert better.reason.startswith("promoted: first champion")

    assert "beats_init_from" not in by_name(decide(challenger, inp, SHARP_OK, scores(base), scores(base + 1.0), CFG))


def test_init_from_needs_only_a_positive_mean_not_confidence():
    base = base_psnr()
    diffs = np.where(np.arange(N) % 2 == 0, 0.51, -0.49)
    d = decide(scores(base + 1.0 + diffs), scores(base), SHARP_OK, None, scores(base + 1.0), CFG)

    check = by_name(d)["beats_init_from"]
    assert check.values["lower_bound"] < 0 < check.values["mean_diff"]
    assert d.promote is True


def test_every_check_is_computed_after_a_failure():
    base = base_psnr()
    d = decide(scores(base - 0.5), scores(base), None, scores(base), None, CFG)

    assert failed_names(d) == ["beats_input", "blur_type:gaussian", "blur_type:motion", "sharp_in", "beats_champion"]
    assert d.reason.startswith(f"refused: {d.checks[0].detail}; ")
    for name in failed_names(d):
        assert name in d.reason


def test_bootstrap_is_deterministic_for_a_seed():
    base = base_psnr()
    noise = np.random.default_rng(3).normal(0.2, 0.5, size=N)
    challenger, champion = scores(base + noise), scores(base)

    first = paired_comparison(challenger, champion, 0.05, 0.95, 2000, seed=7)
    again = paired_comparison(challenger, champion, 0.05, 0.95, 2000, seed=7)
    other = paired_comparison(challenger, champion, 0.05, 0.95, 2000, seed=8)

    assert first == again
    assert first["lower_bound"] != other["lower_bound"]
    d1 = decide(challenger, scores(base - 1), SHARP_OK, champion, None, CFG)
    d2 = decide(challenger, scores(base - 1), SHARP_OK, champion, None, CFG)
    assert d1.as_dict() == d2.as_dict()


def test_bootstrap_lower_bound_matches_normal_approximation():
    diffs = np.random.default_rng(4).normal(0.3, 1.0, size=400)
    expected = diffs.mean() - 1.645 * diffs.std() / np.sqrt(diffs.size)

    assert bootstrap_lower_bound(diffs, 0.95, 4000, seed=0) == pytest.approx(expected, abs=0.02)
    assert bootstrap_lower_bound(np.full(10, 0.3), 0.95, 500, seed=0) == pytest.approx(0.3)


def test_sign_test_p_values():
    assert sign_test_p(10, 0) == 2 * 0.5**10
    assert sign_test_p(0, 10) == 2 * 0.5**10
    assert sign_test_p(9, 1) == pytest.approx(2 * 11 / 1024)
    assert sign_test_p(5, 5) == 1.0
    assert sign_test_p(0, 0) == 1.0
    assert 0.0 <= sign_test_p(2000, 1000) < 1e-20  # large n: exact integers, no overflow


def test_sign_test_drops_ties():
    base = base_psnr(13)
    gain = np.array([0.4] * 10 + [0.0] * 3)
    cmp = paired_comparison(scores(base + gain), scores(base), 0.0, 0.95, 500, seed=0)

    assert (cmp["wins"], cmp["losses"], cmp["ties"]) == (10, 0, 3)
    assert cmp["sign_p"] == 2 * 0.5**10


def test_pairs_are_matched_by_id_not_position():
    base = base_psnr()
    challenger, champion = scores(base + 0.5), scores(base)
    reversed_champion = PairedScores(champion.ids[::-1], champion.blur_types[::-1], champion.psnr[::-1])

    cmp = paired_comparison(challenger, reversed_champion, 0.05, 0.95, 500, seed=0)
    assert cmp["mean_diff"] == pytest.approx(0.5)
    assert (cmp["wins"], cmp["losses"]) == (N, 0)


def test_mismatched_ids_raise_naming_the_ids():
    a = scores([25.0, 26.0, 27.0], ids=["img01", "img02", "img07"])
    b = scores([25.0, 26.0, 27.0], ids=["img01", "img02", "img99"])

    with pytest.raises(ValueError, match=r"only in challenger: img07.*only in reference: img99"):
        paired_comparison(a, b, 0.0, 0.95, 100, seed=0)
    with pytest.raises(ValueError, match=r"img07.*img99"):
        decide(a, b, SHARP_OK, None, None, CFG)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="3 ids, 2 blur_types, 3 psnr"):
        PairedScores(("a", "b", "c"), ("motion", "motion"), (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="duplicate ids: a"):
        PairedScores(("a", "a"), ("motion", "motion"), (1.0, 2.0))
    with pytest.raises(ValueError, match="non-finite PSNR for ids: b"):
        PairedScores(("a", "b"), ("motion", "motion"), (1.0, float("nan")))
    with pytest.raises(ValueError, match="blur types for ids: a \\(motion vs lens\\)"):
        paired_comparison(PairedScores(("a",), ("motion",), (1.0,)), PairedScores(("a",), ("lens",), (1.0,)),
                          0.0, 0.95, 10, 0)
    with pytest.raises(ValueError, match="confidence"):
        replace(CFG, confidence=1.0)
    with pytest.raises(ValueError, match="bootstrap samples"):
        replace(CFG, bootstrap_samples=0)


def test_decision_as_dict_is_json():
    base = base_psnr()
    d = decide(scores(base + 0.5), scores(base), SHARP_OK, scores(base + 0.2), None, CFG)
    loaded = json.loads(json.dumps(d.as_dict()))

    assert loaded["promote"] is d.promote
    assert loaded["reason"] == d.reason
    assert [c["name"] for c in loaded["checks"]] == [c.name for c in d.checks]
    assert loaded["checks"][-1]["values"]["mean_diff"] == pytest.approx(0.3)
