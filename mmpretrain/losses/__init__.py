"""Contrastive objectives: the model's output dict in, ``{"<name>_loss": tensor}`` out; the training
step sums the terms, so a new objective never edits the step.

``infonce`` (CLIP, NegCLIP), ``siglip``, ``coca`` (contrastive + captioning), ``tiled`` (memory-tiled
InfoNCE), ``pairs`` (what they share).
Each objective's ``full_set(outputs, a, b)`` is its loss over a whole validation set.

May import ``runtime.distributed`` only: no Lightning, no Hydra.
"""

from mmpretrain.losses.coca import CoCa, caption_loss
from mmpretrain.losses.infonce import InfoNCE, clip_loss, multi_positive_loss, negclip_loss, split_clip_loss
from mmpretrain.losses.pairs import check_modalities, logit_scale_for, pair_name, rows_with_both
from mmpretrain.losses.siglip import SigLIP, siglip_loss, split_siglip_loss
from mmpretrain.losses.tiled import DEFAULT_TILE, tiled_clip_loss, tiled_cross_entropy

__all__ = [
    "CoCa",
    "caption_loss",
    "DEFAULT_TILE",
    "InfoNCE",
    "SigLIP",
    "check_modalities",
    "clip_loss",
    "logit_scale_for",
    "multi_positive_loss",
    "negclip_loss",
    "pair_name",
    "rows_with_both",
    "siglip_loss",
    "split_clip_loss",
    "split_siglip_loss",
    "tiled_clip_loss",
    "tiled_cross_entropy",
]
