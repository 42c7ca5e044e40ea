"""What every contrastive objective shares: the pairs of modalities it couples, their weights, the
temperature of a pair, the rows of a partial batch that carry both, and the check that every
modality of the loss has a tower."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn


def pair_name(a: str, b: str) -> str:
    return f"{a}_{b}"


def logit_scale_for(outputs: dict[str, torch.Tensor], a: str, b: str) -> torch.Tensor:
    """The pair's own ``logit_scale_<a>_<b>`` when the model has per-pair temperatures, else the shared
    one."""
    return outputs.get(f"logit_scale_{pair_name(a, b)}", outputs.get("logit_scale"))


def rows_with_both(outputs: dict[str, torch.Tensor], a: str, b: str) -> torch.Tensor | None:
    """``[B]`` bool: rows carrying both modalities (from ``<m>_mask``), or None when all do."""
    masks = [outputs[f"{m}_mask"].bool() for m in (a, b) if outputs.get(f"{m}_mask") is not None]
    if not masks:
        return None
    return masks[0] & masks[1] if len(masks) == 2 else masks[0]


class PairLoss(nn.Module):
    """A weighted sum over configured modality pairs: ``pairs`` ``[[a, b], ...]``, ``weights`` one float
    per pair (default 1). Subclasses compute one pair's term; a pair whose features the batch lacks is
    skipped."""

    def __init__(
        self, pairs: Sequence[Sequence[str]] = (("image", "text"),), weights: Sequence[float] | None = None
    ):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.pairs)
        if len(self.weights) != len(self.pairs):
            raise ValueError(f"loss.weights has {len(self.weights)} entries for {len(self.pairs)} pairs")

    def present_pairs(
        self, outputs: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, str, float, torch.Tensor, torch.Tensor]]:
        """``(a, b, weight, a_features, b_features)`` of each configured pair the outputs carry."""
        for (a, b), w in zip(self.pairs, self.weights):
            fa, fb = outputs.get(f"{a}_features"), outputs.get(f"{b}_features")
            if fa is not None and fb is not None:
                yield a, b, w, fa, fb


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
            f"{', '.join(missing)} to the model config (model.towers.{missing[0]} with modality: "
            f"{missing[0]}, or a model= preset that has one), or restrict the loss to the towers you have, "
            f"e.g. loss.pairs=[{usable[0] if usable else '[a,b]'}]."
        )


def _names(items) -> str:
    return "[" + ", ".join(_names(i) if isinstance(i, (list, tuple)) else str(i) for i in items) + "]"
