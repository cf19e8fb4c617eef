"""The promotion gate: when a newly registered model may become ``champion``.

A challenger is promoted only if it
1. beats doing nothing: its test PSNR exceeds the blurred input's own PSNR by
   ``register.min_gain_over_input_db``;
2. leaves sharp photos alone: the sharp-in check's worst PSNR is at least
   ``register.min_sharp_in_psnr``;
3. beats the current champion, re-scored on the same test data, by ``register.margin_db``
   (or there is no champion yet).
"""

from __future__ import annotations

from dataclasses import dataclass

from deblur.config import RegisterConfig


@dataclass(frozen=True)
class GateInputs:
    challenger_psnr: float
    input_psnr: float
    sharp_in_psnr: float | None
    champion_psnr: float | None
    champion_version: str | None


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(g: GateInputs, cfg: RegisterConfig) -> Decision:
    gain = g.challenger_psnr - g.input_psnr
    if gain <= cfg.min_gain_over_input_db:
        return Decision(False, f"refused: {g.challenger_psnr:.2f} dB is not above the blurred input's own "
                               f"{g.input_psnr:.2f} dB by more than {cfg.min_gain_over_input_db} dB (gain {gain:+.2f} dB)")
    if g.sharp_in_psnr is not None and g.sharp_in_psnr < cfg.min_sharp_in_psnr:
        return Decision(False, f"refused: sharp photos come out changed (worst sharp-in PSNR {g.sharp_in_psnr:.2f} dB "
                               f"< {cfg.min_sharp_in_psnr} dB)")
    if g.champion_psnr is None:
        return Decision(True, f"promoted: first champion, {g.challenger_psnr:.2f} dB vs input {g.input_psnr:.2f} dB")
    if g.challenger_psnr < g.champion_psnr + cfg.margin_db:
        return Decision(False, f"refused: {g.challenger_psnr:.2f} dB does not beat champion v{g.champion_version} "
                               f"({g.champion_psnr:.2f} dB on the same test data) by {cfg.margin_db} dB")
    return Decision(True, f"promoted: {g.challenger_psnr:.2f} dB beats champion v{g.champion_version} "
                          f"({g.champion_psnr:.2f} dB) by {g.challenger_psnr - g.champion_psnr:.2f} dB")
