"""``mmpretrain data moving-digits out=DIR``: short clips of a scikit-learn digit moving left, right,
up or down, slowly or fast, sometimes beside a second, still digit; five captions each and the
first one spoken (espeak-ng) as the clip's audio track.

Layout of ``DIR`` (README, "The moving digits")::

    train/train-0000.tar ...            250 clips a shard, sizes.json beside them
    val/val-0000.tar ...
    classnames.txt, templates.txt       the digit task (``cls``)
    tasks/{digit,direction,speed}/{classnames,templates}.txt
    moving_digits.json                  the options the shards were built with

A sample: ``mp4`` (H.264 frames + the spoken first caption as AAC), ``flac`` (the same speech),
``txt`` (the first caption), ``cls`` (the moving digit) and ``json`` with ``captions`` (5),
``labels`` ({digit, direction, speed}), ``digits`` ([{label, x, y, vx, vy}]: the first moves, a
second one is still; top-left corner in frame 0 and velocity per frame as fractions of the side),
``frames``, ``fps``, ``size`` and ``voice``.

The digit images of train and val clips are those of ``mmpretrain data digits``'s train and val
split (same seed). Clip ``i`` of a split is drawn from its own seed, ``derive(seed,
"moving_digits", split, i)``, so the shards are byte-identical for a seed whatever the number of
workers, and a rerun writes only the shards not there yet.
"""

from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmpretrain.data.convert import writing
from mmpretrain.data.stream.seeds import derive
from mmpretrain.data.stream.video import encode_video
from mmpretrain.data.synthetic.digits import CLASSNAMES
from mmpretrain.data.synthetic.moving_digits import captions as grammar
from mmpretrain.data.synthetic.moving_digits.media import speech_flac
from mmpretrain.data.synthetic.moving_digits.motion import (
    DIRECTIONS,
    SPEEDS,
    Track,
    max_frames,
    moving_track,
    render,
    still_track,
)
from mmpretrain.data.synthetic.spoken_digits import espeak_path, speak, voice_params

SPLITS = {"train": 0, "val": 1}  # name -> the split's key in each clip's seed
VAL_FRACTION = 0.2  # of the digit images, as `mmpretrain data digits`
SECOND_DIGIT = 0.3  # the share of clips with a second, still digit
ESPEAK_RATE = 22050  # what espeak-ng writes: asked for as is, so speak() does not resample

TASKS = {
    "digit": (
        CLASSNAMES,
        [
            "a video of the digit {} moving.",
            "a {} moving across the screen.",
            "the number {} in motion.",
            "a clip of a moving {}.",
        ],
    ),
    "direction": (
        list(DIRECTIONS),
        [
            "a digit moving {}.",
            "a number going {}.",
            "a video of a digit heading {}.",
            "something that moves {}.",
        ],
    ),
    "speed": (
        list(SPEEDS),
        [
            "a {} moving digit.",
            "a digit moving at a {} speed.",
            "a {} video of a number.",
            "a number that moves, {}.",
        ],
    ),
}
TOP_TASK = "digit"  # classnames.txt / templates.txt at the root and ``cls``


@functools.lru_cache(maxsize=4)
def digit_images(seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """scikit-learn's digits (pixels, labels) and the image indices of each split (digits' split)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(seed).permutation(len(digits.target))
    n_val = round(len(order) * VAL_FRACTION)
    return digits.data, digits.target, {"val": order[:n_val], "train": order[n_val:]}


@dataclass(frozen=True)
class Plan:
    """What clip ``index`` of a split shows and says, before any pixel or sound is made."""

    tracks: list[Track]
    direction: str
    speed: str
    captions: list[str]
    voice: tuple[str, int, int]  # espeak-ng voice, words a minute, pitch


def plan_clip(seed: int, split: str, index: int, frames: int = 16) -> Plan:
    rng = random.Random(derive(seed, "moving_digits", SPLITS[split], index))
    pixels, targets, splits = digit_images(seed)
    pool = splits[split]
    first = int(pool[rng.randrange(len(pool))])
    label, direction, speed = int(targets[first]), rng.choice(list(DIRECTIONS)), rng.choice(list(SPEEDS))
    tracks = [moving_track(label, pixels[first], direction, speed, rng, frames)]
    if rng.random() < SECOND_DIGIT:
        while int(targets[second := int(pool[rng.randrange(len(pool))])]) == label:
            pass
        tracks.append(still_track(int(targets[second]), pixels[second], rng))
    still = tracks[1].label if len(tracks) > 1 else None
    texts = grammar.captions(label, direction, speed, still, rng)
    return Plan(tracks, direction, speed, texts, voice_params(rng))


def make_clip(
    seed: int, split: str, index: int, frames: int, size: int, fps: int, sample_rate: int
) -> dict[str, Any]:
    """One sample of ``split``: the mp4, speech, captions and labels of clip ``index``."""
    plan = plan_clip(seed, split, index, frames)
    voice, wpm, pitch = plan.voice
    wav = speak(espeak_path(), plan.captions[0], voice, wpm, pitch, ESPEAK_RATE)  # espeak-ng's own rate
    flac, speech = speech_flac(wav, sample_rate)
    mp4 = encode_video(
        render(plan.tracks, frames, size), fps, "mp4", speech.astype(np.float32) / 32767.0, sample_rate
    )
    label = plan.tracks[0].label
    labels = {
        "digit": label,
        "direction": list(DIRECTIONS).index(plan.direction),
        "speed": list(SPEEDS).index(plan.speed),
    }
    meta = {
        "captions": plan.captions,
        "labels": labels,
        "frames": frames,
        "fps": fps,
        "size": size,
        "digits": [{"label": t.label, "x": t.x, "y": t.y, "vx": t.vx, "vy": t.vy} for t in plan.tracks],
        "voice": {"voice": voice, "wpm": wpm, "pitch": pitch},
    }
    return {
        "__key__": f"{split}_{index:06d}",
        "mp4": mp4,
        "flac": flac,
        "txt": plan.captions[0].encode(),
        "cls": str(label).encode(),
        "json": json.dumps(meta).encode(),
    }


def _write(task: tuple) -> int:
    path, split, start, stop, seed, frames, size, fps, sample_rate = task
    return writing.write_shard(
        Path(path), (make_clip(seed, split, i, frames, size, fps, sample_rate) for i in range(start, stop))
    )


def build_moving_digits(
    out: str | Path,
    seed: int = 0,
    train: int = 4000,
    val: int = 500,
    frames: int = 16,
    image_size: int = 64,
    fps: int = 8,
    sample_rate: int = 16000,
    workers: int | None = None,
    shard_size: int = 250,
    **_: Any,
) -> Path:
    """Write the splits' shards (in parallel, skipping shards already there), then the task files."""
    if not 2 <= frames <= max_frames():
        raise ValueError(
            f"frames={frames}: a clip needs at least 2 frames to show motion and at most {max_frames()} "
            "(a fast digit must stay whole on the canvas)"
        )
    if image_size < 16 or image_size % 2:
        raise ValueError(
            f"image_size={image_size}: the frames must be an even side of at least 16 px (yuv420p)"
        )
    espeak_path()  # a clear error before any worker starts
    out = Path(out)
    options = {
        "canvas": "bounded",
        "seed": seed,
        "train": train,
        "val": val,
        "frames": frames,
        "image_size": image_size,
        "fps": fps,
        "sample_rate": sample_rate,
        "shard_size": shard_size,
    }
    writing.claim_build(out, "moving_digits.json", options, "moving digits")
    pending, sizes = writing.plan_shards(out, {"train": train, "val": val}, shard_size)
    started = time.perf_counter()
    if pending:
        digit_images(seed)  # loaded (sklearn imported) once here; the forked workers inherit it
    writing.parallel_map(
        _write,
        [(*t, seed, frames, image_size, fps, sample_rate) for t in pending],
        workers,
        label="moving digits",
        total=sum(t[3] - t[2] for t in pending),
        weight=int,
    )
    writing.finish_build(out, sizes, TASKS, TOP_TASK, pending, started, "moving digits")
    return out


def is_built(root: str | Path) -> bool:
    """The splits are there, and not from the version whose canvas wrapped around (its
    ``moving_digits.json`` has no ``canvas``): such a root is rebuilt on first use, which refuses
    with a message to choose another ``out=`` or delete it."""
    if not writing.splits_built(root, SPLITS):
        return False
    record = Path(root) / "moving_digits.json"
    return not record.exists() or json.loads(record.read_text()).get("canvas") == "bounded"
