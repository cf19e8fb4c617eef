"""Procedural sharp images: dead leaves with textures and depth of field.

Dead leaves (Matheron; Lee, Mumford & Huang 2001) drop occluding shapes with a scale-invariant
radius law p(r) ~ r^-3, which reproduces the power spectrum and edge statistics of natural
images. Following "VibrantLeaves" (Achddou et al., arXiv 2504.10201) the shapes here also carry
texture (gradients, stripes, grain), take their colours from real photos, and the scene is
built from depth layers composited back to front, some of them out of focus: sharp targets then
contain soft content too, so a deblurring model learns not to sharpen depth of field.

Rendering: each layer is drawn as a map of shape indices at twice the resolution (later shapes
cover earlier ones), coloured per pixel from per-shape parameters, area-downsampled (anti-aliased
edges), blurred with a disk PSF if out of focus, and composited over the layers behind it with
premultiplied alpha, all in linear light.
"""

from __future__ import annotations

import cv2
import numpy as np

from deblur.core import portable_math as pm
from deblur.core.config import DeadLeavesConfig
from deblur.data.blur import disk_kernel

SUPERSAMPLING = 2
COVERAGE = 4.0            # total area of all shapes / image area
MAX_SHAPES = 60_000       # bounds the work when radius_min is tiny
SHAPE_KINDS = ("disk", "rectangle", "polygon")
SHAPE_KIND_WEIGHTS = (0.6, 0.25, 0.15)
MAX_VERTICES = 7
TEXTURES = ("flat", "shading", "stripes", "two_colour")   # shading: towards a darker base colour
TEXTURE_WEIGHTS = (0.3, 0.35, 0.15, 0.2)
DISPLAY_GAMMA = 2.2


def dead_leaves(rng: np.random.Generator, cfg: DeadLeavesConfig, palette: np.ndarray | None = None,
                size: int | None = None) -> np.ndarray:
    """One ``size`` x ``size`` (default ``cfg.size``) uint8 RGB dead-leaves image.

    ``palette``: (N, 3) uint8 sRGB colours to draw from (e.g. ``palette_from_photos``); a
    natural-looking HSV distribution when None.
    """
    side = size or cfg.size
    colours = _to_linear(palette if palette is not None and len(palette) else default_palette(rng))
    shapes = _sample_shapes(rng, side, cfg)
    blur_radii = layer_defocus_radii(rng, cfg, side)
    image = _background(rng, side, colours)
    grain = rng.standard_normal((side * SUPERSAMPLING, side * SUPERSAMPLING)).astype(np.float32)
    outlines = _outlines(shapes)
    tables = _shading_tables(shapes, colours)
    bounds = np.linspace(0, len(shapes["radius"]), cfg.layers + 1).astype(int)
    for layer, radius in enumerate(blur_radii):
        members = np.arange(bounds[layer], bounds[layer + 1])
        if members.size == 0:
            continue
        index_map = _draw_index_map(shapes, outlines, members, side)
        colour, alpha = _render_layer(tables, index_map, grain, side)
        if radius > 0.25:
            psf = disk_kernel(radius)
            colour = cv2.filter2D(colour, -1, psf, borderType=cv2.BORDER_REFLECT)
            alpha = cv2.filter2D(alpha, -1, psf, borderType=cv2.BORDER_REFLECT)
        image = image * (1.0 - alpha[..., None]) + colour
    encoded = pm.power(np.clip(image, 0.0, 1.0), float(np.float32(1.0 / DISPLAY_GAMMA))).astype(np.float32)
    return np.round(encoded * 255.0).astype(np.uint8)


def layer_defocus_radii(rng: np.random.Generator, cfg: DeadLeavesConfig, side: int) -> np.ndarray:
    """Disk radius (pixels) per layer, back to front; 0 for layers in focus.

    About ``soft_fraction`` of the layers (binomial) are out of focus. The in-focus layers form a
    contiguous depth range at a random depth; blur grows with the distance from it, on both sides.
    """
    n_soft = int(rng.binomial(cfg.layers, cfg.soft_fraction))
    n_focus = cfg.layers - n_soft
    first_focus = int(rng.integers(0, n_soft + 1))
    last_focus = first_focus + n_focus - 1
    depth = np.arange(cfg.layers)
    distance = np.maximum.reduce([first_focus - depth, depth - last_focus, np.zeros_like(depth)])
    if distance.max() == 0:
        return np.zeros(cfg.layers)
    strength = cfg.max_defocus * side * rng.uniform(0.5, 1.0)
    return strength * distance / distance.max()


def palette_from_photos(photos: list[np.ndarray], rng: np.random.Generator, count: int = 4096) -> np.ndarray:
    """(count, 3) uint8 colours: half from small regions of the colour ``photos`` (equal share per
    photo, greyscale photos ignored), half from ``default_palette`` for vibrancy."""
    coloured = [p for p in photos if np.ptp(p.astype(np.int16), axis=2).mean() > 2.0]
    if not coloured:
        return default_palette(rng, count)
    per_photo = (count // 2) // len(coloured) + 1
    pixels = []
    for photo in coloured:
        h, w = photo.shape[:2]
        scale = 48.0 / max(h, w)
        small = cv2.resize(photo, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        flat = small.reshape(-1, 3)
        pixels.append(flat[rng.integers(0, len(flat), per_photo)])
    from_photos = np.concatenate(pixels)[: count // 2]
    return np.concatenate([from_photos, default_palette(rng, count - len(from_photos))])


def default_palette(rng: np.random.Generator, count: int = 4096) -> np.ndarray:
    """(count, 3) uint8 colours with mostly moderate saturation and mid-to-high brightness."""
    hsv = np.stack([
        rng.uniform(0, 180, count),
        255 * rng.beta(1.5, 3.0, count),
        255 * rng.beta(3.0, 1.8, count),
    ], axis=1).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def _to_linear(srgb: np.ndarray) -> np.ndarray:
    return pm.power(srgb.astype(np.float32) / 255.0, float(np.float32(DISPLAY_GAMMA))).astype(np.float32)


def _power_law_radii(rng: np.random.Generator, count: int, r_min: float, r_max: float) -> np.ndarray:
    """Inverse-CDF samples of p(r) ~ r^-3 on [r_min, r_max]."""
    u = rng.random(count)
    return 1.0 / np.sqrt(r_min ** -2 - u * (r_min ** -2 - r_max ** -2))


def _sample_shapes(rng: np.random.Generator, side: int, cfg: DeadLeavesConfig) -> dict[str, np.ndarray]:
    """Per-shape parameters in drawing order (back to front), enough to cover the image COVERAGE times."""
    r_min = max(0.5, cfg.radius_min * side)
    r_max = max(r_min, cfg.radius_max * side)
    radii = _power_law_radii(rng, MAX_SHAPES, r_min, r_max)
    count = int(np.searchsorted(np.cumsum(np.pi * radii ** 2), COVERAGE * side * side)) + 1
    radii = radii[:min(count, MAX_SHAPES)]
    n = len(radii)
    return {
        "radius": radii,
        "centre": rng.uniform(-0.05 * side, 1.05 * side, (n, 2)),
        "kind": rng.choice(len(SHAPE_KINDS), n, p=SHAPE_KIND_WEIGHTS),
        "angle": rng.uniform(0, np.pi, n),
        "aspect": rng.uniform(0.3, 1.0, n),
        "vertices": rng.integers(3, MAX_VERTICES + 1, n),
        "vertex_angle": np.sort(rng.uniform(0, 2 * np.pi, (n, MAX_VERTICES)), axis=1),
        "vertex_radius": rng.uniform(0.55, 1.0, (n, MAX_VERTICES)),
        "colour": rng.integers(0, 1 << 30, n),
        "second_colour": rng.integers(0, 1 << 30, n),
        "texture": rng.choice(len(TEXTURES), n, p=TEXTURE_WEIGHTS),
        "shade": rng.uniform(0.25, 1.0, n),
        "frequency": rng.uniform(1.5, 6.0, n),
        "phase": rng.uniform(0, 2 * np.pi, n),
        "grain": rng.uniform(0.0, 0.04, n) * (rng.random(n) < 0.5),
    }


def _outlines(shapes: dict[str, np.ndarray]) -> np.ndarray:
    """(n, MAX_VERTICES, 2) int32 supersampled polygon vertices (rectangles use the first 4)."""
    s = SUPERSAMPLING
    r = shapes["radius"][:, None] * s
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    rect = np.zeros((len(r), MAX_VERTICES, 2))
    rect[:, :4, 0] = corners[:, 0] * r
    rect[:, :4, 1] = corners[:, 1] * r * shapes["aspect"][:, None]
    rho = shapes["vertex_radius"] * r
    poly = np.stack([rho * pm.cos(shapes["vertex_angle"]), rho * pm.sin(shapes["vertex_angle"])], axis=-1)
    is_rect = (shapes["kind"] == SHAPE_KINDS.index("rectangle"))[:, None, None]
    local = np.where(is_rect, rect, poly)
    cos, sin = pm.cos(shapes["angle"])[:, None], pm.sin(shapes["angle"])[:, None]
    x = local[..., 0] * cos - local[..., 1] * sin + shapes["centre"][:, :1] * s
    y = local[..., 0] * sin + local[..., 1] * cos + shapes["centre"][:, 1:] * s
    return np.round(np.stack([x, y], axis=-1)).astype(np.int32)


def _shading_tables(shapes: dict[str, np.ndarray], colours: np.ndarray) -> dict[str, np.ndarray]:
    """float32 per-shape coefficients: u = ux*x + uy*y + u0 runs from -1 to 1 across a shape."""
    s = SUPERSAMPLING
    cos, sin = pm.cos(shapes["angle"]), pm.sin(shapes["angle"])
    r = shapes["radius"] * s
    cx, cy = shapes["centre"][:, 0] * s, shapes["centre"][:, 1] * s
    base = colours[shapes["colour"] % len(colours)]
    shaded = shapes["texture"] == TEXTURES.index("shading")
    second = np.where(shaded[:, None], base * shapes["shade"][:, None],
                      colours[shapes["second_colour"] % len(colours)])
    tables = {"ux": cos / r, "uy": sin / r, "u0": -(cx * cos + cy * sin) / r,
              "stripe_rate": np.pi * shapes["frequency"], "phase": shapes["phase"],
              "base": base, "delta": second - base, "grain": shapes["grain"]}
    tables = {k: v.astype(np.float32) for k, v in tables.items()}
    tables["mode"] = np.select([shapes["texture"] == TEXTURES.index("flat"),
                                shapes["texture"] == TEXTURES.index("stripes")], [0, 2], default=1).astype(np.int8)
    return tables


def _background(rng: np.random.Generator, side: int, colours: np.ndarray) -> np.ndarray:
    """A smooth gradient between two palette colours: what shows where no shape falls."""
    a, b = colours[rng.integers(0, len(colours), 2)]
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) / side
    t = np.clip(0.5 + (xs - 0.5) * pm.cos(angle) + (ys - 0.5) * pm.sin(angle), 0, 1)[..., None]
    return (a * (1 - t) + b * t).astype(np.float32)


def _draw_index_map(shapes: dict[str, np.ndarray], outlines: np.ndarray, members: np.ndarray,
                    side: int) -> np.ndarray:
    """int32 map (supersampled) of the topmost shape index of the layer per pixel, -1 where empty."""
    s = SUPERSAMPLING
    index_map = np.full((side * s, side * s), -1, np.int32)
    radius = shapes["radius"][members] * s
    as_disk = (shapes["kind"][members] == SHAPE_KINDS.index("disk")) | (radius < 3)
    centres = np.round(shapes["centre"][members] * s).astype(int).tolist()
    radii = np.maximum(1, np.round(radius)).astype(int).tolist()
    vertex_counts = np.where(shapes["kind"][members] == SHAPE_KINDS.index("rectangle"), 4,
                             shapes["vertices"][members]).tolist()
    for i, disk, (cx, cy), r, k in zip(members.tolist(), as_disk.tolist(), centres, radii, vertex_counts):
        if disk:
            cv2.circle(index_map, (cx, cy), r, i, -1)
        else:
            cv2.fillPoly(index_map, [outlines[i, :k]], i)
    return index_map


def _render_layer(tables: dict[str, np.ndarray], index_map: np.ndarray, grain: np.ndarray,
                  side: int) -> tuple[np.ndarray, np.ndarray]:
    """Premultiplied linear colour (side x side x 3) and coverage (side x side) of one layer."""
    covered = index_map >= 0
    ys, xs = np.nonzero(covered)
    idx = index_map[ys, xs]
    u = tables["ux"][idx] * xs.astype(np.float32) + tables["uy"][idx] * ys.astype(np.float32) + tables["u0"][idx]
    mode = tables["mode"][idx]
    stripes = (0.5 + 0.5 * pm.sin(tables["stripe_rate"][idx] * u + tables["phase"][idx])).astype(np.float32)
    ramp = np.clip(0.5 + 0.5 * u, 0.0, 1.0)
    mix = np.where(mode == 0, np.float32(0), np.where(mode == 2, stripes, ramp))
    pixel = tables["base"][idx] + tables["delta"][idx] * mix[:, None]
    pixel += (tables["grain"][idx] * grain[ys, xs])[:, None]
    colour = np.zeros((*index_map.shape, 3), np.float32)
    colour[ys, xs] = np.clip(pixel, 0.0, 1.0)
    shape = (side, side)
    return (cv2.resize(colour, shape, interpolation=cv2.INTER_AREA),
            cv2.resize(covered.astype(np.float32), shape, interpolation=cv2.INTER_AREA))
