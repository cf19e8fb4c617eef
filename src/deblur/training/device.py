"""Where and how a training process computes: seeds, deterministic kernels, the device, mixed
precision (autocast and fp16 loss scaling), and signals turned into a stop request."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from deblur.training.errors import TrainingError


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


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def autocast(device: torch.device, precision: str):
    """``train.precision`` on CUDA (bf16 or fp16 autocast); fp32, and always on CPU, runs in float32."""
    if device.type != "cuda" or precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (bf16 and fp32 keep float32's range and need none)."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and precision == "fp16")


@contextmanager
def signals_request_stop(flag: dict) -> Iterator[None]:
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
