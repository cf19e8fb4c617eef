"""The promotion gate: whether a challenger model may become ``champion``, decided on evidence.

The gate runs these checks on per-image test PSNRs:

``beats_input``
    The overall mean gain over the blurred input (doing nothing) exceeds
    ``min_gain_over_input_db``.
``blur_type:<type>``
    For every blur type with at least ``min_pairs_per_blur_type`` test pairs, the challenger
    is on average not worse than the blurred input on that type. A good overall mean can
    hide a model that makes, say, motion blur worse while helping defocus a lot. Types
    with fewer pairs are reported but not judged: a handful of images is not evidence.
``sharp_in``
    Sharp photos come out nearly unchanged: the worst sharp-in PSNR (output vs input) is
    at least ``min_sharp_in_psnr``. A missing sharp-in check fails, because a model that
    is never tested on sharp photos may be sharpening them into artefacts.
``beats_champion``
    The challenger beats the current champion, re-scored on the same test images, by
    ``margin_db`` in mean PSNR, and a seeded paired bootstrap puts the lower confidence
    bound of that mean gain above zero at ``confidence``.
``beats_init_from``
    Only when there is no champion yet but the challenger was fine-tuned from another
    model: it must not be worse on average than where it started.

The comparisons are paired, image by image, because test images differ in difficulty
(a flat sky versus dense foliage can differ by 10 dB) far more than two models differ
(tenths of a dB). Comparing two unpaired means buries the model difference in the image
spread; the per-image differences cancel the image difficulty and leave the model
difference with its own, much smaller, noise. Each comparison also reports wins, losses
and an exact sign-test p-value, which say whether a mean gain comes from most images or
from a few outliers.

Every check is computed and returned, even after one fails, so every reason can be logged.
The module is pure: numpy, the standard library and its thresholds (``deblur.core.config.RegisterConfig``),
no MLflow, no torch.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from deblur.core.config import RegisterConfig

TIE_DB = 1e-9  # per-image differences this small count as ties in the sign test


@dataclass(frozen=True)
class PairedScores:
    """Per-image test PSNRs of one model (or of the blurred input), keyed by image id."""

    ids: tuple[str, ...]
    blur_types: tuple[str, ...]
    psnr: tuple[float, ...]

    def __post_init__(self) -> None:
        n_ids, n_types, n_psnr = len(self.ids), len(self.blur_types), len(self.psnr)
        if not n_ids == n_types == n_psnr:
            raise ValueError(f"PairedScores lengths differ: {n_ids} ids, {n_types} blur_types, {n_psnr} psnr")
        if n_ids == 0:
            raise ValueError("PairedScores is empty: no test images")
        duplicates = sorted(i for i, count in Counter(self.ids).items() if count > 1)
        if duplicates:
            raise ValueError(f"PairedScores has duplicate ids: {', '.join(duplicates)}")
        bad = [i for i, p in zip(self.ids, self.psnr) if not math.isfinite(p)]
        if bad:
            raise ValueError(f"PairedScores has non-finite PSNR for ids: {', '.join(bad)}")

    def by_id(self) -> dict[str, tuple[str, float]]:
        """``{id: (blur_type, psnr)}``."""
        return {i: (t, float(p)) for i, t, p in zip(self.ids, self.blur_types, self.psnr)}


@dataclass(frozen=True)
class Check:
    """One rule of the gate: its name, whether it passed, and a sentence with the numbers."""

    name: str
    passed: bool
    detail: str
    values: dict[str, float | int] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict:
        """JSON-able form."""
        return {"name": self.name, "passed": bool(self.passed), "detail": self.detail, "values": dict(self.values)}


@dataclass(frozen=True)
class Decision:
    """The gate's verdict: promote only if every check passed."""

    promote: bool
    checks: tuple[Check, ...]
    reason: str

    def as_dict(self) -> dict:
        """JSON-able form, for reports/registered_model.json and MLflow."""
        return {"promote": bool(self.promote), "reason": self.reason, "checks": [c.as_dict() for c in self.checks]}


def _check_comparison_args(margin_db: float, confidence: float, samples: int) -> None:
    if not math.isfinite(margin_db):
        raise ValueError(f"margin_db must be a finite number, got {margin_db}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    if samples < 1:
        raise ValueError(f"bootstrap samples must be at least 1, got {samples}")


def _align(a: PairedScores, b: PairedScores, a_name: str,
           b_name: str) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Pair ``a`` and ``b`` by image id, in ``a``'s order; ids, blur types, a's PSNRs, b's PSNRs."""
    b_by_id = b.by_id()
    only_a = [i for i in a.ids if i not in b_by_id]
    a_set = set(a.ids)
    only_b = [i for i in b.ids if i not in a_set]
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"only in {a_name}: {', '.join(only_a)}")
        if only_b:
            parts.append(f"only in {b_name}: {', '.join(only_b)}")
        raise ValueError(f"{a_name} and {b_name} are not scored on the same images ({'; '.join(parts)})")
    clash = [f"{i} ({t} vs {b_by_id[i][0]})" for i, t in zip(a.ids, a.blur_types) if b_by_id[i][0] != t]
    if clash:
        raise ValueError(f"{a_name} and {b_name} disagree on blur types for ids: {', '.join(clash)}")
    ids = list(a.ids)
    return ids, list(a.blur_types), np.asarray(a.psnr, dtype=float), np.array([b_by_id[i][1] for i in ids])


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign-test p-value (ties already dropped); 1.0 with no untied pairs."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be non-negative, got {wins} and {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def bootstrap_lower_bound(diffs: np.ndarray, confidence: float, samples: int, seed: int) -> float:
    """One-sided percentile lower bound of the mean of ``diffs``, resampling images with replacement."""
    d = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // max(1, d.size))
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        idx = rng.integers(0, d.size, size=(stop - start, d.size))
        means[start:stop] = d[idx].mean(axis=1)
    return float(np.quantile(means, 1.0 - confidence))


def paired_comparison(challenger: PairedScores, reference: PairedScores, margin_db: float, confidence: float,
                      samples: int, seed: int, reference_name: str = "reference") -> dict:
    """Compare two models image by image on the same test images.

    Returns ``n``, ``challenger_mean``, ``reference_mean``, ``mean_diff``, ``lower_bound``
    (seeded paired bootstrap, one-sided at ``confidence``), ``confidence``, ``margin_db``,
    ``wins``/``losses``/``ties``, ``sign_p`` (exact two-sided, ties dropped) and ``passed``
    (``mean_diff >= margin_db`` and ``lower_bound > 0``). ``reference_name`` labels errors.
    """
    _check_comparison_args(margin_db, confidence, samples)
    _, _, c, r = _align(challenger, reference, "challenger", reference_name)
    d = c - r
    wins = int(np.sum(d > TIE_DB))
    losses = int(np.sum(d < -TIE_DB))
    mean_diff = float(d.mean())
    lower = bootstrap_lower_bound(d, confidence, samples, seed)
    return {
        "n": int(d.size),
        "challenger_mean": float(c.mean()),
        "reference_mean": float(r.mean()),
        "mean_diff": mean_diff,
        "lower_bound": lower,
        "confidence": float(confidence),
        "margin_db": float(margin_db),
        "wins": wins,
        "losses": losses,
        "ties": int(d.size) - wins - losses,
        "sign_p": sign_test_p(wins, losses),
        "passed": bool(mean_diff >= margin_db and lower > 0.0),
    }


def _p(p: float) -> str:
    return "p<0.01" if p < 0.01 else f"p={p:.2f}"


def _comparison_detail(cmp: dict, label: str, requirement: str) -> str:
    return (f"{cmp['challenger_mean']:.2f} dB vs {label} {cmp['reference_mean']:.2f} dB over {cmp['n']} pairs: "
            f"mean gain {cmp['mean_diff']:+.2f} dB ({requirement}), "
            f"{cmp['confidence']:.0%} lower bound {cmp['lower_bound']:+.2f} dB, "
            f"wins/losses/ties {cmp['wins']}/{cmp['losses']}/{cmp['ties']}, sign test {_p(cmp['sign_p'])}")


def _comparison_values(cmp: dict) -> dict[str, float | int]:
    return {k: v for k, v in cmp.items() if k != "passed"}


def decide(challenger: PairedScores, input_scores: PairedScores, sharp_in_psnr: list[float] | None,
           champion: PairedScores | None, init_from: PairedScores | None, cfg: RegisterConfig,
           champion_label: str = "champion", init_label: str = "init_from", seed: int = 0) -> Decision:
    """Run every check of the gate on ``challenger`` and decide whether to promote it.

    ``cfg`` holds the thresholds (params.yaml's ``register`` section); ``seed`` (params.yaml's
    ``seed``) seeds the paired bootstraps."""
    _, types, c, x = _align(challenger, input_scores, "challenger", "input")
    checks: list[Check] = []

    gain = float((c - x).mean())
    checks.append(Check(
        "beats_input", gain > cfg.min_gain_over_input_db,
        f"{c.mean():.2f} dB vs input {x.mean():.2f} dB over {c.size} pairs: mean gain {gain:+.2f} dB "
        f"(needs > {cfg.min_gain_over_input_db:.2f} dB)",
        {"n": int(c.size), "challenger_mean": float(c.mean()), "input_mean": float(x.mean()), "mean_gain": gain},
    ))

    type_arr = np.asarray(types, dtype=object)
    for blur in sorted(set(types)):
        mask = type_arr == blur
        n = int(mask.sum())
        cm, xm = float(c[mask].mean()), float(x[mask].mean())
        values = {"n": n, "challenger_mean": cm, "input_mean": xm, "mean_gain": cm - xm}
        if n < cfg.min_pairs_per_blur_type:
            checks.append(Check(f"blur_type:{blur}", True,
                                f"{blur}: too few pairs ({n}) to judge, need {cfg.min_pairs_per_blur_type} "
                                f"({cm:.2f} dB vs input {xm:.2f} dB)", values))
        else:
            checks.append(Check(f"blur_type:{blur}", cm >= xm,
                                f"{blur}: {cm:.2f} dB vs input {xm:.2f} dB over {n} pairs ({cm - xm:+.2f} dB)", values))

    if not sharp_in_psnr:
        checks.append(Check("sharp_in", False,
                            "no sharp-in images: cannot tell whether sharp photos come out unchanged"))
    else:
        s = np.asarray(sharp_in_psnr, dtype=float)
        if not np.all(np.isfinite(s)):
            raise ValueError(f"sharp_in_psnr has non-finite values: {[float(v) for v in s if not math.isfinite(v)]}")
        worst = float(s.min())
        checks.append(Check("sharp_in", worst >= cfg.min_sharp_in_psnr,
                            f"worst sharp-in PSNR {worst:.2f} dB over {s.size} images "
                            f"(needs >= {cfg.min_sharp_in_psnr:.2f} dB)",
                            {"n": int(s.size), "worst": worst, "mean": float(s.mean())}))

    if champion is not None:
        cmp = paired_comparison(challenger, champion, cfg.margin_db, cfg.confidence, cfg.bootstrap_samples, seed,
                                champion_label)
        checks.append(Check("beats_champion", cmp["passed"],
                            _comparison_detail(cmp, champion_label,
                                               f"needs >= {cfg.margin_db:.2f} dB and lower bound > 0"),
                            _comparison_values(cmp)))
    elif init_from is not None:
        cmp = paired_comparison(challenger, init_from, 0.0, cfg.confidence, cfg.bootstrap_samples, seed, init_label)
        checks.append(Check("beats_init_from", cmp["mean_diff"] > 0.0,
                            _comparison_detail(cmp, init_label, "needs > 0.00 dB"),
                            _comparison_values(cmp)))

    failed = [ch for ch in checks if not ch.passed]
    if failed:
        reason = (f"refused: {'; '.join(ch.detail for ch in failed)} "
                  f"[failed: {', '.join(ch.name for ch in failed)}]")
    else:
        headline = checks[0].detail
        if champion is not None:
            reason = f"promoted: beats {champion_label}, {checks[-1].detail}"
        elif init_from is not None:
            reason = f"promoted: first champion, not worse than {init_label}, {checks[-1].detail}"
        else:
            reason = f"promoted: first champion, {headline}"
    return Decision(not failed, tuple(checks), reason)


def gate_lines(decision: dict) -> list[str]:
    """The gate's verdict with every check and its reason, and which model serves (or that none does)."""
    verdict = "promoted to 'champion'" if decision["promoted"] else "not promoted"
    lines = [f"Registry: {decision['model_name']} version {decision['version']} registered as 'challenger', "
             f"{verdict}. The gate's checks:"]
    for check in decision.get("checks", []):
        lines.append(f"  [{'pass' if check['passed'] else 'FAIL'}] {check['name']}: {check['detail']}")
    if decision.get("champion_uri"):
        lines.append(f"  champion: {decision['model_name']} v{decision.get('champion_version')} = {decision['champion_uri']}  "
                     f"(serving artifact: {decision.get('serving_artifact')})")
    else:
        lines += [f"  NO CHAMPION: no version of {decision['model_name']} has passed the gate in this tracking store "
                  f"({decision.get('tracking_uri', 'sqlite:///mlflow.db')}), so nothing is served.",
                  "  To get one: python -m deblur.cli.import_pretrained --register checkpoints/pretrained/nafnet16.pt "
                  "(the shipped model through the same gate; on a team tracking server: scripts/tracking_server.sh register), "
                  "or train until the checks above pass."]
    return lines
