"""Under DDP the logit distillation term uses the global batch: the 2-process gloo gradient (averaged
over ranks, as DDP does) equals the 1-process gradient of the whole batch."""

import io

import torch
import torch.distributed as dist
from torch import nn

from mmpretrain.losses.distill import logit_distill_loss
from tests.integration.gloo import gloo_group, run_workers


def make_problem():
    g = torch.Generator().manual_seed(0)
    img_enc, txt_enc = nn.Linear(6, 4), nn.Linear(5, 4)
    with torch.no_grad():
        for p in list(img_enc.parameters()) + list(txt_enc.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    x_img, x_txt = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)
    teacher = [nn.functional.normalize(torch.randn(8, 3, generator=g), dim=-1) for _ in range(2)]
    return img_enc, txt_enc, x_img, x_txt, teacher


def loss_and_grads(rows: slice):
    img_enc, txt_enc, x_img, x_txt, (t_img, t_txt) = make_problem()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    a = nn.functional.normalize(img_enc(x_img[rows]), dim=-1)
    b = nn.functional.normalize(txt_enc(x_txt[rows]), dim=-1)
    loss = logit_distill_loss(a, b, scale, t_img[rows], t_txt[rows], torch.tensor(50.0))
    loss.backward()
    return loss.detach(), [p.grad for p in [*img_enc.parameters(), *txt_enc.parameters()]] + [scale.grad]


def worker(rank, world, port, queue):
    with gloo_group(rank, world, port):
        n = 8 // world
        loss, grads = loss_and_grads(slice(rank * n, (rank + 1) * n))
        for g in grads:
            dist.all_reduce(g)
            g /= world
        dist.all_reduce(loss)
        if rank == 0:
            buf = io.BytesIO()
            torch.save((loss / world, [g.clone() for g in grads]), buf)
            queue.put(buf.getvalue())


def test_two_process_logit_distillation_equals_the_global_batch():
    ref_loss, ref_grads = loss_and_grads(slice(None))
    (payload,) = run_workers(worker)
    loss, grads = torch.load(io.BytesIO(payload))
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    for g, ref in zip(grads, ref_grads):
        assert torch.allclose(g, ref, atol=1e-6), (g - ref).abs().max()
    # a per-rank (local batch) term would differ
    local = [loss_and_grads(slice(i, i + 4))[0] for i in (0, 4)]
    assert not torch.allclose(sum(local) / 2, ref_loss, atol=1e-4)
