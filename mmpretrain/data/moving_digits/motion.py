"""Where the digits of a clip are in each frame, and the frames themselves.

The canvas wraps around (a digit leaving on the right comes back on the left), and a clip's start
position is uniform over the canvas whatever its direction or speed. So in every frame, the
first included, the position of a digit is uniform and independent of where it is going: one
frame says nothing about the direction; only the change between frames does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down
# Displacement per frame, as a fraction of the canvas side (1 and 3 px a frame at 64 px).
SPEEDS = {"slow": 1 / 64, "fast": 3 / 64}
DIGIT_SCALE = 3 / 8  # the 8x8 digit is drawn at this fraction of the side (24 px at 64 px)


@dataclass(frozen=True)
class Track:
    """One digit of a clip: its 8x8 grey levels, its start corner and velocity in fractions of
    the side (per frame), its label."""

    label: int
    pixels: tuple[float, ...]
    x: float
    y: float
    vx: float
    vy: float


def moving_track(label: int, pixels: np.ndarray, direction: str, speed: str, rng: random.Random) -> Track:
    dx, dy = DIRECTIONS[direction]
    v = SPEEDS[speed]
    return Track(label, tuple(float(p) for p in pixels), rng.random(), rng.random(), dx * v, dy * v)


def still_track(label: int, pixels: np.ndarray, rng: random.Random) -> Track:
    return Track(label, tuple(float(p) for p in pixels), rng.random(), rng.random(), 0.0, 0.0)


def digit_patch(pixels: tuple[float, ...], side: int) -> np.ndarray:
    """8x8 grey levels 0..16 -> [side, side] float32 in 0..1 (bicubic, as the digits images)."""
    arr = (np.asarray(pixels, np.float32).reshape(8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode="L").resize((side, side), Image.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


def corner(track: Track, t: int, size: int) -> tuple[int, int]:
    """The digit's top-left pixel in frame ``t`` (wrapped onto the canvas)."""
    return (int(np.floor((track.x + track.vx * t) * size)) % size,
            int(np.floor((track.y + track.vy * t) * size)) % size)


def render(tracks: list[Track], frames: int, size: int) -> np.ndarray:
    """``[frames, size, size, 3]`` uint8: white digits on black, the brighter where they overlap."""
    side = max(4, round(size * DIGIT_SCALE))
    patches = []
    for track in tracks:
        canvas = np.zeros((size, size), np.float32)
        canvas[:side, :side] = digit_patch(track.pixels, side)
        patches.append(canvas)
    out = np.zeros((frames, size, size), np.float32)
    for t in range(frames):
        for track, patch in zip(tracks, patches):
            x, y = corner(track, t, size)
            np.maximum(out[t], np.roll(patch, (y, x), axis=(0, 1)), out=out[t])
    grey = (out * 255.0 + 0.5).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
