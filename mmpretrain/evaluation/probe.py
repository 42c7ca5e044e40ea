"""Compositional probe (SugarCrepe-style): does an image prefer its true caption to a hard negative?"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 65536  # negatives scored at once


def compositional_probe(
    items: torch.Tensor,
    captions: torch.Tensor,
    negatives: torch.Tensor,
    owner: torch.Tensor,
    kinds: torch.Tensor,
    kind_names: tuple[str, ...] | list[str],
) -> dict[str, float]:
    """Per kind, the fraction of (item, negative) pairs where the item's true caption (row i of
    ``captions``: the sample's FIRST caption) scores strictly above the negative; ties and NaN fail.

    ``items``/``captions`` ``[N, D]`` are paired rows, ``negatives [G, D]`` belong to the rows
    ``owner [G]`` and have kind ``kind_names[kinds[g]]``. Returns ``{kind: accuracy}`` for every kind
    present plus ``mean`` (the unweighted mean over those kinds); {} without negatives. O(G x D).
    """
    owner, kinds = owner.long().to(items.device), kinds.long().to(items.device)
    wins = torch.zeros(len(owner), dtype=torch.bool, device=items.device)
    for start in range(0, len(owner), CHUNK):
        rows = owner[start : start + CHUNK]
        q = F.normalize(items[rows], dim=-1)
        true = (q * F.normalize(captions[rows], dim=-1)).sum(1)
        neg = (q * F.normalize(negatives[start : start + CHUNK], dim=-1)).sum(1)
        wins[start : start + CHUNK] = true > neg  # NaN compares false: a failure
    out = {kind_names[k]: wins[kinds == k].float().mean().item() for k in kinds.unique().tolist()}
    if out:
        out["mean"] = sum(out.values()) / len(out)
    return out
