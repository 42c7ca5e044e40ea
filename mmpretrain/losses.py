"""Contrastive losses: features in, ``{"<name>_loss": tensor}`` out.

A loss reads the model's output dict (``<modality>_features``, ``logit_scale`` or
``logit_scale_<a>_<b>``, optional ``<modality>_mask``) and returns one ``*_loss`` term per
modality pair. The training step sums the terms, so a new objective never edits the step.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain import distributed


def pair_name(a: str, b: str) -> str:
    return f"{a}_{b}"


def logit_scale_for(outputs: dict[str, torch.Tensor], a: str, b: str) -> torch.Tensor:
    return outputs.get(f"logit_scale_{pair_name(a, b)}", outputs.get("logit_scale"))


def clip_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP for this rank's rows against the global batch.

    ``a``/``b`` are this rank's L2-normalised features ``[B, D]``; under DDP they are gathered
    with gradient and the local rows use labels offset by rank, which makes the summed gradient
    over ranks equal to the single-process gradient of the global batch.

    ``valid`` ``[B]`` (bool) marks the rows that carry both modalities. Invalid rows are neither
    queries nor candidates: their columns are masked out of every softmax and their rows out of
    the sum, and the sum is divided by the *global* number of valid rows (times the world size,
    which DDP's gradient averaging divides out again). Shapes stay equal on every rank, so the
    result equals the unmasked loss over only the valid samples of the global batch.
    """
    world = distributed.world_size() if gather else 1
    if valid is None and world == 1:
        return _clip_loss_all_valid(a, b, logit_scale)
    if valid is None:  # every rank takes the same (masked) path, so the collectives match
        valid = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    valid = valid.bool()
    if world > 1:
        all_a, all_b = distributed.gather_with_grad(a), distributed.gather_with_grad(b)
        all_valid = distributed.all_gather_variable(valid.to(torch.uint8)).bool()
        offset = distributed.rank() * a.shape[0]
    else:
        all_a, all_b, all_valid, offset = a, b, valid, 0
    labels = torch.arange(a.shape[0], device=a.device) + offset
    labels = labels.masked_fill(~valid, -100)
    n_valid = all_valid.sum()
    total = 0.0
    for q, keys in ((a, all_b), (b, all_a)):
        logits = logit_scale * q @ keys.T
        # A finite fill (not -inf) keeps rows with no valid column NaN-free in the backward pass.
        logits = logits.masked_fill(~all_valid[None, :], torch.finfo(logits.dtype).min)
        total = total + F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total * world / (2 * n_valid.clamp(min=1))


def _clip_loss_all_valid(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(a.shape[0], device=a.device)
    logits_ab = logit_scale * a @ b.T
    logits_ba = logit_scale * b @ a.T
    return (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels)) / 2


class InfoNCE(nn.Module):
    """Weighted sum of CLIP InfoNCE over configured modality pairs.

    ``pairs`` is a list of ``[a, b]`` modality names; ``weights`` one float per pair (default 1).
    Pairs whose features are absent from a batch are skipped; when a batch carries a
    ``<modality>_mask`` only rows holding both modalities enter that pair's loss.
    """

    def __init__(self, pairs: Sequence[Sequence[str]] = (("image", "text"),), weights: Sequence[float] | None = None):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.pairs)
        if len(self.weights) != len(self.pairs):
            raise ValueError(f"loss.weights has {len(self.weights)} entries for {len(self.pairs)} pairs")

    def forward(self, outputs: dict[str, torch.Tensor], gather: bool = True) -> dict[str, torch.Tensor]:
        losses = {}
        for (a, b), w in zip(self.pairs, self.weights):
            fa, fb = outputs.get(f"{a}_features"), outputs.get(f"{b}_features")
            if fa is None or fb is None:
                continue
            valid = rows_with_both(outputs, a, b)
            losses[f"{pair_name(a, b)}_loss"] = w * clip_loss(fa, fb, logit_scale_for(outputs, a, b), gather, valid)
        return losses


def rows_with_both(outputs: dict[str, torch.Tensor], a: str, b: str) -> torch.Tensor | None:
    """``[B]`` bool: rows carrying both modalities (from ``<m>_mask``), or None when all do."""
    masks = [outputs[f"{m}_mask"].bool() for m in (a, b) if outputs.get(f"{m}_mask") is not None]
    if not masks:
        return None
    return masks[0] & masks[1] if len(masks) == 2 else masks[0]
