"""Where the digits of a clip are in each frame, and the frames themselves.

A moving digit stays whole on the canvas for the whole clip (no wrap-around). Its start is drawn so
that opposite directions are each other's time reverse in distribution, and so that a frame taken
at a random time has the same position law whatever the direction (the coordinate across the motion
is drawn from the law of the coordinate along it at a random time). So one frame, or the unordered
set of frames, says nothing about the direction; only the order of the frames does.

Why not wrap around the canvas (as this data did until 2026-12-06): on a torus the expected change
of ANY per-frame feature between two frames is zero (the increments of a periodic function cancel
over a uniform position), so the direction is only in products of features across frames. A
contrastive model starts with no such product in either tower and stayed at chance in every budget
tried; on a bounded canvas the frame-to-frame change of where the digit is carries the direction
directly, and a model that keeps time order learns it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down
# Displacement per frame, as a fraction of the canvas side (1 and 2 px a frame at 64 px).
SPEEDS = {"slow": 1 / 64, "fast": 2 / 64}
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


def max_frames() -> int:
    """The longest clip in which a fast digit stays on the canvas."""
    return int((1 - DIGIT_SCALE) / max(SPEEDS.values()) + 1e-9) + 1


def moving_track(
    label: int, pixels: np.ndarray, direction: str, speed: str, rng: random.Random, frames: int = 16
) -> Track:
    """A digit that crosses ``v * (frames - 1)`` of the side along its direction without leaving the
    canvas."""
    dx, dy = DIRECTIONS[direction]
    v = SPEEDS[speed]
    travel = v * (frames - 1)
    free = 1 - DIGIT_SCALE - travel  # the room left for where the trajectory lies
    if free < 0:
        raise ValueError(
            f"a {speed} digit crosses the canvas in fewer than {frames} frames: at most {max_frames()}"
        )
    low = rng.random() * free  # the trajectory's lowest corner coordinate along the motion
    along = low + (travel if dx + dy < 0 else 0.0)
    across = rng.random() * free + v * rng.randrange(frames)  # the law of `along` in a frame at a random time
    x, y = (along, across) if dx else (across, along)
    return Track(label, tuple(float(p) for p in pixels), x, y, dx * v, dy * v)


def still_track(label: int, pixels: np.ndarray, rng: random.Random) -> Track:
    room = 1 - DIGIT_SCALE
    return Track(label, tuple(float(p) for p in pixels), rng.random() * room, rng.random() * room, 0.0, 0.0)


def digit_patch(pixels: tuple[float, ...], side: int) -> np.ndarray:
    """8x8 grey levels 0..16 -> [side, side] float32 in 0..1 (bicubic, as the digits images)."""
    arr = (np.asarray(pixels, np.float32).reshape(8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode="L").resize((side, side), Image.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


def corner(track: Track, t: int, size: int) -> tuple[int, int]:
    """The digit's top-left pixel in frame ``t`` (kept on the canvas, the digit whole)."""
    top = size - max(4, round(size * DIGIT_SCALE))
    return (
        min(max(int(np.floor((track.x + track.vx * t) * size)), 0), top),
        min(max(int(np.floor((track.y + track.vy * t) * size)), 0), top),
    )


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
