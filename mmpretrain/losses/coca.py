"""CoCa: a contrastive loss (InfoNCE or SigLIP, with all their options) plus the captioning loss of the
model's caption decoder: ``{"contrastive_loss", "caption_loss"}``, weighted (open_clip's defaults 1, 2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmpretrain.losses.infonce import InfoNCE
from mmpretrain.losses.siglip import SigLIP
from mmpretrain.runtime import distributed

CONTRASTIVE = {"infonce": InfoNCE, "siglip": SigLIP}
_INFONCE_DEFAULTS = {"tiled": False, "tile_size": 2048, "hard_negatives": False, "max_negatives": 1}


def caption_loss(nll: torch.Tensor, tokens: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Token cross-entropy of the batch: the per-sample summed NLLs over the number of caption tokens.

    Under DDP the token count is summed over ranks (no gradient flows through it) and the local sum
    is scaled by the world size, which DDP's gradient averaging divides out: the value averaged over
    ranks, and the gradient, are those of the global batch's mean token cross-entropy."""
    count = tokens.sum().to(nll.dtype)
    world = distributed.world_size() if gather else 1
    if world > 1:
        count = distributed.all_reduce_sum(count.detach().reshape(1)).reshape(())
    return nll.sum() * world / count.clamp(min=1)


class CoCa(nn.Module):
    """``contrastive_weight`` x the contrastive loss (``contrastive``: infonce | siglip, built with
    ``options``: pairs, weights, tiled, hard_negatives, ...) + ``caption_weight`` x :func:`caption_loss`.

    The model must have a caption decoder (``loss=coca`` gives it one: ``model.decoder``), whose
    per-sample ``caption_nll``/``caption_tokens`` outputs this reads."""

    def __init__(
        self,
        contrastive: str = "infonce",
        contrastive_weight: float = 1.0,
        caption_weight: float = 2.0,
        pairs: Sequence[Sequence[str]] = (("image", "text"),),
        **options: Any,
    ):
        super().__init__()
        if contrastive not in CONTRASTIVE:
            raise ValueError(f"loss.contrastive={contrastive!r} is unknown; use one of {sorted(CONTRASTIVE)}")
        if contrastive == "siglip":  # SigLIP has none of InfoNCE's options: only their defaults pass
            set_ = {k: v for k, v in options.items() if k != "weights" and v != _INFONCE_DEFAULTS.get(k)}
            if set_:
                raise ValueError(f"loss.contrastive=siglip has no options {sorted(set_)} (InfoNCE's)")
            options = {"weights": options.get("weights")}
        self.contrastive = CONTRASTIVE[contrastive](pairs=pairs, **options)
        self.contrastive_weight, self.caption_weight = float(contrastive_weight), float(caption_weight)

    @property
    def pairs(self) -> list[tuple[str, ...]]:
        return self.contrastive.pairs

    @property
    def hard_negatives(self) -> bool:
        return bool(getattr(self.contrastive, "hard_negatives", False))

    @property
    def max_negatives(self) -> int:
        return int(getattr(self.contrastive, "max_negatives", 1))

    def forward(self, outputs: dict[str, torch.Tensor], gather: bool = True) -> dict[str, torch.Tensor]:
        if "caption_nll" not in outputs:
            raise KeyError(
                "loss=coca needs the model's caption terms (caption_nll), but the model gave none: it has "
                "no caption decoder (set model.decoder, which loss=coca does), or the batch lacks image "
                "and caption in every row (data.on_missing=partial is not supported with loss=coca)"
            )
        terms = self.contrastive(outputs, gather)
        out = {"contrastive_loss": self.contrastive_weight * sum(terms.values())}
        out["caption_loss"] = self.caption_weight * caption_loss(
            outputs["caption_nll"], outputs["caption_tokens"], gather
        )
        return out

    def full_set(self, outputs: dict[str, torch.Tensor], a: str, b: str) -> dict[str, torch.Tensor]:
        """The contrastive loss over a whole val set (:meth:`InfoNCE.full_set` / :meth:`SigLIP.full_set`)."""
        return self.contrastive.full_set(outputs, a, b)
