"""Training's DDP and GPU paths on CPU: two real gloo ranks, fp16's GradScaler, determinism, the GPU script."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from conftest import ROOT, TRAIN_OVERRIDES, params_with, write_params
from deblur.models.checkpoint_file import load_checkpoint
from deblur.core.config import load_params
from deblur.data.pairs import read_pairs
from deblur.training.device import configure_determinism
from deblur.training.distributed import Dist
from deblur.training.trainer import Trainer, TrainingError

WORLD = 2
HANG_S = 90      # a rank still running after this is waiting in a collective that the other skipped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _nan_on_rank_1(trainer: Trainer, rank: int) -> dict:
    """Step 1 has a NaN input on rank 1 only; step 2 is clean on both."""
    batches = iter(trainer._loader())
    before = _weights(trainer)
    blurred, sharp = next(batches)
    if rank == 1:
        blurred = blurred.clone()
        blurred[0, 0, 0, 0] = float("nan")
    try:
        first = trainer.train_step(blurred, sharp)
    except TrainingError as err:
        return {"error": str(err)}
    unchanged = all(torch.equal(before[k], v) for k, v in _weights(trainer).items())
    second = trainer.train_step(*next(batches))
    return {"first": first, "second": second, "skipped": trainer.skipped_steps, "unchanged": unchanged,
            "weights": _weights(trainer), "initial": before}


def _three_val_records(trainer: Trainer) -> list:
    """The tiny data has 2 val pairs; one train pair more makes the shards unequal (2 and 1)."""
    return read_pairs(trainer.pairs_dir, "val") + read_pairs(trainer.pairs_dir, "train")[:1]


def _validate(trainer: Trainer, rank: int) -> dict:
    trainer.val_records = _three_val_records(trainer)
    generator = torch.Generator().manual_seed(0)            # the same nudge on both ranks: away from the
    with torch.no_grad():                                      # identity the model starts as
        for weight in trainer.model.parameters():
            weight.add_(0.05 * torch.randn(weight.shape, generator=generator))
    return {"metrics": trainer.validate(log_images=False), "weights": _weights(trainer)}


SCENARIOS = {"nan_on_rank_1": _nan_on_rank_1, "validate": _validate}


def _rank(rank: int, port: int, scenario: str, params, pairs: Path, out: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=2 * HANG_S))
    trainer = Trainer(params, pairs, out / f"ck{rank}", Dist(rank=rank, world_size=WORLD))
    torch.save(SCENARIOS[scenario](trainer, rank), out / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(scenario: str, params, pairs: Path, out: Path) -> list[dict]:
    """``scenario`` on two gloo ranks (spawned: a fork can inherit locks held by other threads and hang); fails the test if they hang."""
    context = tmp.start_processes(_rank, args=(_free_port(), scenario, params, pairs, out), nprocs=WORLD,
                                  join=False, start_method="spawn")
    deadline = time.monotonic() + HANG_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{scenario}: ranks still running after {HANG_S} s (waiting in a collective)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_nan_on_one_rank_is_skipped_by_every_rank(tmp_path, pairs_dir):
    ranks = run_ranks("nan_on_rank_1", params_with(**{"train.on_nonfinite": "skip"}), pairs_dir, tmp_path)
    for r in ranks:
        assert r["first"] is None and r["skipped"] == 1 and r["unchanged"]
        assert r["second"] is not None and r["second"]["loss"] > 0
    zero, one = (r["weights"] for r in ranks)
    assert all(torch.equal(zero[k], one[k]) for k in zero)                     # still one model
    assert any(not torch.equal(zero[k], ranks[0]["initial"][k]) for k in zero)  # and step 2 trained it


def test_nan_on_one_rank_stops_every_rank_with_the_same_error(tmp_path, pairs_dir):
    ranks = run_ranks("nan_on_rank_1", params_with(**{"train.on_nonfinite": "stop"}), pairs_dir, tmp_path)
    errors = [r.get("error") for r in ranks]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "step 0: loss is not finite (rank 1 of 2: " in errors[0] and "rank 0" not in errors[0]


def test_sharded_validation_equals_one_process(tmp_path, pairs_dir):
    params = params_with()
    ranks = run_ranks("validate", params, pairs_dir, tmp_path)
    single = Trainer(params, pairs_dir, tmp_path / "single")
    single.val_records = _three_val_records(single)
    assert len(single.val_records) == 3
    single.model.load_state_dict(ranks[0]["weights"])
    expected = single.validate(log_images=False)
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == expected
    assert expected["val_psnr"] > 0 and expected["val_psnr"] != expected["val_input_psnr"]


def test_fp16_grad_scaler_skips_inf_gradients_and_resumes_its_scale(tmp_path, pairs_dir, monkeypatch):
    fp16 = params_with(**{"train.precision": "fp16"})
    assert not Trainer(fp16, pairs_dir, tmp_path / "cpu").scaler.is_enabled()   # no autocast on CPU, no scaler
    # what CUDA + fp16 builds, on CPU: torch's GradScaler runs there with fp32 gradients
    monkeypatch.setattr(Trainer, "_grad_scaler",
                        lambda self: torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1))
    trainer = Trainer(fp16, pairs_dir, tmp_path / "ck")
    batches = iter(trainer._loader())
    before = _weights(trainer)
    hook = next(trainer.model.parameters()).register_hook(lambda g: torch.full_like(g, float("inf")))
    assert trainer.train_step(*next(batches)) is None                  # finite loss, inf gradients
    assert trainer.skipped_steps == 1 and trainer.scaler.get_scale() == 512.0
    assert all(torch.equal(before[k], v) for k, v in _weights(trainer).items())
    hook.remove()
    logged = trainer.train_step(*next(batches))
    assert logged is not None and logged["grad_norm"] < float("inf") and trainer.skipped_steps == 1
    assert trainer.scaler.get_scale() == 1024.0                         # grows after a good step
    assert any(not torch.equal(before[k], v) for k, v in _weights(trainer).items())

    trainer.scaler.update(new_scale=256.0)
    trainer.step = 2
    trainer.save(best=False)
    assert load_checkpoint(trainer.last_path, trusted=True)["scaler"]["scale"] == 256.0
    resumed = Trainer(fp16, pairs_dir, tmp_path / "ck")
    assert resumed.resumed and resumed.scaler.get_scale() == 256.0


def test_deterministic_flag_sets_cudnn_and_torch_switches():
    try:
        configure_determinism(True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        configure_determinism(False)
        assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        configure_determinism(params_with().train.deterministic)
    assert params_with().train.deterministic is True


@pytest.mark.slow
def test_gpu_pretrain_script_dry_run_on_cpu(tmp_path):
    """scripts/gpu_pretrain.sh end to end on CPU at a tiny budget: what the device call would bring back."""
    params_file = write_params(tmp_path / "tiny.yaml", {**TRAIN_OVERRIDES, "train.max_steps": 4, "train.val_every": 2})
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DRY_RUN": "1", "PARAMS": str(params_file), "OUT": str(out), "WORK": str(work),
           "BUDGET_S": "400", "RESERVE_S": "5", "SMOKE_STEPS": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_pretrain.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "] done" in proc.stdout and "smoke run: 2 steps" in proc.stdout

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())   # what $OUT brings back
    run = json.loads((out / "run.json").read_text())
    assert "run_id" not in json.loads((out / "train_run.json").read_text())   # a DVC output: the run is found by its checkpoint
    assert run["tags"]["stage"] == "train" and [s for s, _, _ in run["metrics"]["loss"]] == [1, 2, 3, 4]
    assert (out / "curve.csv").read_text().startswith("step,loss")
    best = b"".join(p.read_bytes() for p in sorted(out.glob("best.pt.[0-9]*")))
    assert best == (work / "state" / "checkpoints" / "best.pt").read_bytes()
    assert (out / "best.pt.sha256").read_text().split()[0] == hashlib.sha256(best).hexdigest()
    assert run["tags"]["checkpoint_sha256"] == hashlib.sha256(best).hexdigest()   # the run that wrote best.pt
    assert load_checkpoint(work / "state" / "checkpoints" / "last.pt", trusted=True)["step"] == 4
    assert json.loads((work / "smoke" / "run.json").read_text())["run_id"] != run["run_id"]
    assert "train.log" in files


def test_gpu_profile_loads_and_fits_the_device_plan():
    params = load_params(ROOT / "configs" / "pretrain-gpu.yaml")
    assert params.train.device == "cuda" and params.train.precision == "bf16" and params.train.deterministic
    assert params.train.max_steps <= 8000 and params.train.max_steps % params.train.val_every == 0
