"""Who runs, when: inference slots and a bounded queue, and the speed check behind ``image_too_slow``."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from deblur.config import ServingConfig
from deblur.service.errors import ApiError


class InferenceGate:
    """Admits at most ``slots + max_waiting`` requests; runs them on ``slots`` dedicated threads.

    Always the same threads, so glibc reuses their memory arenas instead of growing one per
    request thread.
    """

    def __init__(self, slots: int, max_waiting: int) -> None:
        self.capacity = slots + max_waiting
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="deblur-inference")
        self._lock = threading.Lock()
        self.admitted = 0

    def admit(self) -> bool:
        with self._lock:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.admitted -= 1

    async def run(self, fn: Callable, *args):
        """``fn(*args)`` on an inference thread, once one is free."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class SpeedEstimate:
    """Seconds per megapixel of this worker's inferences (exponential average; None before the first)."""

    def __init__(self, smoothing: float = 0.3) -> None:
        self.smoothing = smoothing
        self.seconds_per_mp: float | None = None
        self._lock = threading.Lock()

    def update(self, pixels: int, seconds: float) -> None:
        rate = seconds / max(pixels / 1e6, 1e-6)
        with self._lock:
            old = self.seconds_per_mp
            self.seconds_per_mp = rate if old is None else (1 - self.smoothing) * old + self.smoothing * rate

    def seconds_for(self, pixels: int) -> float | None:
        rate = self.seconds_per_mp
        return None if rate is None else rate * pixels / 1e6


def check_expected_time(speed: SpeedEstimate, pixels: int, serving: ServingConfig) -> None:
    expected = speed.seconds_for(pixels)
    if expected is not None and expected > serving.max_request_seconds:
        largest = serving.max_request_seconds / speed.seconds_per_mp
        raise ApiError(413, "image_too_slow", f"this {pixels / 1e6:.1f} MP image would take about {expected:.0f} s "
                       f"on this server, over the {serving.max_request_seconds:g} s limit "
                       f"(serving.max_request_seconds): downscale it to at most {largest:.1f} MP")


class MemoryBudget:
    """Bytes held for requests across the worker (``serving.max_buffered_mb``): bodies being read, decoded pixels."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = int(limit_bytes)
        self.used = 0
        self._lock = threading.Lock()

    def try_take(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            return True

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes

    def reservation(self) -> "Reservation":
        return Reservation(self)


class Reservation:
    """One request's share of a ``MemoryBudget``; ``cover(n)`` grows it to at least ``n`` bytes, ``close()`` frees it."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget, self.held = budget, 0

    def cover(self, nbytes: int, what: str = "request bodies") -> None:
        """Hold at least ``nbytes`` in all; 503 ``busy`` when the budget has no room now."""
        extra = int(nbytes) - self.held
        if extra <= 0:
            return
        if not self.budget.try_take(extra):
            limit_mb = self.budget.limit / 2**20
            raise ApiError(503, "busy", f"the server holds too much data now ({what}: the "
                           f"{limit_mb:g} MB budget of serving.max_buffered_mb is in use); retry in a few seconds",
                           headers={"Retry-After": "5"})
        self.held += extra

    def close(self) -> None:
        if self.held:
            self.budget.give_back(self.held)
            self.held = 0

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
