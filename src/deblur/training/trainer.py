"""The training loop: AdamW + cosine schedule, validation, checkpoints, resume, DDP.

One step = one optimiser update on ``batch_size`` patches per rank. Checkpoints:
``last.pt`` (everything needed to resume) and ``best.pt`` (best validation PSNR), both
written atomically and only from finite weights. ``torchrun`` starts several ranks
(DistributedDataParallel, gloo on CPU, nccl on CUDA); only rank 0 logs and saves.
Under DDP every decision that gates a collective is taken together: the ranks agree on a
non-finite loss before ``backward`` (one all-reduce), validation is sharded over the ranks
and reduced, and fp16's GradScaler skips on gradients that are already all-reduced.
SIGTERM or Ctrl-C (a scheduler's time limit, ``timeout``) ends the current step, writes
``last.pt`` and raises ``TrainingInterrupted``: the same command then resumes there.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from deblur.tracking import runs as tracking
from deblur.core import viz
from deblur.models.checkpoint_file import check_architecture, load_checkpoint, save_atomic
from deblur.models.build import fitting_checkpoints
from deblur.core.config import Params
from deblur.data.datasets import OnTheFlyPatches, PairPatches, StepSampler, to_tensor, to_uint8
from deblur.data.pairs import read_pairs
from deblur.core.errors import DeblurError
from deblur.core.imageio import read_rgb
from deblur.training.losses import CompositeLoss
from deblur.evaluation.metrics import psnr, ssim
from deblur.models.build import build_model, configure_inference, count_parameters
from deblur.models.common import load_grown
from deblur.core.progress import progress
from deblur.core.reproducible import pin_threads
from deblur.core.stage_spec import RESUME_NEUTRAL_TRAIN_KEYS, STAGES, code_digests, params_subset

class TrainingError(DeblurError, RuntimeError):
    """Training cannot go on (non-finite loss, bad init checkpoint, no data)."""


class TrainingInterrupted(TrainingError):
    """A signal stopped training; ``last.pt`` holds the step it reached."""


@contextmanager
def _signals_request_stop(flag: dict) -> Iterator[None]:
    """While inside, SIGTERM/SIGINT set ``flag["signal"]`` instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def request_stop(signum, _frame) -> None:
        flag["signal"] = signal.Signals(signum).name

    for sig in previous:
        signal.signal(sig, request_stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainResult:
    best_psnr: float
    best_step: int
    last_step: int
    stopped_early: bool
    run_id: str | None
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    """``train.deterministic``: deterministic kernels (cuDNN, CUDA) at some speed, or the fastest ones."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS; read at its first use
    # warn_only: an op with no deterministic kernel warns instead of stopping the run
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def train_data_hash(pairs_dir: Path) -> str:
    """Digest of every file of the train and val splits (the pairs the run learns and validates on)."""
    files = sorted(p for split in ("train", "val") for p in (Path(pairs_dir) / split).rglob("*") if p.is_file())
    return tracking.files_digest(files)


def resume_key(params: Params, pairs_dir: Path) -> dict:
    """What a training run's result depends on: the params it reads, its data, its code."""
    relevant = params_subset(params.model_dump(mode="json", by_alias=True), STAGES["train"].params)
    relevant["train"] = {k: v for k, v in relevant["train"].items() if k not in RESUME_NEUTRAL_TRAIN_KEYS}
    return {"params": relevant, "data": train_data_hash(pairs_dir), "code": code_digests("train")}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Params added after runs were saved, with the value that matches what the code did before they
# existed: a resume key without them reads as if it held these (a multi-day run survives the update).
PARAMS_ADDED_SINCE = {"model.nafnet.padding": "reflect", "train.deterministic": False, "train.cpu_threads": 0,
                      "train.lora.rank": 0, "train.lora.alpha": 4.0, "train.lora.dropout": 0.0,
                      "train.lora.target_modules": ["conv1", "conv3", "conv4", "conv5", "sca.proj"],
                      "synthesize.noise.sigma_min": 0.02, "synthesize.noise.sigma_max": 0.1}


def _selected_model_only(flat: dict) -> dict:
    """``flat`` without the sections of architectures ``model.name`` does not select (they change nothing)."""
    name = flat.get("model.name")
    return {k: v for k, v in flat.items()
            if not (k.startswith("model.") and k.count(".") >= 2 and not k.startswith(f"model.{name}."))}


def resume_mismatch(saved: dict | None, current: dict) -> list[str]:
    """Why a checkpoint with resume key ``saved`` is not a run of ``current``; empty when it is."""
    if not saved:
        return ["it has no resume key (written by an older version)"]
    def changed(old: dict, new: dict, what: str, shown: int) -> list[str]:
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        return [f"{what} changed: " + ", ".join(keys[:shown]) + (" ..." if len(keys) > shown else "")] if keys else []

    old_params = _selected_model_only(_flatten(saved.get("params", {})))
    new_params = _selected_model_only(_flatten(current["params"]))
    for key, legacy in PARAMS_ADDED_SINCE.items():
        if key in new_params and key not in old_params:
            old_params[key] = legacy
    reasons = changed(old_params, new_params, "params", 6)
    if saved.get("data") != current["data"]:
        reasons.append("the training data changed")
    return reasons + changed(saved.get("code", {}), current["code"], "code", 4)


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


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
            from deblur.models.lora import LoraSettings, attach_adapter

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
        if self.dist.world_size > 1:
            if hasattr(self.model, "training_loss"):   # its objective bypasses DDP's forward: no gradient sync
                raise TrainingError(f"model.{params.model.name} trains through its own training_loss, which "
                                    "multi-process (DDP) training does not synchronise yet: run it in one process")
            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)

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
            from deblur.models.lora import BaseModelRef

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
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(self.cfg.init_from)
            if self.cfg.init_from.startswith("models:/"):
                from deblur.models.lora import LoraError  # peft: only for LoRA and models:/ bases
                from deblur.tracking.registry_io import resolve_base

                try:
                    path, self.base_ref = resolve_base(self.cfg.init_from, tmp)
                except (LoraError, FileNotFoundError) as err:
                    raise TrainingError(str(err)) from err
            elif self.lora:
                from deblur.models.lora import BaseModelRef

                self.base_ref = BaseModelRef(source=self.cfg.init_from)
            self._load_init_weights(path)

    def _load_init_weights(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
        name = self.params.model.name
        try:
            check_architecture(ckpt["model_config"], self.params.model)   # names both sides when they differ
            grown = load_grown(self.model, state)
        except RuntimeError as err:
            fits = fitting_checkpoints(self.params.model, path.parent)
            hint = (f"{', '.join(str(p) for p in fits)} fits model.{name} as configured: set train.init_from to it"
                    if fits else f"no checkpoint in {path.parent} fits model.{name} as configured")
            raise TrainingError(f"train.init_from {path}: weights do not fit the model in params "
                                f"({str(err).splitlines()[0][:200]}). {hint}, or set train.init_from: null "
                                "to train from random weights") from err
        extra = f" ({len(grown)} new blocks start as identities: {', '.join(grown)})" if grown else ""
        self._say(f"[train] initialised weights from {path}{extra}")

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
    def _autocast(self):
        if self.device.type != "cuda" or self.cfg.precision == "fp32":
            return torch.autocast(device_type=self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 autocast (bf16 and fp32 keep float32's range and need none)."""
        return torch.amp.GradScaler(self.device.type,
                                    enabled=self.device.type == "cuda" and self.cfg.precision == "fp16")

    def _nonfinite_loss(self, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> str | None:
        """What was not finite in this step's loss on any rank, or None; the same answer on every rank.

        Taken before ``backward``: under DDP a rank that skipped backward (or raised) while the
        others ran it would leave them waiting in the gradient all-reduce. One all-reduce (SUM) of a
        table with a row per rank, each rank filling its own, shows every rank all the losses.
        """
        row = torch.stack([total.detach().float(), *(v.detach().float().to(total.device) for v in parts.values())])
        table = row.unsqueeze(0)
        if self.dist.world_size > 1:
            table = torch.zeros(self.dist.world_size, row.numel(), device=row.device)
            table[self.dist.rank] = row          # x + 0 is exact: the sum copies each rank's row unchanged
            dist.all_reduce(table)
        bad = [rank for rank, ok in enumerate(torch.isfinite(table[:, 0]).tolist()) if not ok]
        if not bad:
            return None
        names = list(parts)
        details = [", ".join(f"{name}={float(value):.4g}" for name, value in zip(names, table[rank, 1:].tolist()))
                   for rank in bad]
        if self.dist.world_size == 1:
            return details[0]
        return "; ".join(f"rank {rank} of {self.dist.world_size}: {d}" for rank, d in zip(bad, details))

    def train_step(self, blurred: torch.Tensor, sharp: torch.Tensor) -> dict[str, float] | None:
        """One optimiser update; returns logged values, or None when a non-finite step was skipped."""
        self.train_model.train()
        fmt = torch.channels_last if (self.device.type == "cuda" and self.cfg.channels_last) else torch.contiguous_format
        blurred = blurred.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        sharp = sharp.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        objective = getattr(self.model, "training_loss", None)
        if objective is not None:   # a model with its own objective (diffusion: noise/velocity prediction)
            with self._autocast():
                total, parts = objective(blurred, sharp)
        else:
            with self._autocast():
                output = self.train_model(blurred)
            total, parts = self.loss_fn(output.float(), sharp)
        self.optimizer.zero_grad(set_to_none=True)
        detail = self._nonfinite_loss(total, parts)
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
            with self._autocast():
                y = eval_model(x)
            restored = to_uint8(y[0].float())
            scores[i] = torch.tensor([psnr(restored, sharp), ssim(restored, sharp), psnr(blurred, sharp)],
                                     dtype=torch.float64)
            if log_images and self.dist.is_main and shown < 2:
                tracking.log_image(viz.triptych(blurred, restored, sharp), f"val/step_{self.step:06d}_{i}.png")
        if world > 1:
            # each record's row is filled by one rank and zero elsewhere: the sum is exact
            scores = scores.to(self.device)
            dist.all_reduce(scores)
            scores = scores.cpu()
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
            with _signals_request_stop(interrupt):
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
                if self._broadcast_flag(stop):
                    if main:
                        bar.write(f"[train] early stop at step {self.step}: no improvement in "
                                  f"{self.cfg.early_stop_patience} validations")
                    return True
            # under DDP the flag is shared every log_every steps, not every step (a collective syncs the GPU)
            check_signal = self.dist.world_size == 1 or self.step % self.cfg.log_every == 0
            if not at_end and check_signal and self._broadcast_flag("signal" in interrupt):
                self.save(best=False)
                raise TrainingInterrupted(
                    f"stopped by {interrupt.get('signal', 'a signal on rank 0')} at step {self.step} of "
                    f"{self.cfg.max_steps}; {self.last_path} saved: run the same command to resume")
        return False

    def _broadcast_flag(self, flag: bool) -> bool:
        if self.dist.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(t, src=0)
        return bool(t.item())

    def _result(self, stopped_early: bool) -> TrainResult:
        return TrainResult(best_psnr=self.best_psnr, best_step=self.best_step, last_step=self.step,
                           stopped_early=stopped_early, run_id=tracking.active_run_id() if self.dist.is_main else None,
                           history=self.history)


def write_curve(history: list[dict], path: Path) -> None:
    """Training curve as CSV for ``dvc plots`` (one row per logged step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["step", "loss", "lr", "grad_norm", "val_psnr", "val_input_psnr", "val_ssim", "cpu_hours"]
    rows: dict[int, dict] = {}
    for entry in history:
        rows.setdefault(entry["step"], {"step": entry["step"]}).update(entry)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for step in sorted(rows):
            writer.writerow(rows[step])


def curve_figure(history: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_psnr"], h["val_input_psnr"]) for h in history if "val_psnr" in h]
    if loss:
        ax_loss.plot(*zip(*loss))
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    if val:
        steps, out, inp = zip(*val)
        ax_psnr.plot(steps, out, marker="o", label="model")
        ax_psnr.plot(steps, inp, linestyle="--", label="blurred input")
        ax_psnr.legend()
    ax_psnr.set(xlabel="step", ylabel="PSNR (dB)", title="validation PSNR")
    fig.tight_layout()
    return fig
