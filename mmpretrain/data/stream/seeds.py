"""Every seed of the data stream, derived in one place from the user's ``seed``.

``derive(seed, purpose, *keys)`` hashes ``(seed, purpose, *keys)`` with numpy's
:class:`~numpy.random.SeedSequence` (the user seed is the entropy, the purpose and keys its spawn
key), so distinct purposes or keys give independent streams, any non-negative integer is a valid
user seed (``2**63 - 1`` and beyond), and the result is a 63-bit non-negative int that
``random.Random``, ``torch.Generator.manual_seed`` and numpy all accept. Hand-written formulas such
as ``(seed * 1_000_003 + rank) * 1009 + worker`` overflow int64 for large seeds and collide when a
key outgrows its multiplier; a hash of the whole tuple does neither (a collision is a 2**-63 chance).

``global_seed(seed)`` is the 32-bit seed for ``lightning.seed_everything`` (which replaces any seed
outside ``[0, 2**32 - 1]`` by 0 with only a warning).
"""

from __future__ import annotations

import hashlib
import operator
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

#: what a derived seed is for: part of its spawn key, so two purposes never share a stream.
#: Append new purposes; never renumber (that would change every existing run's data order).
PURPOSES = {
    "shard_order": 0,  # the shard list's shuffle in pass p: (pass,)
    "shard_resample": 1,  # shard_policy=resample draws: (pass, rank, stream)
    "shuffle_buffer": 2,  # the sample-shuffle buffer: (rank, stream, source)
    "source_mix": 3,  # which source the next sample comes from: (rank, stream)
    "augment": 4,  # one sample's random augmentations: (rank, stream, sample index)
    "global": 5,  # seed_everything's seed for user seeds beyond 32 bits: ()
    "scene": 6,  # one generated scene of `mmpretrain data scenes`: (split, scene index)
    "caption_pick": 7,  # which caption of a sample trains in a pass: (key hash, pass)
    "negative_pick": 8,  # which hard negatives of a sample train in a pass: (key hash, pass)
    "moving_digits": 9,  # one clip of `mmpretrain data moving-digits`: (split, clip index)
    "scene_questions": 10,  # the scenes' questions: (0 pick | 1 words, split, scene) or (2 balance, split)
    "teacher_augment": 11,  # a stored augmentation of a sample (distill.cached): (key hash, augmentation)
}

_MAX_32 = 2**32 - 1


def check_seed(seed: int) -> int:
    """``seed`` as a plain int, or a ValueError that says what a seed must be."""
    try:
        value = operator.index(seed)
    except TypeError:
        raise ValueError(
            f"seed must be a non-negative integer, got {seed!r} ({type(seed).__name__})"
        ) from None
    if value < 0:
        raise ValueError(f"seed must be a non-negative integer, got {value}")
    return value


def derive(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed for ``purpose`` at ``keys`` (non-negative ints: rank, stream, sample index...)."""
    spawn_key = (PURPOSES[purpose], *(check_seed(k) for k in keys))
    state = np.random.SeedSequence(entropy=check_seed(seed), spawn_key=spawn_key).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def key_hash(key: str | None) -> int:
    """A sample key (``__key__``) as a non-negative 63-bit int for :func:`derive`'s keys."""
    digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def global_seed(seed: int) -> int:
    """The seed to give ``lightning.seed_everything`` for the user's ``seed``: ``seed`` itself when it
    fits in 32 bits (so existing runs keep their weights' initialisation), else a 32-bit hash of it."""
    seed = check_seed(seed)
    if seed <= _MAX_32:
        return seed
    return derive(seed, "global") & _MAX_32


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the augmentations with ``random``/``torch`` seeded by ``seed``; restore the state after
    (also when the sample fails and is skipped).

    Only the CPU generator is seeded (augmentations run on CPU): ``torch.manual_seed`` would also
    queue a lazy CUDA seeding, which records a Python stack trace per call (benchmarks/NOTES.md).
    """
    if seed is None:
        yield
        return
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
