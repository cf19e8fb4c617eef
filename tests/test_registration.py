"""The promotion gate's rules, one by one."""

import pytest

from deblur.config import RegisterConfig
from deblur.registration import GateInputs, decide

CFG = RegisterConfig(model_name="m", margin_db=0.05, min_gain_over_input_db=0.0, min_sharp_in_psnr=30.0)


def gate(challenger, input_psnr=25.0, sharp_in=40.0, champion=None):
    return GateInputs(challenger, input_psnr, sharp_in, champion, "3" if champion is not None else None)


@pytest.mark.parametrize("inputs, promote, words", [
    (gate(26.0), True, "first champion"),
    (gate(24.0), False, "blurred input"),
    (gate(25.0), False, "blurred input"),            # equal to doing nothing is not good enough
    (gate(27.0, sharp_in=21.7), False, "sharp photos"),
    (gate(27.0, champion=27.0), False, "does not beat champion v3"),
    (gate(27.04, champion=27.0), False, "does not beat champion"),
    (gate(27.2, champion=27.0), True, "beats champion v3"),
    (gate(27.2, sharp_in=None), True, "first champion"),
])
def test_gate(inputs, promote, words):
    decision = decide(inputs, CFG)
    assert decision.promote is promote
    assert words in decision.reason
