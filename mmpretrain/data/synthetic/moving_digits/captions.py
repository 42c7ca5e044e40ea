"""Captions of a moving-digits clip: the digit, its direction and its speed, in several phrasings.

Every caption names all three (and the still digit, when there is one). The word tables are
public so tests can read captions back with a reader of their own.
"""

from __future__ import annotations

import random

from mmpretrain.data.synthetic.digits import CLASSNAMES

DIRECTION_WORDS = {
    "left": ["left", "to the left", "leftwards", "towards the left"],
    "right": ["right", "to the right", "rightwards", "towards the right"],
    "up": ["up", "upwards", "towards the top"],
    "down": ["down", "downwards", "towards the bottom"],
}
SPEED_ADVERBS = {
    "slow": ["slowly", "at a slow pace", "gently"],
    "fast": ["quickly", "fast", "at a fast pace", "rapidly"],
}
SPEED_ADJECTIVES = {"slow": ["slow", "slow-moving", "sluggish"], "fast": ["fast", "fast-moving", "speedy"]}
VERBS = ["moving", "sliding", "travelling", "heading", "drifting", "going"]

# {d}: the digit, {dir}: a direction phrase, {adv}: a speed adverb, {adj}: a speed adjective, {v}: a verb.
PATTERNS = [
    "a {d} {v} {dir} {adv}",
    "the digit {d} {v} {dir} {adv}",
    "a handwritten {d} {v} {dir} {adv}",
    "a {adj} {d} {v} {dir}",
    "the number {d}, {v} {dir} {adv}",
    "a video of a {d} {v} {dir} {adv}",
    "{d} {v} {dir}, {adv}",
    "a {adj} digit {d} {v} {dir}",
    "a clip where the number {d} is {v} {dir} {adv}",
]
STILL = [
    ", while a {s} stays still",
    " next to a motionless {s}",
    ", passing a still {s}",
    "; a {s} does not move",
]


def digit_word(label: int, rng: random.Random) -> str:
    return CLASSNAMES[label] if rng.random() < 0.5 else str(label)


def caption(label: int, direction: str, speed: str, still: int | None, rng: random.Random) -> str:
    text = rng.choice(PATTERNS).format(
        d=digit_word(label, rng),
        v=rng.choice(VERBS),
        dir=rng.choice(DIRECTION_WORDS[direction]),
        adv=rng.choice(SPEED_ADVERBS[speed]),
        adj=rng.choice(SPEED_ADJECTIVES[speed]),
    )
    if still is not None:
        text += rng.choice(STILL).format(s=digit_word(still, rng))
    return text + "."


def captions(
    label: int, direction: str, speed: str, still: int | None, rng: random.Random, n: int = 5
) -> list[str]:
    """``n`` distinct captions (the first is the sample's ``txt`` and its spoken track)."""
    out: list[str] = []
    while len(out) < n:
        text = caption(label, direction, speed, still, rng)
        if text not in out:
            out.append(text)
    return out
