"""Scenes into pixels: place objects without overlap, draw them with PIL on a varied background, JPEG.

Everything random comes from the two generators passed in (a ``random.Random`` for the layout
and colours, a numpy ``Generator`` for the background and pixel noise), so a scene's bytes
depend only on its seed.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw

from mmpretrain.data.synthetic.scenes.grammar import COLORS, Obj

RADIUS = {"small": 0.075, "medium": 0.115, "large": 0.165}  # a fraction of the image side
GAP = 0.03  # between the circles that bound two objects


def layout(kinds: list[tuple[str, str, str]], rng: random.Random) -> list[Obj] | None:
    """Positions for (shape, colour, size) objects, none overlapping; None when they do not fit."""
    placed: list[Obj] = []
    for shape, color, size in kinds:
        r = RADIUS[size]
        for _ in range(200):
            x, y = rng.uniform(r + 0.02, 1 - r - 0.02), rng.uniform(r + 0.02, 1 - r - 0.02)
            if all(math.hypot(x - o.x, y - o.y) > r + RADIUS[o.size] + GAP for o in placed):
                placed.append(Obj(shape, color, size, round(x, 3), round(y, 3)))
                break
        else:
            return None
    return placed


def _background(
    side: int, avoid: list[tuple[int, int, int]], rng: random.Random, nrng: np.random.Generator
) -> np.ndarray:
    """A solid, gradient or noise-texture background whose colours stay far from every object colour."""

    def far_colour() -> np.ndarray:
        for _ in range(100):
            c = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
            if all(np.abs(c - np.array(a)).sum() > 150 for a in avoid):
                return c
        return c

    kind = rng.choice(["solid", "gradient", "noise"])
    base = far_colour()
    if kind == "solid":
        return np.broadcast_to(base, (side, side, 3)).copy()
    if kind == "gradient":
        other = far_colour()
        angle = rng.uniform(0, 2 * math.pi)
        t = np.linspace(-1, 1, side, dtype=np.float32)
        ramp = (math.cos(angle) * t[None, :] + math.sin(angle) * t[:, None]) / 2 + 0.5
        return base * (1 - ramp[..., None]) + other * ramp[..., None]
    cells = rng.choice([4, 8, 16])
    coarse = nrng.normal(0, 1, (cells, cells)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC))
    return base + rng.uniform(8, 25) * texture[..., None]


def _points(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], start: float, sx: float = 1.0) -> list[tuple[float, float]]:
        return [
            (
                cx + sx * radii[i % len(radii)] * math.cos(start + turn + 2 * math.pi * i / n),
                cy + radii[i % len(radii)] * math.sin(start + turn + 2 * math.pi * i / n),
            )
            for i in range(n)
        ]

    up = -math.pi / 2
    if shape == "square":
        return ring(4, [r], math.pi / 4)
    if shape == "triangle":
        return ring(3, [r * 1.1], up)
    if shape == "star":
        return ring(10, [r * 1.1, r * 0.45], up)
    if shape == "hexagon":
        return ring(6, [r], 0)
    if shape == "pentagon":
        return ring(5, [r], up)
    if shape == "diamond":
        return ring(4, [r * 1.1], up, sx=0.7)
    if shape == "cross":
        w = r * 0.36
        pts = [
            (w, r),
            (w, w),
            (r, w),
            (r, -w),
            (w, -w),
            (w, -r),
            (-w, -r),
            (-w, -w),
            (-r, -w),
            (-r, w),
            (-w, w),
            (-w, r),
        ]
        c, s = math.cos(turn), math.sin(turn)
        return [(cx + c * px - s * py, cy + s * px + c * py) for px, py in pts]
    raise ValueError(f"unknown polygon shape {shape}")


def _draw(
    draw: ImageDraw.ImageDraw, o: Obj, side: int, fill: tuple[int, int, int], rng: random.Random
) -> None:
    cx, cy = o.x * side, o.y * side
    r = RADIUS[o.size] * side * rng.uniform(0.9, 1.1)
    turn = math.radians(rng.uniform(-8, 8))
    box = (cx - r, cy - r, cx + r, cy + r)
    if o.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif o.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(r * 0.38)))
    elif o.shape == "semicircle":
        draw.pieslice((cx - r, cy - 0.6 * r, cx + r, cy + 1.4 * r), 180, 360, fill=fill)
    else:
        draw.polygon(_points(o.shape, cx, cy, r, turn), fill=fill)


def render(
    objects: list[Obj], side: int, rng: random.Random, nrng: np.random.Generator, quality: int
) -> bytes:
    """JPEG bytes of ``objects`` on a ``side`` x ``side`` image."""
    avoid = [COLORS[o.color] for o in objects]
    pixels = _background(side, avoid, rng, nrng)
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for o in objects:
        jitter = [rng.randint(-12, 12) for _ in range(3)]
        _draw(draw, o, side, tuple(min(255, max(0, c + j)) for c, j in zip(COLORS[o.color], jitter)), rng)
    sigma = rng.choice([0.0, 2.0, 4.0, 7.0])
    if sigma:
        noisy = np.asarray(img, dtype=np.float32) + nrng.normal(0, sigma, (side, side, 3)).astype(np.float32)
        img = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
