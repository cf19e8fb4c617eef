"""How long this worker needs for an image: a speed model fitted on tile batches (torch-free).

A request costs the sum of its tile batches plus what happens around them::

    seconds = sum over batches (batch.fixed + batch.per_pixel * pixels in the batch)
              + request.fixed + request.per_pixel * image pixels     (decode, blend, encode)

Each line is fitted by weighted least squares on its own observations: every tile batch
(``deblur.inference.tiling``'s ``on_batch``) for the first, every finished request for the second.
A prior (measured at export and stored in the artifact's ``runtime.json``, else a conservative built-in one)
enters as pseudo-observations, old observations fade, and each observation is clipped to
a factor of the current prediction, so a few tiny or unusual requests cannot move it far.
The tile plan of a request (tile count and padded tile size on the model's grid) comes from the
grid ``deblur.inference.tiling.tiled_inference`` tiles on (``deblur.core.tile_grid.TileGrid``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from deblur.core.tile_grid import TileGrid, round_up

PRIOR_KEY = "speed_prior"   # runtime.json (deblur.artifact.meta): {runtime: SpeedPrior.to_json()}


@dataclass(frozen=True)
class Line:
    """``fixed + per_pixel * pixels`` seconds."""

    fixed: float
    per_pixel: float

    def at(self, pixels: float) -> float:
        return self.fixed + self.per_pixel * pixels


@dataclass(frozen=True)
class SpeedPrior:
    """What a worker assumes before it has measured anything."""

    batch: Line           # one tile batch, by pixels in the batch
    request: Line         # decode + blend + encode, by image pixels
    size_multiple: int    # the model's tile grid
    source: str           # where the numbers come from (shown in /api/health)

    def to_json(self) -> dict:
        return {"batch": asdict(self.batch), "request": asdict(self.request), "size_multiple": self.size_multiple,
                "source": self.source}

    @classmethod
    def from_json(cls, raw: dict, source: str) -> "SpeedPrior":
        return cls(batch=Line(**raw["batch"]), request=Line(**raw["request"]),
                   size_multiple=int(raw["size_multiple"]), source=f"{source} ({raw.get('source', 'measured')})")


# Without a measured prior: about 10 s per megapixel (NAFNet-16 on 2 cores took 8.7 s/MP),
# so a fresh worker refuses a 40 MP image at a 200 s limit instead of running it for minutes.
BUILT_IN_PRIOR = SpeedPrior(batch=Line(0.05, 1.0e-5), request=Line(0.05, 3.0e-7), size_multiple=16,
                            source="built-in conservative prior (the serving artifact has no runtime.json speed_prior)")


def prior_from_meta(meta: dict | None, runtime: str) -> SpeedPrior:
    """The artifact's measured prior for ``runtime`` (``meta``: model.json with runtime.json merged in,
    deblur.artifact.meta.read_artifact_meta), else ``BUILT_IN_PRIOR`` (e.g. a ``dvc pull``, which brings no runtime.json)."""
    try:
        return SpeedPrior.from_json(meta[PRIOR_KEY][runtime], f"runtime.json speed_prior[{runtime}]")
    except (KeyError, TypeError, ValueError):
        return BUILT_IN_PRIOR


@dataclass(frozen=True)
class TilePlan:
    """The tiles ``tiled_inference`` cuts from one image."""

    tiles: int
    tile_pixels: int     # padded tile height x width
    batch_size: int
    image_pixels: int

    def batches(self) -> list[int]:
        """Tiles in each batch."""
        full, rest = divmod(self.tiles, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest else [])


def plan_tiles(width: int, height: int, tile_size: int, overlap: int, batch_size: int, align: int) -> TilePlan:
    """The tile plan of ``tiled_inference`` for one ``width`` x ``height`` image."""
    grid = TileGrid.plan(height, width, tile_size, overlap, align)
    return TilePlan(tiles=grid.count, tile_pixels=grid.tile_h * grid.tile_w, batch_size=batch_size,
                    image_pixels=width * height)


class RobustLine:
    """``y = fixed + per_pixel * x`` by weighted least squares over fading observations, anchored by a prior.

    The prior counts as ``prior_weight`` observations, half at ``x = 0`` and half at
    ``anchor_x``; each real observation starts with weight 1 and fades by ``1 - 1/memory``
    per later one; an observation is clipped to ``[prediction / clip, prediction * clip]``.
    """

    def __init__(self, prior: Line, anchor_x: float, prior_weight: float = 8.0, memory: float = 100.0,
                 clip: float = 4.0) -> None:
        self.prior, self.anchor_x, self.clip = prior, float(anchor_x), clip
        self.decay = 1.0 - 1.0 / memory
        half = prior_weight / 2
        # prior sums: (weight, sum x, sum y, sum x^2, sum x*y)
        self._prior_sums = np.array([prior_weight, half * anchor_x, half * (prior.fixed + prior.at(anchor_x)),
                                     half * anchor_x**2, half * anchor_x * prior.at(anchor_x)])
        self._sums = np.zeros(5)
        self.observations = 0
        self.line = prior

    def observe(self, x: float, y: float) -> None:
        predicted = max(self.line.at(x), 1e-6)
        y = min(max(y, predicted / self.clip), predicted * self.clip)
        self._sums = self._sums * self.decay + np.array([1.0, x, y, x * x, x * y])
        self.observations += 1
        self.line = self._solve()

    def _solve(self) -> Line:
        w, sx, sy, sxx, sxy = self._sums + self._prior_sums
        det = w * sxx - sx * sx
        slope = (w * sxy - sx * sy) / det if det > 0 else self.prior.per_pixel
        slope = max(slope, 0.0)
        fixed = (sy - slope * sx) / w
        if fixed < 0:   # a line through the origin instead
            fixed, slope = 0.0, sxy / sxx if sxx > 0 else self.prior.per_pixel
        return Line(fixed=fixed, per_pixel=slope)


class SpeedModel:
    """One worker's speed: tile batches and per-request work, each a ``RobustLine`` (thread-safe)."""

    def __init__(self, prior: SpeedPrior, anchor_tile: int = 288) -> None:
        self.prior = prior
        self._lock = threading.Lock()
        self.batch = RobustLine(prior.batch, anchor_x=anchor_tile**2)
        self.request = RobustLine(prior.request, anchor_x=1280 * 720)

    def observe_batch(self, tiles: int, tile_pixels: int, seconds: float) -> None:
        with self._lock:
            self.batch.observe(tiles * tile_pixels, seconds)

    def observe_request(self, image_pixels: int, seconds: float) -> None:
        """Seconds a request spent outside its tile batches (decode, blend, encode)."""
        with self._lock:
            self.request.observe(image_pixels, seconds)

    def seconds_for(self, plan: TilePlan) -> float:
        batch, request = self.batch.line, self.request.line
        return sum(batch.at(n * plan.tile_pixels) for n in plan.batches()) + request.at(plan.image_pixels)

    def largest_that_fits(self, width: int, height: int, seconds: float,
                          plan_for: Callable[[int, int], TilePlan]) -> tuple[int, int]:
        """The largest ``width`` x ``height`` downscale (same aspect) estimated to take at most ``seconds``."""
        low, high = 0.0, 1.0
        for _ in range(30):
            mid = (low + high) / 2
            w, h = max(1, int(width * mid)), max(1, int(height * mid))
            if self.seconds_for(plan_for(w, h)) <= seconds:
                low = mid
            else:
                high = mid
        return max(1, int(width * low)), max(1, int(height * low))

    def report(self, default_plan: Callable[[int, int], TilePlan]) -> dict:
        """What /api/health shows: the prior's source, the fitted lines, seconds per megapixel at the default tiling."""
        plan = default_plan(1280, 720)
        return {
            "prior_source": self.prior.source,
            "batch_seconds": {"fixed": self.batch.line.fixed, "per_megapixel": self.batch.line.per_pixel * 1e6,
                              "observations": self.batch.observations},
            "request_seconds": {"fixed": self.request.line.fixed,
                                "per_megapixel": self.request.line.per_pixel * 1e6,
                                "observations": self.request.observations},
            "seconds_per_megapixel": self.seconds_for(plan) / (plan.image_pixels / 1e6),
            "size_multiple": self.prior.size_multiple,
        }


def measure_speed_prior(model, tile_size: int, overlap: int, size_multiple: int = 1,
                        encode_decode: Callable[[np.ndarray], None] | None = None) -> SpeedPrior:
    """Time a few tile batches of ``model`` (anything with ``.deblur(rgb, tile_size, overlap, on_batch=...)``)
    on this machine: one image of one full tile and one of a small tile (each after a warm-up
    call of its shape; the small one twice, the faster kept), and ``encode_decode`` of a
    512x512 image for the per-request cost. Slow neighbours on the machine make it slower,
    never faster: the prior errs on the side of refusing."""
    rng = np.random.default_rng(0)
    tile = max(size_multiple, tile_size // size_multiple * size_multiple)
    small = max(size_multiple, round_up(max(tile // 3, 16), size_multiple))

    def timed(side: int) -> tuple[float, float]:
        """(seconds in tile batches, seconds around them) of one ``side`` x ``side`` image."""
        rgb = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        batches: list[float] = []
        started = time.perf_counter()
        model.deblur(rgb, tile_size, overlap, on_batch=lambda tiles, pixels, seconds: batches.append(seconds))
        total = time.perf_counter() - started
        if not batches:
            raise ValueError(f"{type(model).__name__} reported no tile batches: cannot measure its speed")
        return sum(batches), max(total - sum(batches), 0.0)

    timed(small), timed(tile)   # warm-up: the first call of each tile shape is several times slower
    small_batch, _ = min(timed(small) for _ in range(2))
    big_batch, big_around = timed(tile)
    per_pixel = max((big_batch - small_batch) / (tile * tile - small * small), 1e-12)
    fixed = max(small_batch - per_pixel * small * small, 0.0)
    around = big_around / (tile * tile)
    if encode_decode is not None:
        rgb = np.ascontiguousarray(np.tile(rng.integers(0, 256, (64, 512, 3), dtype=np.uint8), (8, 1, 1)))
        started = time.perf_counter()
        encode_decode(rgb)
        around += (time.perf_counter() - started) / (512 * 512)
    return SpeedPrior(batch=Line(fixed, per_pixel), request=Line(0.01, around), size_multiple=size_multiple,
                      source=f"measured at export, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
                             f"tiles {tile}² and {small}²")
