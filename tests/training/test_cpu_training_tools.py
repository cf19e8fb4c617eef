"""Tools of the long CPU runs: CPU-hours accounting of the comparison bench, and the compact
stage checkpoint that `scripts/cpu_pretrain_shake.sh save` commits for models over MAX_MB."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cpu_training", ROOT / "bench" / "bench_cpu_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_seconds_add_up_over_restarts_and_cost_unsampled_steps(tmp_path):
    log = tmp_path / "cpu.csv"
    log.write_text("time,run,pid,cpu_s,step\n"
                   "1,a,10,100.0,1000\n"     # first sample: 1000 steps before it, at 2 s each
                   "2,b,20,5.0,0\n"           # another run: ignored
                   "3,a,10,160.0,1030\n"      # +60 s for 30 steps
                   "4,a,11,20.0,1040\n"       # restarted: 10 steps unsampled (2 s each), new clock from 20 s
                   "5,a,11,50.0,1050\n")
    bench = _bench()
    points = bench.cpu_seconds_by_step(log, "a", step_seconds=2.0)
    assert points == [(1000, 2000.0), (1030, 2060.0), (1040, 2080.0), (1050, 2110.0)]
    assert bench.at_step(points, 1015, 2.0) == pytest.approx(2030.0)      # interpolated
    assert bench.at_step(points, 1060, 2.0) == pytest.approx(2130.0)      # extrapolated at the step cost
    assert bench.at_step([], 500, 2.0) == 1000.0                           # nothing sampled: steps x cost


def test_validations_are_read_from_the_training_log(tmp_path):
    (tmp_path / "train.log").write_text(
        "train: 10%|#| 500/40000\n[train] step 500: val PSNR 22.91 dB (blurred input 21.68 dB)\n"
        "[train] step 1000: val PSNR 22.96 dB (blurred input 21.68 dB)\n"
        "[train] step 500: val PSNR 22.90 dB (blurred input 21.68 dB)\n")   # a restart validated 500 again
    assert _bench().validations(tmp_path) == [(500, 22.90, 21.68), (1000, 22.96, 21.68)]


def test_save_commits_a_compact_last_checkpoint_that_resumes(tmp_path):
    """A last.pt over MAX_MB goes to the keep folder with Adam's moments in bf16 and no best copy."""
    model = torch.nn.Linear(1024, 1536)                          # 1.6 M parameters: 6 MB of fp32 weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 1024)).sum().backward()
    opt.step()
    work, keep = tmp_path / "work", tmp_path / "keep"
    (work / "checkpoints").mkdir(parents=True)
    torch.save({"model_config": {}, "state_dict": model.state_dict(), "step": 7, "best_psnr": 1.0, "best_step": 7,
                "params_digest": "d", "optimizer": opt.state_dict(),
                "best_checkpoint": {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}},
               work / "checkpoints" / "last.pt")
    assert (work / "checkpoints" / "last.pt").stat().st_size > 20 * 1024 * 1024    # weights, 2 moments, best copy

    env = {**os.environ, "WORK": str(work), "KEEP": str(keep), "MAX_MB": "20", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "cpu_pretrain_shake.sh"), "save"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "compacted" in proc.stdout, proc.stdout + proc.stderr
    assert (keep / "last.pt").stat().st_size < 20 * 1024 * 1024
    saved = torch.load(keep / "last.pt", weights_only=False)
    assert "best_checkpoint" not in saved and saved["step"] == 7
    assert {s["exp_avg"].dtype for s in saved["optimizer"]["state"].values()} == {torch.bfloat16}
    assert torch.equal(saved["state_dict"]["weight"], model.state_dict()["weight"])   # weights stay fp32, exact

    resumed = torch.optim.AdamW(model.parameters(), lr=1e-3)
    resumed.load_state_dict(saved["optimizer"])                # torch casts the moments back to fp32
    state = resumed.state_dict()["state"][0]
    assert state["exp_avg"].dtype == torch.float32
    assert torch.allclose(state["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"], rtol=1e-2)
