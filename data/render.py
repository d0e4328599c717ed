"""Drawing of entity images: a coloured shape on a patterned background, rendered with small random perturbations.

Pure PIL + numpy with an explicit random generator, so the same generator state always gives the same pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# name -> RGB. Chosen to stay distinguishable at 56x56 under +-15% brightness and pixel noise.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 30),
    "orange": (245, 135, 25),
    "purple": (135, 55, 185),
    "pink": (245, 125, 190),
    "cyan": (30, 195, 210),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "ring", "crescent", "arrow",
)
# Background patterns; the adjective is how pages and reasons describe them.
PATTERNS: dict[str, str] = {
    "stripes": "striped",
    "dots": "dotted",
    "checks": "checkered",
    "grid": "grid",
    "plain": "plain",
}

# Light background tints. Which tint an entity gets is a check digit of its (shape, colour, pattern), so two
# entities that differ in only one of those also differ in the background: whole-image features tell them apart.
TINTS: tuple[tuple[int, int, int], ...] = (
    (235, 235, 235), (190, 215, 250), (250, 200, 200), (200, 240, 190),
    (250, 240, 170), (220, 200, 250), (180, 235, 230), (250, 215, 180),
)
_INK_SHADE = 0.82  # pattern ink = tint darkened: low contrast so the object stays the salient thing
_SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges without PIL's non-existent polygon antialiasing


@dataclass(frozen=True)
class Look:
    """What an entity looks like; the triple is unique per entity so an image identifies it."""

    shape: str
    colour: str
    pattern: str
    tint: int = 0  # index into TINTS


@dataclass(frozen=True)
class Perturbation:
    """How one rendering differs from the ideal picture (pixel units of the final image)."""

    dx: float = 0.0
    dy: float = 0.0
    brightness: float = 1.0
    noise_std: float = 0.0
    noise_seed: int = 0


def random_perturbation(rng: np.random.Generator, max_shift: float = 2.0, brightness_jitter: float = 0.08,
                        noise_std: float = 4.0) -> Perturbation:
    """A perturbation drawn from `rng`: object shift, global brightness and pixel noise.

    The defaults keep every copy recognisable by whole-image features (thumbnails, colour histograms): the
    image-search tool must find the entity, not solve a vision problem.
    """
    return Perturbation(
        dx=float(rng.uniform(-max_shift, max_shift)),
        dy=float(rng.uniform(-max_shift, max_shift)),
        brightness=float(rng.uniform(1.0 - brightness_jitter, 1.0 + brightness_jitter)),
        noise_std=noise_std,
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring_points(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        angles = [start + 2 * math.pi * i / n for i in range(n)]
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]

    if shape == "triangle":
        return ring_points(3, r, -math.pi / 2)
    if shape == "hexagon":
        return ring_points(6, r, 0.0)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "star":
        outer, inner = ring_points(5, r, -math.pi / 2), ring_points(5, 0.42 * r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "arrow":
        shaft, head = 0.3 * r, 0.75 * r
        return [(cx - r, cy - shaft), (cx + 0.1 * r, cy - shaft), (cx + 0.1 * r, cy - head), (cx + r, cy),
                (cx + 0.1 * r, cy + head), (cx + 0.1 * r, cy + shaft), (cx - r, cy + shaft)]
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw_shape_mask(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        s = 0.82 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif shape == "cross":
        w = 0.33 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        h = 0.55 * r
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=0)
    elif shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, oy, h = cx + 0.45 * r, cy - 0.2 * r, 0.85 * r
        draw.ellipse((ox - h, oy - h, ox + h, oy + h), fill=0)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=255)


def _draw_pattern(draw: ImageDraw.ImageDraw, pattern: str, side: int, ink: tuple[int, int, int]) -> None:
    period = 8 * _SUPERSAMPLE
    if pattern == "plain":
        return
    if pattern == "stripes":
        for x in range(-side, 2 * side, period):
            draw.polygon([(x, 0), (x + period // 2, 0), (x + period // 2 - side, side), (x - side, side)],
                         fill=ink)
    elif pattern == "dots":
        rad = 1.6 * _SUPERSAMPLE
        for y in range(-period, side + period, period):
            for x in range(-period, side + period, period):
                draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=ink)
    elif pattern == "checks":
        for yi, y in enumerate(range(-period, side + period, period // 2)):
            for xi, x in enumerate(range(-period, side + period, period // 2)):
                if (xi + yi) % 2 == 0:
                    draw.rectangle((x, y, x + period // 2 - 1, y + period // 2 - 1), fill=ink)
    elif pattern == "grid":
        w = _SUPERSAMPLE
        for k in range(-period, side + period, period):
            draw.rectangle((k, 0, k + w - 1, side), fill=ink)
            draw.rectangle((0, k, side, k + w - 1), fill=ink)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; known: {sorted(PATTERNS)}")


def render(look: Look, size: int, perturbation: Perturbation = Perturbation()) -> Image.Image:
    """Draws `look` as a `size` x `size` RGB image under `perturbation`."""
    if look.shape not in SHAPES:
        raise ValueError(f"unknown shape {look.shape!r}; known: {SHAPES}")
    if look.colour not in COLOURS:
        raise ValueError(f"unknown colour {look.colour!r}; known: {sorted(COLOURS)}")
    if size < 16:
        raise ValueError(f"image size {size} too small to draw a recognisable shape (need >= 16)")
    side = size * _SUPERSAMPLE
    if not 0 <= look.tint < len(TINTS):
        raise ValueError(f"tint {look.tint} out of range [0, {len(TINTS)})")
    tint = TINTS[look.tint]
    canvas = Image.new("RGB", (side, side), tint)
    ink = tuple(int(v * _INK_SHADE) for v in tint)
    _draw_pattern(ImageDraw.Draw(canvas), look.pattern, side, ink)
    mask = Image.new("L", (side, side), 0)
    p = perturbation
    _draw_shape_mask(ImageDraw.Draw(mask), look.shape, side / 2 + p.dx * _SUPERSAMPLE, side / 2 + p.dy * _SUPERSAMPLE,
                     0.32 * side)
    canvas.paste(Image.new("RGB", (side, side), COLOURS[look.colour]), (0, 0), mask)
    small = canvas.resize((size, size), Image.Resampling.LANCZOS)
    if p.brightness == 1.0 and p.noise_std == 0.0:
        return small
    pixels = np.asarray(small, dtype=np.float32) * p.brightness
    if p.noise_std > 0:
        pixels += np.random.default_rng(p.noise_seed).normal(0.0, p.noise_std, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")

