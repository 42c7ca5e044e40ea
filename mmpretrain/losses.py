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


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP for this rank's rows against the global batch.

    ``a``/``b`` are this rank's L2-normalised features ``[B, D]``; under DDP they are gathered
    with gradient and the local rows use labels offset by rank, which makes the summed gradient
    over ranks equal to the single-process gradient of the global batch.
    """
    if not gather:
        all_a, all_b, offset = a, b, 0
    else:
        all_a, all_b = distributed.gather_with_grad(a), distributed.gather_with_grad(b)
        offset = distributed.rank() * a.shape[0]
    labels = torch.arange(a.shape[0], device=a.device) + offset
    logits_ab = logit_scale * a @ all_b.T
    logits_ba = logit_scale * b @ all_a.T
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
            fa, fb = _rows_with_both(outputs, a, b, fa, fb)
            losses[f"{pair_name(a, b)}_loss"] = w * clip_loss(fa, fb, logit_scale_for(outputs, a, b), gather)
        return losses


def check_modalities(loss: nn.Module, modalities: Sequence[str]) -> None:
    """Fail before training when the loss couples a modality that no tower encodes."""
    pairs = [tuple(p) for p in getattr(loss, "pairs", None) or []]
    missing = sorted({m for p in pairs for m in p} - set(modalities))
    if missing:
        mods = list(modalities)
        usable = [f"[{a},{b}]" for i, a in enumerate(mods) for b in mods[i + 1 :]]
        raise ValueError(
            f"the loss ({type(loss).__name__}) couples the pairs {_names(pairs)}, but no tower of the model "
            f"encodes {_names(missing)} (the model's towers: {_names(mods)}). Fix: add a tower for "
            f"{', '.join(missing)} to the model config (model.towers.{missing[0]} with modality: {missing[0]}, "
            f"or a model= preset that has one), or restrict the loss to the towers you have, "
            f"e.g. loss.pairs=[{usable[0] if usable else '[a,b]'}]."
        )


def _names(items) -> str:
    return "[" + ", ".join(_names(i) if isinstance(i, (list, tuple)) else str(i) for i in items) + "]"


def _rows_with_both(outputs, a, b, fa, fb):
    mask_a, mask_b = outputs.get(f"{a}_mask"), outputs.get(f"{b}_mask")
    if mask_a is None and mask_b is None:
        return fa, fb
    keep = torch.ones(fa.shape[0], dtype=torch.bool, device=fa.device)
    for m in (mask_a, mask_b):
        if m is not None:
            keep &= m.bool()
    return fa[keep], fb[keep]
