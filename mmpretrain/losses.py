"""Contrastive losses: features in, ``{"<name>_loss": tensor}`` out.

A loss reads the model's output dict (``<modality>_features``, ``logit_scale`` or
``logit_scale_<a>_<b>``, optional ``<modality>_mask``) and returns one ``*_loss`` term per
modality pair. The training step sums the terms, so a new objective never edits the step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def _clip_loss_all_valid(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, gather: bool) -> torch.Tensor:
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
        all_neg, all_valid = distributed.gather_with_grad(neg), distributed.all_gather(valid.to(torch.uint8)).bool()
        labels = labels + distributed.rank() * a.shape[0]
    else:
        all_a, all_b, all_neg, all_valid = a, b, neg, valid
    logits_ab = logit_scale * a @ torch.cat([all_b, all_neg]).T
    columns = torch.cat([torch.ones(all_b.shape[0], dtype=torch.bool, device=a.device), all_valid])
    # A finite fill (not -inf): the padding gets no probability and no gradient.
    logits_ab = logits_ab.masked_fill(~columns[None, :], torch.finfo(logits_ab.dtype).min)
    logits_ba = logit_scale * b @ all_a.T
    return (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels)) / 2


class InfoNCE(nn.Module):
    """Weighted sum of CLIP InfoNCE over configured modality pairs.

    ``pairs`` is a list of ``[a, b]`` modality names; ``weights`` one float per pair (default 1).
    Pairs whose features are absent from a batch are skipped; when a batch carries a
    ``<modality>_mask`` only rows holding both modalities enter that pair's loss.

    ``hard_negatives``: a pair with text whose batch carries ``text_negatives_features`` (the model
    encodes the batch's ``text_negatives``) uses :func:`negclip_loss`, the other modality's softmax
    over captions getting the negatives. ``max_negatives`` is read by the data stream (negatives
    drawn per sample per pass), not here.
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
        super().__init__()
        self.hard_negatives, self.max_negatives = bool(hard_negatives), int(max_negatives)
        self.pairs = [tuple(p) for p in pairs]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.pairs)
        if len(self.weights) != len(self.pairs):
            raise ValueError(f"loss.weights has {len(self.weights)} entries for {len(self.pairs)} pairs")
        # tiled: same value and gradients, memory linear in the global batch (see tiled_clip_loss)
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
        for (a, b), w in zip(self.pairs, self.weights):
            fa, fb = outputs.get(f"{a}_features"), outputs.get(f"{b}_features")
            if fa is None or fb is None:
                continue
            valid = rows_with_both(outputs, a, b)
            scale = logit_scale_for(outputs, a, b)
            negatives = outputs.get("text_negatives_features") if self.hard_negatives and "text" in (a, b) else None
            if negatives is not None:
                if valid is not None or self.tiled:
                    raise ValueError("loss.hard_negatives=true supports neither partial-pair batches "
                                     "(data.on_missing=partial) nor loss.tiled=true")
                query, captions = (fb, fa) if a == "text" else (fa, fb)
                value = negclip_loss(query, captions, negatives, outputs["text_negatives_mask"], scale, gather)
            else:
                value = self.pair_loss(fa, fb, scale, gather, valid)
            losses[f"{pair_name(a, b)}_loss"] = w * value
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


def rows_with_both(outputs: dict[str, torch.Tensor], a: str, b: str) -> torch.Tensor | None:
    """``[B]`` bool: rows carrying both modalities (from ``<m>_mask``), or None when all do."""
    masks = [outputs[f"{m}_mask"].bool() for m in (a, b) if outputs.get(f"{m}_mask") is not None]
    if not masks:
        return None
    return masks[0] & masks[1] if len(masks) == 2 else masks[0]


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


# -- memory-tiled InfoNCE ------------------------------------------------------------------------
DEFAULT_TILE = 2048


class _TiledCrossEntropy(torch.autograd.Function):
    """``mean_i CE(scale * q_i @ k.T, offset + i)`` without ever holding more than a tile of logits.

    Forward: an online log-sum-exp over column tiles gives each row's ``lse``; only ``lse``
    (``[B]``) is saved. Backward recomputes each tile of logits, forms ``softmax - onehot`` from
    the saved ``lse`` and accumulates ``dq``, ``dk`` and ``dscale`` tile by tile. Peak memory is
    ``O((B + N) * D + tile²)`` instead of ``O(B * N)``.
    """

    @staticmethod
    def forward(ctx, q, k, scale, offset: int, tile: int):
        # float32 throughout, also under bf16 autocast (tiles are small; features are linear)
        ctx.dtypes = q.dtype, k.dtype, scale.dtype
        q, k, scale = q.float(), k.float(), scale.float()
        with torch.autocast(q.device.type, enabled=False):
            lse, positive = _tiled_lse(q, k, scale, offset, tile)
        ctx.save_for_backward(q, k, scale, lse)
        ctx.offset, ctx.tile = offset, tile
        return (lse - positive).mean()

    @staticmethod
    def backward(ctx, grad_out):
        q, k, scale, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dscale = _tiled_grads(q, k, scale, lse, grad_out.float(), ctx.offset, ctx.tile)
        dq_type, dk_type, scale_type = ctx.dtypes
        return dq.to(dq_type), dk.to(dk_type), dscale.to(scale_type).reshape(scale.shape), None, None


def _tiled_lse(q, k, scale, offset: int, tile: int):
    """Per-row log-sum-exp of ``scale * q @ k.T`` (online over column tiles) and positive logit."""
    rows, n, s = q.shape[0], k.shape[0], scale  # a 0-d tensor: no host read of the temperature
    lse = torch.empty(rows, dtype=torch.float32, device=q.device)
    positive = s * (q * k[offset : offset + rows]).sum(dim=1)
    for r0 in range(0, rows, tile):
        qr = q[r0 : r0 + tile]
        run_max = torch.full((qr.shape[0],), -math.inf, dtype=torch.float32, device=q.device)
        run_sum = torch.zeros(qr.shape[0], dtype=torch.float32, device=q.device)
        for c0 in range(0, n, tile):
            logits = (qr @ k[c0 : c0 + tile].T).mul_(s)
            new_max = torch.maximum(run_max, logits.max(dim=1).values)
            run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(dim=1)
            run_max = new_max
        lse[r0 : r0 + tile] = run_max + torch.log(run_sum)
    return lse, positive


def _tiled_grads(q, k, scale, lse, grad_out, offset: int, tile: int):
    """``d mean_i(lse_i - positive_i) / d(q, k, scale)``: tiles of ``softmax - onehot``."""
    rows, n, s = q.shape[0], k.shape[0], scale
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    dscale = torch.zeros((), dtype=torch.float32, device=q.device)
    w = grad_out / rows
    for r0 in range(0, rows, tile):
        qr = q[r0 : r0 + tile]
        for c0 in range(0, n, tile):
            kc = k[c0 : c0 + tile]
            dots = qr @ kc.T
            g = (dots * s).sub_(lse[r0 : r0 + tile, None]).exp_()  # softmax rows
            # minus the one-hot of the positives that fall into this column tile
            _positives(g, offset + r0 - c0).sub_(1.0)
            g.mul_(w)
            dscale += g.flatten() @ dots.flatten()
            g.mul_(s)  # addmm's alpha would need a Python number (a host read of the scale)
            dq[r0 : r0 + tile].addmm_(g, kc)
            dk[c0 : c0 + tile].addmm_(g.T, qr)
    return dq, dk, dscale


def _positives(tile: torch.Tensor, shift: int) -> torch.Tensor:
    """The entries ``(i, i + shift)`` of a logits tile (row i's positive column), as a view: the
    bounds are host integers, so no boolean indexing (a host sync per tile)."""
    lo, hi = max(0, -shift), min(tile.shape[0], tile.shape[1] - shift)
    if hi <= lo:
        return tile.new_empty(0)
    return tile[lo:hi, lo + shift : hi + shift].diagonal()


class _TiledSymmetricCE(torch.autograd.Function):
    """Both directions of the single-process CLIP loss from one pass over the tiles.

    ``(CE(s a b^T, i) + CE(s b a^T, i)) / 2``: the second direction's logits are the transpose
    of the first's, so each tile serves a row log-sum-exp (image->text) and a column one
    (text->image) at once: half the work of two :class:`_TiledCrossEntropy` calls.
    """

    @staticmethod
    def forward(ctx, a, b, scale, tile: int):
        ctx.dtypes = a.dtype, b.dtype, scale.dtype
        a, b, scale = a.float(), b.float(), scale.float()
        with torch.autocast(a.device.type, enabled=False):
            n, s = a.shape[0], scale
            row_lse = torch.empty(n, dtype=torch.float32, device=a.device)
            col_max = torch.full((n,), -math.inf, dtype=torch.float32, device=a.device)
            col_sum = torch.zeros(n, dtype=torch.float32, device=a.device)
            for r0 in range(0, n, tile):
                ar = a[r0 : r0 + tile]
                run_max = torch.full((ar.shape[0],), -math.inf, dtype=torch.float32, device=a.device)
                run_sum = torch.zeros(ar.shape[0], dtype=torch.float32, device=a.device)
                for c0 in range(0, n, tile):
                    logits = (ar @ b[c0 : c0 + tile].T).mul_(s)
                    new_row = torch.maximum(run_max, logits.max(dim=1).values)
                    new_col = torch.maximum(col_max[c0 : c0 + tile], logits.max(dim=0).values)
                    run_sum = run_sum * torch.exp(run_max - new_row) + torch.exp(logits - new_row[:, None]).sum(dim=1)
                    col_sum[c0 : c0 + tile] = col_sum[c0 : c0 + tile] * torch.exp(col_max[c0 : c0 + tile] - new_col) + (
                        logits.sub_(new_col[None, :]).exp_().sum(dim=0)
                    )
                    run_max, col_max[c0 : c0 + tile] = new_row, new_col
                row_lse[r0 : r0 + tile] = run_max + torch.log(run_sum)
            col_lse = col_max + torch.log(col_sum)
            positive = s * (a * b).sum(dim=1)
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.tile = tile
        return ((row_lse - positive).mean() + (col_lse - positive).mean()) / 2

    @staticmethod
    def backward(ctx, grad_out):
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        n, s, tile = a.shape[0], scale, ctx.tile
        with torch.autocast(a.device.type, enabled=False):
            da, db = torch.zeros_like(a), torch.zeros_like(b)
            dscale = torch.zeros((), dtype=torch.float32, device=a.device)
            w = grad_out.float() / (2 * n)
            for r0 in range(0, n, tile):
                ar = a[r0 : r0 + tile]
                for c0 in range(0, n, tile):
                    bc = b[c0 : c0 + tile]
                    dots = ar @ bc.T
                    logits = dots * s
                    g = (logits - row_lse[r0 : r0 + tile, None]).exp_()
                    g += logits.sub_(col_lse[None, c0 : c0 + tile]).exp_()
                    _positives(g, r0 - c0).sub_(2.0)
                    g.mul_(w)
                    dscale += g.flatten() @ dots.flatten()
                    g.mul_(s)
                    da[r0 : r0 + tile].addmm_(g, bc)
                    db[c0 : c0 + tile].addmm_(g.T, ar)
        a_type, b_type, scale_type = ctx.dtypes
        return da.to(a_type), db.to(b_type), dscale.to(scale_type).reshape(scale.shape), None


def tiled_cross_entropy(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, offset: int = 0, tile: int = DEFAULT_TILE):
    """Exact ``F.cross_entropy(scale * q @ k.T, arange(len(q)) + offset)``, memory-tiled."""
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=q.device)
    if offset + q.shape[0] > k.shape[0]:
        raise ValueError(f"positives {offset}..{offset + q.shape[0]} lie outside the {k.shape[0]} keys")
    return _TiledCrossEntropy.apply(q, k, scale, int(offset), int(tile))


def tiled_clip_loss(a, b, logit_scale, gather: bool = True, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """:func:`clip_loss` with the same value and gradients, computed tile by tile."""
    if not gather or distributed.world_size() == 1:
        if not torch.is_tensor(logit_scale):
            logit_scale = torch.tensor(float(logit_scale), device=a.device)
        return _TiledSymmetricCE.apply(a, b, logit_scale, int(tile))
    all_a, all_b = distributed.gather_with_grad(a), distributed.gather_with_grad(b)
    offset = distributed.rank() * a.shape[0]
    return (tiled_cross_entropy(a, all_b, logit_scale, offset, tile) + tiled_cross_entropy(b, all_a, logit_scale, offset, tile)) / 2


# -- SigLIP ---------------------------------------------------------------------------------------
def _sigmoid_block(a, b, scale, bias, positives: bool) -> torch.Tensor:
    """Summed ``-log σ(z_ij (scale a_i·b_j + bias))``; z = +1 on the diagonal when ``positives``."""
    logits = scale * a @ b.T + bias
    signs = -torch.ones_like(logits)
    if positives:
        signs.diagonal().fill_(1.0)
    return -F.logsigmoid(signs * logits).sum()


def siglip_loss(a, b, logit_scale, logit_bias, gather: bool = True) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of this rank's ``a`` rows against the global ``b``, / local rows.

    Under DDP the ``b`` blocks travel round the ring of ranks (one neighbour exchange per step,
    differentiable), so no rank ever holds the global logits, nor even all of ``b`` at once
    beyond what autograd saves. The per-rank losses average (DDP) to the global loss.
    """
    loss = _sigmoid_block(a, b, logit_scale, logit_bias, positives=True)
    if gather:
        block = b
        for _ in range(distributed.world_size() - 1):
            block = distributed.pass_to_next_rank(block)
            loss = loss + _sigmoid_block(a, block, logit_scale, logit_bias, positives=False)
    return loss / a.shape[0]


class SigLIP(nn.Module):
    """Sigmoid loss (SigLIP) over configured modality pairs; reads ``logit_bias`` from the model.

    The model must be built with ``model.init_logit_bias`` (``loss=siglip`` sets it to -10 and
    ``model.init_logit_scale`` to ln 10). Masks select rows as for :class:`InfoNCE`.
    """

    def __init__(self, pairs: Sequence[Sequence[str]] = (("image", "text"),), weights: Sequence[float] | None = None):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.pairs)
        if len(self.weights) != len(self.pairs):
            raise ValueError(f"loss.weights has {len(self.weights)} entries for {len(self.pairs)} pairs")

    def forward(self, outputs: dict[str, torch.Tensor], gather: bool = True) -> dict[str, torch.Tensor]:
        if "logit_bias" not in outputs:
            raise KeyError(
                "SigLIP needs a learnable bias but the model outputs no 'logit_bias'; "
                "build the model with model.init_logit_bias=-10 (loss=siglip sets it)"
            )
        losses = {}
        for (a, b), w in zip(self.pairs, self.weights):
            fa, fb = outputs.get(f"{a}_features"), outputs.get(f"{b}_features")
            if fa is None or fb is None:
                continue
            fa, fb = _rows_with_both(outputs, a, b, fa, fb)
            scale = logit_scale_for(outputs, a, b)
            losses[f"{pair_name(a, b)}_loss"] = w * siglip_loss(fa, fb, scale, outputs["logit_bias"], gather)
        return losses
