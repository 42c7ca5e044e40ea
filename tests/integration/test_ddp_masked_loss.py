"""Masked InfoNCE under 2 gloo processes equals the 1-process loss over only the complete rows.

Ranks hold different numbers of complete rows (one rank none at all for one pair): the masked loss
keeps shapes equal on every rank, so the gathers match, and loss and gradients equal the
single-process loss of the valid samples of the global batch (the old row filter would hang or
gather mismatched sizes here).
"""

import torch
import torch.distributed as dist
from torch import nn

from mmpretrain.losses import InfoNCE
from tests.integration.gloo import gloo_group, run_workers

# 8 rows, 4 per rank. audio is present on rank 0 only; image misses rows 1 and 6.
IMAGE_MASK = torch.tensor([1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
AUDIO_MASK = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
PAIRS = [["image", "text"], ["audio", "text"]]


def make_problem():
    g = torch.Generator().manual_seed(0)
    encs = {"image": nn.Linear(6, 4), "text": nn.Linear(5, 4), "audio": nn.Linear(3, 4)}
    with torch.no_grad():
        for enc in encs.values():
            for p in enc.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    xs = {
        "image": torch.randn(8, 6, generator=g),
        "text": torch.randn(8, 5, generator=g),
        "audio": torch.randn(8, 3, generator=g),
    }
    return encs, xs


def params(encs):
    return [p for m in ("image", "text", "audio") for p in encs[m].parameters()]


def masked_loss_and_grads(rows):
    """The masked loss on the given rows (a rank's slice, or all 8 in one process)."""
    encs, xs = make_problem()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    out = {f"{m}_features": nn.functional.normalize(encs[m](xs[m][rows]), dim=-1) for m in xs}
    out |= {"image_mask": IMAGE_MASK[rows], "audio_mask": AUDIO_MASK[rows], "logit_scale": scale}
    terms = InfoNCE(pairs=PAIRS)(out)
    loss = sum(terms.values())
    loss.backward()
    return torch.stack([t.detach() for t in terms.values()]), [p.grad for p in params(encs)] + [scale.grad]


def reference_on_valid_rows():
    """Single process, rows filtered per pair: the definition the masked loss must reproduce."""
    encs, xs = make_problem()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    feats = {m: nn.functional.normalize(encs[m](xs[m]), dim=-1) for m in xs}
    terms = []
    for (a, b), mask in zip(PAIRS, (IMAGE_MASK, AUDIO_MASK)):
        out = {f"{a}_features": feats[a][mask], f"{b}_features": feats[b][mask], "logit_scale": scale}
        terms.append(InfoNCE(pairs=[[a, b]])(out)[f"{a}_{b}_loss"])
    sum(terms).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params(encs)] + [scale.grad]
    return torch.stack([t.detach() for t in terms]), grads


def worker(rank, world, port, queue):
    with gloo_group(rank, world, port):
        n = 8 // world
        losses, grads = masked_loss_and_grads(slice(rank * n, (rank + 1) * n))
        for g in grads:  # DDP averages parameter gradients over ranks
            dist.all_reduce(g)
            g /= world
        dist.all_reduce(losses)
        if rank == 0:  # numpy pickles by value: no shared-memory handle that dies with this process
            queue.put(((losses / world).numpy(), [g.numpy() for g in grads]))


def test_masked_loss_single_process_equals_filtered_reference():
    losses, grads = masked_loss_and_grads(slice(0, 8))
    ref_losses, ref_grads = reference_on_valid_rows()
    assert torch.allclose(losses, ref_losses, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6)


def test_two_process_masked_loss_equals_single_process_on_valid_rows():
    ref_losses, ref_grads = reference_on_valid_rows()
    ((losses, grads),) = run_workers(worker)
    losses, grads = torch.from_numpy(losses), [torch.from_numpy(g) for g in grads]
    assert torch.allclose(losses, ref_losses, atol=1e-6), (losses, ref_losses)
    for g, ref in zip(grads, ref_grads):
        assert torch.allclose(g, ref, atol=1e-6), (g - ref).abs().max()
