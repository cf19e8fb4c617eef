"""The training loop: AdamW + cosine schedule, validation, checkpoints, resume, DDP.

One step = one optimiser update on ``batch_size`` patches per rank. Checkpoints:
``last.pt`` (everything needed to resume) and ``best.pt`` (best validation PSNR), both
written atomically and only from finite weights. ``torchrun`` starts several ranks
(``training.distributed``); only rank 0 logs and saves. ``last.pt`` is resumed when its
resume key matches (``training.resume``); ``train.init_from`` loads the starting weights
(``training.init_weights``); the curve is written by ``training.curves``.
SIGTERM or Ctrl-C (a scheduler's time limit, ``timeout``) ends the current step, writes
``last.pt`` and raises ``TrainingInterrupted``: the same command then resumes there.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from deblur.core import viz
from deblur.core.config import Params
from deblur.core.imageio import read_rgb
from deblur.core.progress import progress
from deblur.core.reproducible import pin_threads
from deblur.data.datasets import OnTheFlyPatches, PairPatches, StepSampler, to_tensor, to_uint8
from deblur.data.pairs import read_pairs
from deblur.evaluation.metrics import psnr, ssim
from deblur.models.build import build_model, configure_inference, count_parameters
from deblur.models.checkpoint_file import load_checkpoint, save_atomic
from deblur.tracking import runs as tracking
from deblur.training.device import (autocast, configure_determinism, grad_scaler, resolve_device, seed_everything,
                                    signals_request_stop)
from deblur.training.distributed import Dist, broadcast_flag, data_parallel, gather_rows, nonfinite_loss
from deblur.training.errors import TrainingError, TrainingInterrupted
from deblur.training.init_weights import load_init_from
from deblur.training.losses import CompositeLoss
from deblur.training.resume import resume_key, resume_mismatch

__all__ = ["Trainer", "TrainResult", "TrainingError", "TrainingInterrupted"]


@dataclass
class TrainResult:
    best_psnr: float
    best_step: int
    last_step: int
    stopped_early: bool
    run_id: str | None
    history: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(self, params: Params, pairs_dir: Path, checkpoint_dir: Path, dist_info: Dist | None = None,
                 resume_from: Path | None = None) -> None:
        self.params = params
        self.cfg = params.train
        self.pairs_dir = Path(pairs_dir)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.dist = dist_info or Dist()
        configure_determinism(self.cfg.deterministic)   # before the first CUDA kernel
        pin_threads(self.cfg.cpu_threads)
        self.device = resolve_device(self.cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.dist.local_rank)
            self.device = torch.device("cuda", self.dist.local_rank)
        seed_everything(params.seed + self.dist.rank)

        self.model = build_model(params.model)
        self.base_ref = None    # what train.init_from resolved to (deblur.models.lora.BaseModelRef)
        self.lora = self.cfg.lora.rank > 0
        if self.lora:           # the base's weights, then the adapter; a resume overwrites both
            from deblur.models.lora import LoraSettings, attach_adapter   # peft: imported only for LoRA runs

            self._init_from()
            attach_adapter(self.model, LoraSettings.of(self.cfg.lora))
        self.model = self.model.to(self.device)
        if self.device.type == "cuda" and self.cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = CompositeLoss(params.loss)
        trainable = [p for p in self.model.parameters() if p.requires_grad]   # LoRA: the adapter only
        self.optimizer = torch.optim.AdamW(trainable, lr=self.cfg.lr, betas=self.cfg.betas,
                                           weight_decay=self.cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.cfg.max_steps,
                                                                    eta_min=self.cfg.eta_min)
        self.scaler = self._grad_scaler()
        self.step = 0
        self.best_psnr = -math.inf
        self.best_step = -1
        self.bad_validations = 0
        self.skipped_steps = 0
        self.cpu_seconds_before = 0.0   # this run's CPU time in earlier (resumed) processes
        self._cpu_start = time.process_time()
        self.history: list[dict] = []
        self.finished = False
        self.best_checkpoint: dict | None = None
        self.digest = params.digest()
        self.resume_key = resume_key(params, self.pairs_dir)

        self.val_records = read_pairs(self.pairs_dir, "val")[: self.cfg.val_max_images]
        if not self.val_records:
            raise TrainingError(f"{self.pairs_dir / 'val'}: the val split is empty, so training cannot be validated; "
                                "give ingest a non-zero val fraction (ingest.folder.val_fraction, "
                                "ingest.embedded.val_fraction or ingest.gopro.val_sequences) or add images")
        self.resumed = self._resume_forced(Path(resume_from)) if resume_from else self._maybe_resume()
        if not self.resumed and self.cfg.init_from and not self.lora:
            self._init_from()

        self.train_model = self.model
        if self.device.type == "cuda" and self.cfg.compile:
            self.train_model = torch.compile(self.model)
        if self.dist.world_size > 1 and hasattr(self.model, "training_loss"):   # bypasses DDP's forward: no sync
            raise TrainingError(f"model.{params.model.name} trains through its own training_loss, which "
                                "multi-process (DDP) training does not synchronise yet: run it in one process")
        self.train_model = data_parallel(self.train_model, self.dist, self.device)

    # --- checkpoints -------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.checkpoint_dir / "best.pt"

    def _state(self, full: bool) -> dict:
        state = {
            "model_config": self.params.model.model_dump(mode="json"),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "train_patch_size": self.cfg.patch_size,
            "step": self.step,
            "best_psnr": self.best_psnr,
            "best_step": self.best_step,
            "params_digest": self.digest,
            "resume_key": self.resume_key,
        }
        if self.lora:
            state["lora"] = {"settings": self.cfg.lora.model_dump(mode="json"), "base": self.base_ref.as_dict()}
        if full:
            state.update(
                finished=self.finished,
                best_checkpoint=self.best_checkpoint,
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(),
                bad_validations=self.bad_validations,
                cpu_seconds=self.cpu_seconds(),
                history=self.history,
                rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            )
        return state

    def cpu_seconds(self) -> float:
        """CPU seconds this run has used since its Trainer was built, resumed processes included:
        the process's CPU time (all its threads; DataLoader worker processes are not counted). On a
        shared CPU, CPU-hours compare training runs fairly; wall time does not."""
        return self.cpu_seconds_before + time.process_time() - self._cpu_start

    def _weights_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.model.parameters())

    def save(self, best: bool) -> None:
        # checked on every rank (DDP keeps the weights equal), so all ranks raise together
        if not self._weights_finite():
            raise TrainingError(f"step {self.step}: weights are not finite; refusing to write a broken checkpoint")
        if not self.dist.is_main:
            return
        if best:
            self.best_checkpoint = self._state(full=False)
            save_atomic(self.best_checkpoint, self.best_path)
        save_atomic(self._state(full=True), self.last_path)

    def _maybe_resume(self) -> bool:
        """Resume ``last.pt`` only if it is an unfinished run of the same params, data and code."""
        if not self.last_path.exists():
            return False
        ckpt = load_checkpoint(self.last_path, trusted=True)   # this run's own training state
        reasons = resume_mismatch(ckpt.get("resume_key"), self.resume_key)
        if ckpt.get("finished"):
            reasons.insert(0, f"it is a finished run (step {ckpt['step']})")
        if reasons:
            self._say(f"[train] not resuming {self.last_path}: {'; '.join(reasons)}; starting fresh")
            return False
        self._load_training_state(ckpt, self.last_path)
        return True

    def _resume_forced(self, path: Path) -> bool:
        """``--resume-from``: continue ``path`` although the code changed; params and data must match."""
        ckpt = load_checkpoint(path, trusted=True)   # a training state the user names to continue
        if ckpt.get("finished") or int(ckpt["step"]) >= self.cfg.max_steps:
            raise TrainingError(f"--resume-from {path}: that run already finished (step {ckpt['step']})")
        reasons = [r for r in resume_mismatch(ckpt.get("resume_key"), self.resume_key)
                   if not r.startswith("code changed")]
        if ckpt.get("resume_key") is None:
            self._say(f"[train] {path} has no resume key; trusting --resume-from")
        elif reasons:
            raise TrainingError(f"--resume-from {path}: {'; '.join(reasons)}")
        self._load_training_state(ckpt, path)
        return True

    def _load_training_state(self, ckpt: dict, path: Path) -> None:
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):                  # empty when the run had no loss scaling
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.best_psnr = float(ckpt["best_psnr"])
        self.best_step = int(ckpt["best_step"])
        self.bad_validations = int(ckpt.get("bad_validations", 0))
        self.cpu_seconds_before = float(ckpt.get("cpu_seconds", 0.0))
        self.history = list(ckpt.get("history", []))
        self.best_checkpoint = ckpt.get("best_checkpoint")
        if ckpt.get("lora"):   # the base the run started from, even if an alias has moved since
            from deblur.models.lora import BaseModelRef   # peft, as above

            base = ckpt["lora"]["base"]
            self.base_ref = BaseModelRef(base["source"], base.get("name"), base.get("version"))
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if self.best_checkpoint is not None and not self.best_path.exists() and self.dist.is_main:
            save_atomic(self.best_checkpoint, self.best_path)   # DVC removes best.pt before re-running train
        self._say(f"[train] resumed from {path} at step {self.step}")

    def _say(self, line: str) -> None:
        if self.dist.is_main:
            print(line, flush=True)

    def _init_from(self) -> None:
        """Load ``train.init_from``: a checkpoint file, or a registered version (downloaded)."""
        self.base_ref = load_init_from(self.model, self.cfg.init_from, self.params.model, self.lora, self._say)

    # --- data ----------------------------------------------------------------------------
    def _dataset(self):
        length = self.cfg.max_steps * self.cfg.batch_size * self.dist.world_size
        records = read_pairs(self.pairs_dir, "train")
        if self.cfg.source == "pairs":
            return PairPatches(records, self.cfg.patch_size, self.params.seed, length, self.cfg.identity_fraction)
        by_name = {r.name: r.clear_path for r in records if r.blur_type != "real"}  # one per image, not per pair
        sharp = [by_name[n] for n in sorted(by_name)]
        return OnTheFlyPatches(sharp, self.params.synthesize, self.cfg.patch_size, self.params.seed, length,
                               self.cfg.identity_fraction)

    def _loader(self) -> DataLoader:
        sampler = StepSampler(self.step, self.cfg.max_steps, self.cfg.batch_size, self.dist.rank, self.dist.world_size)
        return DataLoader(self._dataset(), batch_size=self.cfg.batch_size, sampler=sampler,
                          num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    # --- steps -----------------------------------------------------------------------------
    def _grad_scaler(self) -> torch.amp.GradScaler:   # a method: a test swaps in what CUDA + fp16 builds
        return grad_scaler(self.device, self.cfg.precision)

    def train_step(self, blurred: torch.Tensor, sharp: torch.Tensor) -> dict[str, float] | None:
        """One optimiser update; returns logged values, or None when a non-finite step was skipped."""
        self.train_model.train()
        fmt = torch.channels_last if (self.device.type == "cuda" and self.cfg.channels_last) else torch.contiguous_format
        blurred = blurred.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        sharp = sharp.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        objective = getattr(self.model, "training_loss", None)
        if objective is not None:   # a model with its own objective (diffusion: noise/velocity prediction)
            with autocast(self.device, self.cfg.precision):
                total, parts = objective(blurred, sharp)
        else:
            with autocast(self.device, self.cfg.precision):
                output = self.train_model(blurred)
            total, parts = self.loss_fn(output.float(), sharp)
        self.optimizer.zero_grad(set_to_none=True)
        detail = nonfinite_loss(total, parts, self.dist)   # the same answer on every rank
        if detail is not None:
            if self.cfg.on_nonfinite == "stop":
                raise TrainingError(f"step {self.step}: loss is not finite ({detail}); stopping without saving. "
                                    "Lower train.lr, check the data, or set train.on_nonfinite: skip")
            self.skipped_steps += 1
            return None
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)     # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)         # no update when the (all-reduced) gradients hold inf/NaN
        self.scaler.update()
        if self.scaler.get_scale() < scale:      # the scaler backed off: it skipped this update
            self.skipped_steps += 1
            return None
        return {"loss": float(total.detach()), "grad_norm": float(grad_norm),
                **{f"loss_{k}": float(v) for k, v in parts.items()}}

    @torch.inference_mode()
    def validate(self, log_images: bool) -> dict[str, float]:
        """Mean PSNR/SSIM over ``val_records``; under DDP each rank scores ``val_records[rank::world]``.

        The per-image scores are gathered back into record order (one all-reduce) and averaged
        on every rank, so the result is bit-identical to one process scoring all records.
        """
        rank, world = self.dist.rank, self.dist.world_size
        eval_model = copy.deepcopy(self.model).float().eval()
        configure_inference(eval_model, self.params.model, self.cfg.patch_size)
        scores = torch.zeros(len(self.val_records), 3, dtype=torch.float64)   # out psnr, out ssim, input psnr
        for shown, i in enumerate(range(rank, len(self.val_records), world)):
            rec = self.val_records[i]
            blurred, sharp = read_rgb(rec.blur_path), read_rgb(rec.clear_path)
            x = to_tensor(blurred).unsqueeze(0).to(self.device)
            with autocast(self.device, self.cfg.precision):
                y = eval_model(x)
            restored = to_uint8(y[0].float())
            scores[i] = torch.tensor([psnr(restored, sharp), ssim(restored, sharp), psnr(blurred, sharp)],
                                     dtype=torch.float64)
            if log_images and self.dist.is_main and shown < 2:
                tracking.log_image(viz.triptych(blurred, restored, sharp), f"val/step_{self.step:06d}_{i}.png")
        scores = gather_rows(scores, self.dist, self.device)   # each record's row comes from one rank
        out_psnr, out_ssim, in_psnr = (scores[:, k].tolist() for k in range(3))
        return {"val_psnr": float(np.mean(out_psnr)), "val_ssim": float(np.mean(out_ssim)),
                "val_input_psnr": float(np.mean(in_psnr))}

    def _after_validation(self, metrics: dict[str, float]) -> bool:
        """Track the best model; returns True when early stopping triggers."""
        improved = metrics["val_psnr"] > self.best_psnr
        if improved:
            self.best_psnr, self.best_step, self.bad_validations = metrics["val_psnr"], self.step, 0
        else:
            self.bad_validations += 1
        self.save(best=improved)
        patience = self.cfg.early_stop_patience
        return patience > 0 and self.bad_validations >= patience

    def fit(self) -> TrainResult:
        main = self.dist.is_main
        if main:
            tracking.log_metrics({"parameters": count_parameters(self.model),
                                  "trainable_parameters": count_parameters(self.model, trainable_only=True)})
        bar = progress(total=self.cfg.max_steps, initial=self.step, desc="train", unit="step", disable=not main)
        interrupt: dict = {}
        try:
            with signals_request_stop(interrupt):
                stopped_early = self._loop(bar, interrupt)
        finally:
            bar.close()
        self.finished = True
        self.save(best=False)   # marks last.pt finished: a later run with the same inputs starts fresh
        return self._result(stopped_early)

    def _loop(self, bar, interrupt: dict) -> bool:
        """Steps until max_steps, early stopping (returns True) or a signal (raises)."""
        main = self.dist.is_main
        window_start, window_patches = time.perf_counter(), 0
        for blurred, sharp in self._loader():
            logged = self.train_step(blurred, sharp)
            self.scheduler.step()
            self.step += 1
            bar.update(1)
            window_patches += blurred.shape[0] * self.dist.world_size
            if logged is not None:
                bar.set_postfix(loss=f"{logged['loss']:.4f}", refresh=False)
            if main and logged is not None and (self.step % self.cfg.log_every == 0 or self.step == 1):
                elapsed = time.perf_counter() - window_start
                logged.update(lr=self.scheduler.get_last_lr()[0], patches_per_s=window_patches / max(elapsed, 1e-9),
                              skipped_steps=self.skipped_steps, cpu_hours=self.cpu_seconds() / 3600)
                tracking.log_metrics(logged, step=self.step)
                self.history.append({"step": self.step,
                                     **{k: logged[k] for k in ("loss", "lr", "grad_norm", "cpu_hours")}})
                window_start, window_patches = time.perf_counter(), 0
            at_end = self.step >= self.cfg.max_steps
            if self.step % self.cfg.val_every == 0 or at_end:
                metrics = self.validate(log_images=True)     # every rank: sharded, same result on each
                if main:
                    tracking.log_metrics(metrics, step=self.step)
                    self.history.append({"step": self.step, **metrics, "cpu_hours": self.cpu_seconds() / 3600})
                    bar.write(f"[train] step {self.step}: val PSNR {metrics['val_psnr']:.2f} dB "
                              f"(blurred input {metrics['val_input_psnr']:.2f} dB)")
                stop = self._after_validation(metrics)       # saves on rank 0 only
                if broadcast_flag(stop, self.dist, self.device):
                    if main:
                        bar.write(f"[train] early stop at step {self.step}: no improvement in "
                                  f"{self.cfg.early_stop_patience} validations")
                    return True
            # under DDP the flag is shared every log_every steps, not every step (a collective syncs the GPU)
            check_signal = self.dist.world_size == 1 or self.step % self.cfg.log_every == 0
            if not at_end and check_signal and broadcast_flag("signal" in interrupt, self.dist, self.device):
                self.save(best=False)
                raise TrainingInterrupted(
                    f"stopped by {interrupt.get('signal', 'a signal on rank 0')} at step {self.step} of "
                    f"{self.cfg.max_steps}; {self.last_path} saved: run the same command to resume")
        return False

    def _result(self, stopped_early: bool) -> TrainResult:
        return TrainResult(best_psnr=self.best_psnr, best_step=self.best_step, last_step=self.step,
                           stopped_early=stopped_early, run_id=tracking.active_run_id() if self.dist.is_main else None,
                           history=self.history)
