"""The 2-process gloo InfoNCE gradient equals the 1-process gradient of the same global batch."""

import io

import torch
import torch.distributed as dist
from torch import nn

from mmpretrain.losses import InfoNCE
from tests.integration.gloo import gloo_group, run_workers


def make_problem():
    g = torch.Generator().manual_seed(0)
    img_enc, txt_enc = nn.Linear(6, 4), nn.Linear(5, 4)
    with torch.no_grad():
        for p in list(img_enc.parameters()) + list(txt_enc.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    x_img, x_txt = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)
    return img_enc, txt_enc, x_img, x_txt


def loss_and_grads(x_img, x_txt):
    img_enc, txt_enc, _, _ = make_problem()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    out = {
        "image_features": nn.functional.normalize(img_enc(x_img), dim=-1),
        "text_features": nn.functional.normalize(txt_enc(x_txt), dim=-1),
        "logit_scale": scale,
    }
    loss = sum(InfoNCE()(out).values())
    loss.backward()
    grads = [p.grad for p in list(img_enc.parameters()) + list(txt_enc.parameters())] + [scale.grad]
    return loss.detach(), grads


def worker(rank, world, port, queue):
    with gloo_group(rank, world, port):
        _, _, x_img, x_txt = make_problem()
        n = x_img.shape[0] // world
        loss, grads = loss_and_grads(x_img[rank * n : (rank + 1) * n], x_txt[rank * n : (rank + 1) * n])
        for g in grads:  # what DDP does to parameter gradients: average over ranks
            dist.all_reduce(g)
            g /= world
        dist.all_reduce(loss)
        if rank == 0:  # as bytes: shared-memory tensors die with this process (flaky under load)
            buf = io.BytesIO()
            torch.save((loss / world, [g.clone() for g in grads]), buf)
            queue.put(buf.getvalue())


def test_two_process_gradient_equals_single_process():
    _, _, x_img, x_txt = make_problem()
    ref_loss, ref_grads = loss_and_grads(x_img, x_txt)
    (payload,) = run_workers(worker)
    loss, grads = torch.load(io.BytesIO(payload))
    # The mean of per-rank local losses equals the global loss, and every gradient matches.
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    for g, ref in zip(grads, ref_grads):
        assert torch.allclose(g, ref, atol=1e-6), (g - ref).abs().max()
