"""Tiny videos written with PyAV for the tests: a bright square moving left or right."""

from __future__ import annotations

import numpy as np
import webdataset as wds

from mmpretrain.data.stream.video import encode_video


def moving_square(frames: int = 8, size: int = 32, direction: int = 1, shade: int = 255) -> np.ndarray:
    """``uint8 [frames, size, size, 3]``: a 6-px square crossing the frame left->right (``direction`` 1) or
    back."""
    out = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        x = round((size - 6) * t / max(frames - 1, 1))
        x = x if direction > 0 else size - 6 - x
        out[t, size // 2 - 3 : size // 2 + 3, x : x + 6] = shade
    return out


def tone(seconds: float = 1.0, hz: float = 440.0, rate: int = 16000) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def write_video_shards(
    root, n_train: int = 16, n_val: int = 8, shards: int = 2, audio: bool = False, frames: int = 8
) -> None:
    """``root/{train,val}/*.tar`` of mp4 (+ an audio track) clips of a square moving left or right,
    captions "moving left/right", classes 0/1, and classnames/templates."""
    from pathlib import Path

    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in range(shards):
            with wds.TarWriter(str(root / split / f"{split}-{s:04d}.tar")) as sink:
                for i in range(s, n, shards):
                    label = i % 2
                    clip = moving_square(frames, 32, 1 if label else -1, shade=128 + 8 * (i % 16))
                    sound = tone(0.5, 300 + 500 * label) if audio else None
                    sink.write(
                        {
                            "__key__": f"{split}{i:04d}",
                            "mp4": encode_video(clip, 8, "mp4", audio=sound),
                            "txt": f"a square moving {'right' if label else 'left'}",
                            "cls": str(label),
                        }
                    )
    (root / "classnames.txt").write_text("left\nright\n")
    (root / "templates.txt").write_text("a square moving {}\n")
