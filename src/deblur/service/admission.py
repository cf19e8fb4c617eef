"""Who runs, when: inference slots and a bounded queue, the speed check behind ``image_too_slow``
(with the extra cost of the kernel-aware modes, ``ModeCosts``), per-request cancel flags and
deadlines, the SIGTERM drain, and the memory budget."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from deblur.core.config import ServingConfig
from deblur.service.errors import ApiError
from deblur.inference.cost_model import Line, RobustLine, SpeedModel, TilePlan

# Working memory of one image per pixel: decoded RGB, the float32 output buffer, the uint8
# result and the encoder's copy. Measured with a small model on this machine: 12.7-14.1 B/px
# peak RSS growth for 9.4-16.8 MP PNG and JPEG (decode, tiled inference, encode); tile
# batches add a constant.
BYTES_PER_PIXEL = 16
# Kernel-aware modes hold far more: the deconvolution's float planes and FFTs over the image padded
# by a kernel side per border (deblur.psf.deconvolve), and in thorough mode the estimator's crops
# too. Peak RSS growth measured here per padded pixel, (width + 2 side) x (height + 2 side):
# thorough (side = kernel_aware.max_kernel_size, 61) 331 B at 640x480 and 348 B at 1280x720;
# non-blind deconvolution with a 31 px PSF 223 B at 1280x720. Rounded up, on top of BYTES_PER_PIXEL.
MODE_BYTES_PER_PADDED_PIXEL = {"thorough": 384, "psf": 256}
# What a kernel-aware request costs beyond a fast one (seconds = fixed + per_pixel * image pixels):
# thorough (blind estimate + deconvolution, or the network at a coarse scale) took 1.9 s at 256x256,
# 5.7 s at 640x480 and 13.6 s at 1280x720 on this project's shared 2-core machine; non-blind
# deconvolution 0.26 s and 4.4 s. Each worker refits these lines on its own requests (ModeCosts).
MODE_PRIORS = {"thorough": Line(1.0, 1.5e-5), "psf": Line(0.1, 5e-6)}


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

    async def run(self, fn: Callable, *args, stop_waiting: asyncio.Event | None = None):
        """``fn(*args)`` on an inference thread, once one is free. When ``stop_waiting`` is set while it
        still waits for a thread, it is taken out of the queue and ``NotStarted`` is raised at once; once
        started it runs on (``fn`` stops itself, see ``RequestControl``)."""
        future = self._executor.submit(functools.partial(fn, *args))
        result = asyncio.wrap_future(future)
        if stop_waiting is None:
            return await result
        stop = asyncio.ensure_future(stop_waiting.wait())
        try:
            await asyncio.wait((result, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not result.done() and future.cancel():   # still queued: it will never run
            raise NotStarted()
        return await result

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class NotStarted(Exception):
    """A queued request was taken out of the inference queue before it started (``InferenceGate.run``)."""


class Shutdown:
    """SIGTERM seen: stop admitting, answer queued work at once, give running work ``grace`` seconds, then stop it."""

    def __init__(self, grace_seconds: float) -> None:
        self.grace = grace_seconds
        self.since: float | None = None
        self._began = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def begin(self) -> None:
        """From the SIGTERM handler (or the server's shutdown): wakes every request waiting in the queue."""
        if self.since is None:
            self.since = time.monotonic()
        loop, began = self._loop, self._began
        if loop is not None and not began.is_set():
            try:
                loop.call_soon_threadsafe(began.set)
            except RuntimeError:   # the loop is closed: nobody waits any more
                pass

    def began(self) -> asyncio.Event:
        """An event of the running loop, set once ``begin()`` has been called (call it on that loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:    # a new loop (an app served again, e.g. by another test client)
            self._loop, self._began = loop, asyncio.Event()
        if self.since is not None:
            self._began.set()
        return self._began

    @property
    def draining(self) -> bool:
        return self.since is not None

    def past_grace(self) -> bool:
        return self.since is not None and time.monotonic() - self.since > self.grace


class RequestCancelled(Exception):
    """The client of a request went away: its work stops (the route answers 499, which nobody reads)."""


class RequestControl:
    """One admitted request's cancel flag, deadline and speed feedback; the inference thread calls
    ``start()`` before decoding and ``on_batch`` after every tile batch, and either raises to stop."""

    def __init__(self, serving: ServingConfig, started: float, estimate: float, speed: SpeedModel,
                 shutdown: Shutdown) -> None:
        self.serving, self.started, self.estimate = serving, started, estimate
        self.deadline = started + serving.max_request_seconds
        self.speed, self.shutdown = speed, shutdown
        self.cancelled: str | None = None
        self.batch_seconds = 0.0

    def cancel(self, reason: str) -> None:
        self.cancelled = self.cancelled or reason

    def check(self) -> None:
        if self.cancelled:
            raise RequestCancelled(self.cancelled)
        if self.shutdown.past_grace():
            raise ApiError(503, "shutting_down", f"the worker is shutting down and stopped this request after "
                           f"the {self.shutdown.grace:g} s grace (serving.shutdown_grace_seconds); retry",
                           headers={"Retry-After": "1"})
        elapsed = time.monotonic() - self.started
        if elapsed > self.serving.max_request_seconds:
            raise ApiError(503, "deadline_exceeded", f"stopped after {elapsed:.1f} s, over the "
                           f"{self.serving.max_request_seconds:g} s limit (serving.max_request_seconds; it was "
                           f"estimated at {self.estimate:.1f} s; the estimate has learned from it): retry, or "
                           "send a smaller image", headers={"Retry-After": "1"})

    def start(self) -> None:
        """Before decoding: stop if cancelled, draining, or unable to finish in the time left after queueing."""
        if self.cancelled:
            raise RequestCancelled(self.cancelled)
        if self.shutdown.draining:
            raise shutting_down()
        self.check()
        left = self.deadline - time.monotonic()
        if self.estimate > left:
            waited = time.monotonic() - self.started
            raise ApiError(503, "deadline_exceeded", f"after {waited:.1f} s in the queue this image (about "
                           f"{self.estimate:.1f} s) cannot finish within serving.max_request_seconds "
                           f"({self.serving.max_request_seconds:g} s); retry", headers={"Retry-After": "5"})

    def on_batch(self, tiles: int, tile_pixels: int, seconds: float) -> None:
        self.speed.observe_batch(tiles, tile_pixels, seconds)
        self.batch_seconds += seconds
        self.check()


def shutting_down() -> ApiError:
    return ApiError(503, "shutting_down", "the worker is shutting down (SIGTERM) and admits no new requests; "
                    "retry: another worker will answer", headers={"Retry-After": "1"})


class ModeCosts:
    """The seconds a ``thorough`` or ``psf`` (non-blind) request spends beyond what a fast one would, one
    ``RobustLine`` per mode over the image's pixels (prior ``MODE_PRIORS``), fitted on this worker's own
    requests of that mode. Kept apart from the ``SpeedModel``: a kernel-aware request teaches its tile
    batches to the batch line (they are ordinary network batches) and the rest to its mode's line, never
    to the request line, so fast-mode estimates are not moved by deconvolution time."""

    def __init__(self, priors: dict[str, Line] | None = None) -> None:
        self._lock = threading.Lock()
        self.lines = {mode: RobustLine(prior, anchor_x=1280 * 720) for mode, prior in (priors or MODE_PRIORS).items()}

    def extra(self, mode: str, pixels: int) -> float:
        line = self.lines.get(mode)
        return 0.0 if line is None else line.line.at(pixels)

    def observe(self, mode: str, pixels: int, seconds: float) -> None:
        with self._lock:
            self.lines[mode].observe(pixels, seconds)

    def report(self) -> dict:
        return {mode: {"fixed": line.line.fixed, "per_megapixel": line.line.per_pixel * 1e6,
                       "seconds_720p": line.line.at(1280 * 720), "observations": line.observations}
                for mode, line in self.lines.items()}


def expected_seconds(speed: SpeedModel, costs: ModeCosts | None, mode: str, plan: TilePlan) -> float:
    """Estimated seconds of one request: fast = tile batches + request line; thorough adds its mode line (the
    network at full scale is counted: an upper bound, the choice may be a coarse scale or the deconvolution);
    psf (non-blind deconvolution, no network) = request line + its mode line."""
    if costs is None or mode == "fast":
        return speed.seconds_for(plan)
    if mode == "psf":
        return speed.request.line.at(plan.image_pixels) + costs.extra(mode, plan.image_pixels)
    return speed.seconds_for(plan) + costs.extra(mode, plan.image_pixels)


def check_expected_time(speed: SpeedModel, width: int, height: int, serving: ServingConfig,
                        plan_for: Callable[[int, int], TilePlan], mode: str = "fast",
                        costs: ModeCosts | None = None) -> float:
    """The estimated seconds of a ``width`` x ``height`` image in ``mode``; 413 ``image_too_slow`` over the limit."""
    def seconds(w: int, h: int) -> float:
        return expected_seconds(speed, costs, mode, plan_for(w, h))

    expected = seconds(width, height)
    if expected > serving.max_request_seconds:
        fit_w, fit_h = largest_that_fits(seconds, width, height, serving.max_request_seconds)
        how = "" if mode == "fast" else (" in mode=thorough (mode=fast is quicker)" if mode == "thorough"
                                         else " with a psf part (non-blind deconvolution)")
        raise ApiError(413, "image_too_slow", f"this {width}x{height} ({width * height / 1e6:.1f} MP) image would "
                       f"take about {expected:.0f} s on this server{how}, over the {serving.max_request_seconds:g} s "
                       f"limit (serving.max_request_seconds): downscale it to at most {fit_w}x{fit_h} "
                       f"({fit_w * fit_h / 1e6:.2f} MP)")
    return expected


def largest_that_fits(seconds: Callable[[int, int], float], width: int, height: int, limit: float) -> tuple[int, int]:
    """The largest ``width`` x ``height`` downscale (same aspect) whose ``seconds(w, h)`` is at most ``limit``."""
    low, high = 0.0, 1.0
    for _ in range(30):
        mid = (low + high) / 2
        if seconds(max(1, int(width * mid)), max(1, int(height * mid))) <= limit:
            low = mid
        else:
            high = mid
    return max(1, int(width * low)), max(1, int(height * low))


def working_bytes(mode: str, width: int, height: int, kernel_side: int = 0) -> int:
    """Memory held for decoding and restoring a ``width`` x ``height`` image in ``mode`` (``kernel_side``: the
    largest PSF side of a kernel-aware mode, which pads the deconvolution's planes on every border)."""
    held = width * height * BYTES_PER_PIXEL
    if mode in MODE_BYTES_PER_PADDED_PIXEL:
        held += (width + 2 * kernel_side) * (height + 2 * kernel_side) * MODE_BYTES_PER_PADDED_PIXEL[mode]
    return held


class MemoryBudget:
    """Bytes held for requests across the worker (``serving.max_buffered_mb``): bodies being read, decoded pixels.

    A body holds the bytes that have arrived, never what its ``Content-Length`` promises: a client that
    sends headers and nothing more holds nothing (``receiving`` counts such requests, for /api/health).
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = int(limit_bytes)
        self.used = 0
        self.receiving = 0       # requests whose body is being read now
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def receiving_body(self):
        with self._lock:
            self.receiving += 1
        try:
            yield
        finally:
            with self._lock:
                self.receiving -= 1

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
    """One request's share of a ``MemoryBudget``: ``cover(n)`` grows it to ``n`` bytes in all, ``close()`` frees it."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget, self.held = budget, 0

    def cover(self, nbytes: int, what: str = "request bodies", never_fits: ApiError | None = None) -> None:
        """Hold at least ``nbytes`` in all; 503 ``busy`` when the budget has no room now, 413 (``never_fits``,
        else ``payload_too_large``) when ``nbytes`` is over the whole budget."""
        extra = int(nbytes) - self.held
        if extra <= 0:
            return
        self._never_fits(nbytes, what, never_fits)
        if not self.budget.try_take(extra):
            raise self._busy(what)
        self.held += extra

    def check_room(self, nbytes: int, what: str = "request bodies") -> None:
        """Refuse now (503 ``busy``, or 413 over the whole budget) a body of ``nbytes`` that could not be held
        if it arrived at once; holds nothing: the bytes are covered as they arrive (``cover``)."""
        self._never_fits(nbytes, what, None)
        if self.budget.used + max(int(nbytes) - self.held, 0) > self.budget.limit:
            raise self._busy(what)

    def _never_fits(self, nbytes: int, what: str, never_fits: ApiError | None) -> None:
        if nbytes > self.budget.limit:
            raise never_fits or ApiError(413, "payload_too_large", f"{what}: {nbytes / 2**20:.1f} MB can never fit "
                                         f"the {self.budget.limit / 2**20:g} MB budget of serving.max_buffered_mb; "
                                         "send a smaller file")

    def _busy(self, what: str) -> ApiError:
        return ApiError(503, "busy", f"the server holds too much data now ({what}: the "
                        f"{self.budget.limit / 2**20:g} MB budget of serving.max_buffered_mb is in use); retry in a "
                        "few seconds", headers={"Retry-After": "5"})

    def close(self) -> None:
        if self.held:
            self.budget.give_back(self.held)
            self.held = 0

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
