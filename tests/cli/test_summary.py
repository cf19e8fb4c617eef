"""The pipeline's closing summary and the register stage's verdict: what a user reads after `make demo`."""

from __future__ import annotations

from deblur.cli.summary import format_summary
from deblur.evaluation.gate import gate_lines

METRICS = {"n_images": 2, "overall": {"input_psnr": 25.0, "input_ssim": 0.7, "model_psnr": 27.5, "model_ssim": 0.8},
           "per_blur_type": {"motion": {"n": 2, "input_psnr": 25.0, "input_ssim": 0.7, "model_psnr": 27.5,
                                        "model_ssim": 0.8}},
           "per_kernel_bucket": {"motion": {"<=21": {"n": 2, "input_psnr": 25.0, "model_psnr": 27.5,
                                                     "thorough_psnr": 27.5, "nonblind_psnr": 31.0, "kernel_ncc": 0.91},
                                            "23-41": {"n": 0}}}}
CHECKS = [{"name": "beats_input", "passed": True, "detail": "27.50 dB vs input 25.00 dB"},
          {"name": "beats_champion", "passed": False, "detail": "-0.06 dB"}]


def test_without_a_champion_the_summary_says_so_and_how_to_get_one():
    decision = {"model_name": "deblur", "version": "1", "promoted": False, "checks": CHECKS, "champion_uri": None,
                "tracking_uri": "http://127.0.0.1:5000"}
    text = format_summary(METRICS, decision)
    assert "NO CHAMPION" in text and "http://127.0.0.1:5000" in text
    assert "import_pretrained --register" in text and "answers 503" in text
    assert "HTTP service with the champion" not in text


def test_with_a_champion_the_verdict_lists_every_check_and_the_served_version():
    decision = {"model_name": "deblur", "version": "2", "promoted": False, "checks": CHECKS,
                "champion_uri": "models:/deblur@champion", "champion_version": "1", "serving_artifact": "function_app/model"}
    lines = gate_lines(decision)
    assert lines[1] == "  [pass] beats_input: 27.50 dB vs input 25.00 dB"
    assert lines[2] == "  [FAIL] beats_champion: -0.06 dB"
    assert "champion: deblur v1 = models:/deblur@champion" in lines[3]
    text = format_summary(METRICS, decision)
    assert "<=21   n=2    25.00   27.50   27.50   31.00  NCC 0.91" in text and "23-41" not in text.split("Registry")[0]
