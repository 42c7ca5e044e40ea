"""Which caption (and which hard negatives) of a multi-caption sample trains in a pass.

A sample with several captions trains on ONE per pass (``data.captions_per_sample``: on up to that
many distinct ones, :func:`pick_captions`), chosen by a seed of ``(data seed, sample
key, pass)`` (:func:`mmpretrain.data.stream.seeds.derive`), never a global RNG: the choice is a pure
function of those three, so an exact resume (``data.resume=exact``) picks what the uninterrupted run
picked, and two passes over a sample usually train on different captions. The pass is the one its
source's reader is in when the sample leaves the shuffle buffer (part of the saved position).
Validation uses every caption: the first as ``text``, the others as ``text_more``.
"""

from __future__ import annotations

import random

from mmpretrain.data.stream.seeds import derive, key_hash

#: SugarCrepe's categories of hard negatives; another kind in a shard is scored as "other".
NEGATIVE_KINDS = (
    "replace_obj",
    "replace_att",
    "replace_rel",
    "swap_obj",
    "swap_att",
    "add_obj",
    "add_att",
    "other",
)


def kind_index(kind: str) -> int:
    return NEGATIVE_KINDS.index(kind) if kind in NEGATIVE_KINDS else len(NEGATIVE_KINDS) - 1


def pick_caption(captions: list[str], seed: int, key: str | None, pass_idx: int) -> str:
    if len(captions) == 1:
        return captions[0]
    rng = random.Random(derive(seed, "caption_pick", key_hash(key), pass_idx))
    return captions[rng.randrange(len(captions))]


def pick_captions(captions: list[str], k: int, seed: int, key: str | None, pass_idx: int) -> list[str]:
    """Up to ``k`` distinct captions of the sample for this pass (``data.captions_per_sample``), in a
    seeded random order: the first trains as ``text``."""
    if len(captions) == 1:
        return list(captions)
    rng = random.Random(derive(seed, "caption_pick", key_hash(key), pass_idx))
    return [captions[i] for i in rng.sample(range(len(captions)), min(k, len(captions)))]


def pick_negatives(negatives: list[str], k: int, seed: int, key: str | None, pass_idx: int) -> list[str]:
    """Up to ``k`` distinct negatives of the sample for this pass (all of them when it has <= k)."""
    if len(negatives) <= k:
        return list(negatives)
    rng = random.Random(derive(seed, "negative_pick", key_hash(key), pass_idx))
    return [negatives[i] for i in sorted(rng.sample(range(len(negatives)), k))]
