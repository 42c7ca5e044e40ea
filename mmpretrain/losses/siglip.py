"""SigLIP's pairwise sigmoid loss: features in, ``{"<a>_<b>_loss": tensor}`` out; its full-set form
for validation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mmpretrain.losses.pairs import PairLoss, logit_scale_for, pair_name, rows_with_both
from mmpretrain.losses.tiled import DEFAULT_TILE
from mmpretrain.runtime import distributed


def _sigmoid_block(a, b, scale, bias, positives: int | None) -> torch.Tensor:
    """Summed ``-log sigmoid(z_ij (scale a_i . b_j + bias))`` with z = +1 at the entries ``(i, i +
    positives)``
    (a's row i pairs with b's row i + positives; None: no positive in this block) and -1 elsewhere."""
    logits = scale * a @ b.T + bias
    signs = -torch.ones_like(logits)
    if positives is not None:
        rows = torch.arange(a.shape[0], device=a.device)
        signs[rows, positives + rows] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def siglip_loss(a, b, logit_scale, logit_bias, gather: bool = True) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of this rank's ``a`` rows against the global ``b``, / local rows.

    Under DDP the ``b`` blocks travel round the ring of ranks (one neighbour exchange per step,
    differentiable), so no rank ever holds the global logits, nor even all of ``b`` at once
    beyond what autograd saves. The per-rank losses average (DDP) to the global loss.
    """
    loss = _sigmoid_block(a, b, logit_scale, logit_bias, positives=0)
    if gather:
        block = b
        for _ in range(distributed.world_size() - 1):
            block = distributed.pass_to_next_rank(block)
            loss = loss + _sigmoid_block(a, block, logit_scale, logit_bias, positives=None)
    return loss / a.shape[0]


def split_siglip_loss(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, tile: int = DEFAULT_TILE
) -> torch.Tensor:
    """SigLIP's loss of ``a`` against ``b`` (identical on every rank; ``siglip_loss(gather=False)``),
    ``tile`` rows of logits at a time, each rank summing its share of the row blocks in float64."""
    n = a.shape[0]
    starts = range(0, n, tile)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in starts[distributed.share(len(starts))]:
        total += _sigmoid_block(a[start : start + tile], b, scale, bias, positives=start).double()
    return (distributed.all_reduce_sum(total) / n).float()


def _rows_with_both(outputs, a, b, fa, fb):
    """Filter to the rows carrying both modalities (single process only: shapes change)."""
    valid = rows_with_both(outputs, a, b)
    if valid is None:
        return fa, fb
    if distributed.world_size() > 1:
        raise ValueError(
            "SigLIP over partial-pair batches (data.on_missing=partial) is not supported under DDP; "
            "use data.on_missing=skip, or loss=infonce which masks absent rows exactly"
        )
    return fa[valid], fb[valid]


class SigLIP(PairLoss):
    """Sigmoid loss (SigLIP) over configured modality pairs (:class:`PairLoss`); reads ``logit_bias``.

    The model must be built with ``model.init_logit_bias`` (``loss=siglip`` sets it to -10 and
    ``model.init_logit_scale`` to ln 10). Masks select rows as for :class:`InfoNCE`.
    """

    def __init__(
        self, pairs: Sequence[Sequence[str]] = (("image", "text"),), weights: Sequence[float] | None = None
    ):
        super().__init__(pairs, weights)

    def forward(self, outputs: dict[str, torch.Tensor], gather: bool = True) -> dict[str, torch.Tensor]:
        if "logit_bias" not in outputs:
            raise KeyError(
                "SigLIP needs a learnable bias but the model outputs no 'logit_bias'; "
                "build the model with model.init_logit_bias=-10 (loss=siglip sets it)"
            )
        losses = {}
        for a, b, w, fa, fb in self.present_pairs(outputs):
            fa, fb = _rows_with_both(outputs, a, b, fa, fb)
            scale = logit_scale_for(outputs, a, b)
            losses[f"{pair_name(a, b)}_loss"] = w * siglip_loss(fa, fb, scale, outputs["logit_bias"], gather)
        return losses

    def full_set(self, outputs: dict[str, torch.Tensor], a: str, b: str) -> dict[str, torch.Tensor]:
        """The pair ``{a, b}``'s loss over a whole val set given as one batch (:func:`split_siglip_loss`)."""
        out = {}
        for (x, y), w in zip(self.pairs, self.weights):
            if {x, y} == {a, b}:
                fx, fy = outputs[f"{x}_features"], outputs[f"{y}_features"]
                scale = logit_scale_for(outputs, x, y)
                out[f"{pair_name(x, y)}_loss"] = w * split_siglip_loss(fx, fy, scale, outputs["logit_bias"])
        return out
