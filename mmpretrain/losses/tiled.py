"""Memory-tiled InfoNCE: the exact value and gradients of CLIP's loss without ever holding more than
a tile of logits (two hand-written autograd Functions; peak memory O((B + N) x D + tile^2))."""

from __future__ import annotations

import math

import torch

from mmpretrain.runtime import distributed

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
                    run_sum = run_sum * torch.exp(run_max - new_row) + torch.exp(
                        logits - new_row[:, None]
                    ).sum(dim=1)
                    col_sum[c0 : c0 + tile] = col_sum[c0 : c0 + tile] * torch.exp(
                        col_max[c0 : c0 + tile] - new_col
                    ) + (logits.sub_(new_col[None, :]).exp_().sum(dim=0))
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


def tiled_cross_entropy(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, offset: int = 0, tile: int = DEFAULT_TILE
):
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
    return (
        tiled_cross_entropy(a, all_b, logit_scale, offset, tile)
        + tiled_cross_entropy(b, all_a, logit_scale, offset, tile)
    ) / 2
