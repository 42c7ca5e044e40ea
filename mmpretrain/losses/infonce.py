"""CLIP's InfoNCE (with partial-batch masks and NegCLIP hard negatives): features in,
``{"<a>_<b>_loss": tensor}`` out; its full-set form for validation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mmpretrain.losses.pairs import PairLoss, logit_scale_for, pair_name, rows_with_both
from mmpretrain.losses.tiled import DEFAULT_TILE, tiled_clip_loss, tiled_cross_entropy
from mmpretrain.runtime import distributed


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
    result equals the unmasked loss over only the valid samples of the global batch. Without
    ``valid`` no masking work is done. Under DDP the ranks must agree on passing ``valid`` or not
    (the masked path gathers one tensor more): the training step gives every rank masks when the
    data stream can yield partial batches.
    """
    world = distributed.world_size() if gather else 1
    if valid is None:
        return _clip_loss_all_valid(a, b, logit_scale, gather and world > 1)
    valid = valid.bool()
    if world > 1:
        all_a, all_b = distributed.gather_with_grad(a), distributed.gather_with_grad(b)
        all_valid = distributed.all_gather(valid.to(torch.uint8)).bool()
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


def _clip_loss_all_valid(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, gather: bool
) -> torch.Tensor:
    """Every row valid (the default): open_clip's loss, no masking work and no extra collective.

    Under DDP the local rows score against the gathered columns with labels offset by rank; the
    mean over local rows, averaged over ranks by DDP, is the mean over the global batch.
    """
    labels = torch.arange(a.shape[0], device=a.device)
    if gather:
        all_a, all_b = distributed.gather_with_grad(a), distributed.gather_with_grad(b)
        labels = labels + distributed.rank() * a.shape[0]
    else:
        all_a, all_b = a, b
    logits_ab = logit_scale * a @ all_b.T
    logits_ba = logit_scale * b @ all_a.T
    return (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels)) / 2


def negclip_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    negatives: torch.Tensor,
    negatives_valid: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: bool = True,
) -> torch.Tensor:
    """CLIP's InfoNCE with hard negative captions in the ``a -> b`` softmax only (NegCLIP).

    ``a`` ``[B, D]`` (images), ``b`` ``[B, D]`` (their captions), ``negatives`` ``[B, M, D]`` (captions
    that do not match; row i's come from sample i) with ``negatives_valid`` ``[B, M]`` (False: padding).
    Every ``a`` row scores against all captions of the global batch AND all its valid negatives
    (``[B, B + B*M]`` logits; padding columns are masked out); ``b -> a`` is CLIP's. Under DDP the
    negatives are gathered with gradient like the captions, so the summed gradient over ranks is
    the single-process gradient of the global batch.
    """
    neg, valid = negatives.flatten(0, 1), negatives_valid.flatten().bool()
    labels = torch.arange(a.shape[0], device=a.device)
    if gather and distributed.world_size() > 1:
        all_a, all_b = distributed.gather_with_grad(a), distributed.gather_with_grad(b)
        all_neg, all_valid = (
            distributed.gather_with_grad(neg),
            distributed.all_gather(valid.to(torch.uint8)).bool(),
        )
        labels = labels + distributed.rank() * a.shape[0]
    else:
        all_a, all_b, all_neg, all_valid = a, b, neg, valid
    logits_ab = logit_scale * a @ torch.cat([all_b, all_neg]).T
    columns = torch.cat([torch.ones(all_b.shape[0], dtype=torch.bool, device=a.device), all_valid])
    # A finite fill (not -inf): the padding gets no probability and no gradient.
    logits_ab = logits_ab.masked_fill(~columns[None, :], torch.finfo(logits_ab.dtype).min)
    logits_ba = logit_scale * b @ all_a.T
    return (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels)) / 2


def multi_positive_loss(
    a: torch.Tensor,
    captions: torch.Tensor,
    captions_valid: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: bool = True,
    negatives: torch.Tensor | None = None,
    negatives_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's InfoNCE with several captions of each image in the same step (multi-positive).

    ``a`` ``[B, D]`` (images), ``captions`` ``[B, K, D]`` (row i's K captions; column 0 always valid),
    ``captions_valid`` ``[B, K]``. Every valid (image, caption) pair is a positive pair of its own:
    ``a -> b``, the image scores against that caption and every caption of the OTHER images of the
    global batch (its own other captions are neither positives nor negatives of this pair), plus the
    image's hard negatives when ``negatives`` ``[B, M, D]`` are given (NegCLIP); ``b -> a``, each
    caption scores against every image (CLIP's). The loss is the mean over the global batch's valid
    pairs of both directions, so K=1 is :func:`clip_loss` (and with negatives :func:`negclip_loss`)
    exactly. Under DDP everything is gathered with gradient, so the summed gradient over ranks is the
    single-process gradient of the global batch.
    """
    rows, k = captions.shape[:2]
    flat, valid = captions.flatten(0, 1), captions_valid.flatten().bool()
    world = distributed.world_size() if gather else 1
    if world > 1:
        all_a, all_c = distributed.gather_with_grad(a), distributed.gather_with_grad(flat)
        all_valid = distributed.all_gather(valid.to(torch.uint8)).bool()
        first = distributed.rank() * rows
    else:
        all_a, all_c, all_valid, first = a, flat, valid, 0
    owner = torch.arange(all_c.shape[0], device=a.device) // k  # the global image of each caption
    mine = torch.arange(rows, device=a.device) + first
    logits = logit_scale * a @ all_c.T  # [B, N*K]
    fill = torch.finfo(logits.dtype).min  # finite: no NaN in the backward of a fully masked row
    negative = all_valid[None, :] & (owner[None, :] != mine[:, None])
    others = logits.masked_fill(~negative, fill)
    if negatives is not None:
        neg = negatives.flatten(0, 1)
        neg_valid = negatives_valid.flatten().bool()
        if world > 1:
            neg, neg_valid = (
                distributed.gather_with_grad(neg),
                distributed.all_gather(neg_valid.to(torch.uint8)).bool(),
            )
        hard = (logit_scale * a @ neg.T).masked_fill(~neg_valid[None, :], fill)
        others = torch.cat([others, hard], dim=1)
    positives = logits.gather(1, (mine[:, None] * k + torch.arange(k, device=a.device)[None, :]))  # [B, K]
    image_to_text = torch.logaddexp(torch.logsumexp(others, dim=1, keepdim=True), positives) - positives
    text_to_image = F.cross_entropy(
        logit_scale * flat @ all_a.T, mine.repeat_interleave(k), reduction="none"
    )  # [B*K]
    total = (image_to_text.flatten() * valid).sum() + (text_to_image * valid).sum()
    return total * world / (2 * all_valid.sum().clamp(min=1))


class InfoNCE(PairLoss):
    """Weighted sum of CLIP InfoNCE over configured modality pairs (:class:`PairLoss`); when a batch
    carries ``<modality>_mask`` only rows holding both modalities enter that pair's loss.

    ``tiled``: the same value and gradients from :func:`tiled_clip_loss`, memory linear in the global
    batch. A batch carrying ``text_positives_features`` (``data.captions_per_sample`` > 1) trains a
    pair with text on :func:`multi_positive_loss` (with the hard negatives when they train).
    ``hard_negatives``: a pair with text whose batch carries ``text_negatives_features`` uses
    :func:`negclip_loss`; ``max_negatives`` is read by the data stream (negatives drawn per sample per
    pass), not here.
    """

    def __init__(
        self,
        pairs: Sequence[Sequence[str]] = (("image", "text"),),
        weights: Sequence[float] | None = None,
        tiled: bool = False,
        tile_size: int = 2048,
        hard_negatives: bool = False,
        max_negatives: int = 1,
    ):
        super().__init__(pairs, weights)
        self.hard_negatives, self.max_negatives = bool(hard_negatives), int(max_negatives)
        self.tiled, self.tile_size = bool(tiled), int(tile_size)

    def pair_loss(self, fa, fb, logit_scale, gather: bool, valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.tiled:
            if valid is not None:
                raise ValueError(
                    "loss.tiled=true does not support partial-pair batches (a <modality>_mask in the batch); "
                    "use data.on_missing=skip, or loss.tiled=false which masks absent rows exactly"
                )
            return tiled_clip_loss(fa, fb, logit_scale, gather, self.tile_size)
        return clip_loss(fa, fb, logit_scale, gather, valid)

    def forward(self, outputs: dict[str, torch.Tensor], gather: bool = True) -> dict[str, torch.Tensor]:
        losses = {}
        for a, b, w, fa, fb in self.present_pairs(outputs):
            valid = rows_with_both(outputs, a, b)
            scale = logit_scale_for(outputs, a, b)
            negatives = (
                outputs.get("text_negatives_features") if self.hard_negatives and "text" in (a, b) else None
            )
            positives = outputs.get("text_positives_features") if "text" in (a, b) else None
            option = (
                "data.captions_per_sample>1"
                if positives is not None
                else "loss.hard_negatives=true"
                if negatives is not None
                else None
            )
            if option and (valid is not None or self.tiled):
                raise ValueError(
                    f"{option} supports neither partial-pair batches (data.on_missing=partial) "
                    "nor loss.tiled=true"
                )
            query, first = (fb, fa) if a == "text" else (fa, fb)
            if positives is not None:
                captions = torch.cat([first[:, None], positives], dim=1)
                captions_valid = torch.cat(
                    [torch.ones_like(first[:, :1], dtype=torch.bool), outputs["text_positives_mask"]], dim=1
                )
                negatives_valid = outputs.get("text_negatives_mask") if negatives is not None else None
                value = multi_positive_loss(
                    query, captions, captions_valid, scale, gather, negatives, negatives_valid
                )
            elif negatives is not None:
                value = negclip_loss(query, first, negatives, outputs["text_negatives_mask"], scale, gather)
            else:
                value = self.pair_loss(fa, fb, scale, gather, valid)
            losses[f"{pair_name(a, b)}_loss"] = w * value
        return losses

    def full_set(self, outputs: dict[str, torch.Tensor], a: str, b: str) -> dict[str, torch.Tensor]:
        """The pair ``{a, b}``'s loss over a whole val set given as one batch (identical on every rank),
        :func:`split_clip_loss`: memory O(N x tile), the tiles shared among ranks."""
        out = {}
        for (x, y), w in zip(self.pairs, self.weights):
            if {x, y} == {a, b}:
                scale = logit_scale_for(outputs, x, y)
                value = split_clip_loss(
                    outputs[f"{x}_features"], outputs[f"{y}_features"], scale, self.tile_size
                )
                out[f"{pair_name(x, y)}_loss"] = w * value
        return out


def split_clip_loss(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, tile: int = DEFAULT_TILE
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE of ``a``/``b`` (identical on every rank), tiled.

    The rows are cut into blocks of ``tile`` at the same places whatever the world size; each rank
    takes its share of the blocks, sums their cross-entropies (both directions) in float64, and the
    sums are all-reduced: the same value, to float32 rounding, on 1 rank or many."""
    n = a.shape[0]
    starts = range(0, n, tile)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in starts[distributed.share(len(starts))]:
        rows = slice(start, min(start + tile, n))
        for q, k in ((a, b), (b, a)):
            total += tiled_cross_entropy(q[rows], k, scale, start, tile).double() * (rows.stop - rows.start)
    return (distributed.all_reduce_sum(total) / (2 * n)).float()
