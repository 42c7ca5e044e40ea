"""2-process gloo: SigLIP (ring exchange), tiled InfoNCE with gather, grad cache under DDP and a
locked tower under DDP all reproduce the single-process numbers of the same global batch."""

import io

import torch
import torch.distributed as dist
from torch import nn

from mmpretrain.losses import InfoNCE, SigLIP
from mmpretrain.model import ContrastiveModel
from mmpretrain.towers.base import Tower
from mmpretrain.training.gradcache import grad_cache_backward
from tests.integration.gloo import gloo_group, run_workers

WORLD, GLOBAL_BATCH = 2, 8


class LinearTower(Tower):
    def __init__(self, modality, in_dim):
        super().__init__({})
        self.modality, self.output_dim = modality, 6
        self.net = nn.Sequential(nn.Linear(in_dim, 6), nn.Tanh(), nn.Linear(6, 6))

    def forward(self, x):
        return self.net(x)


def make_model(bias=None, lock_image=False):
    torch.manual_seed(0)
    model = ContrastiveModel(
        {"image": LinearTower("image", 5), "text": LinearTower("text", 3)}, 4, init_logit_bias=bias
    )
    if lock_image:
        model.towers["image"].lock(0)
    return model


def global_batch():
    g = torch.Generator().manual_seed(3)
    return {
        "image": torch.randn(GLOBAL_BATCH, 5, generator=g),
        "text": torch.randn(GLOBAL_BATCH, 3, generator=g),
    }


def local_batch(rank):
    n = GLOBAL_BATCH // WORLD
    return {k: v[rank * n : (rank + 1) * n] for k, v in global_batch().items()}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = {
    "siglip": {"bias": -10.0, "loss": lambda: SigLIP()},
    "tiled_infonce": {"bias": None, "loss": lambda: InfoNCE(tiled=True, tile_size=3)},
}


def reference(case):
    model = make_model(CASES[case]["bias"])
    loss = sum(CASES[case]["loss"]()(model(global_batch())).values())
    loss.backward()
    return loss.detach(), grads(model)


def reference_grad_cache():
    model = make_model()
    sum(InfoNCE()(model(global_batch())).values()).backward()
    return grads(model)


def reference_locked():
    model = make_model(lock_image=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        sum(InfoNCE()(model(global_batch())).values()).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def worker(rank, world, port, queue):
    with gloo_group(rank, WORLD, port):
        results = {}
        # losses: each rank's loss on its slice; DDP's averaging done by hand
        for case, spec in CASES.items():
            model = make_model(spec["bias"])
            loss = sum(spec["loss"]()(model(local_batch(rank))).values())
            loss.backward()
            g = grads(model)
            for t in [loss.detach(), *g.values()]:
                dist.all_reduce(t)
                t /= WORLD
            results[case] = (loss.detach(), g)
        # grad cache through a real DDP wrapper: 2 micro-batches per rank
        ddp = nn.parallel.DistributedDataParallel(make_model())
        grad_cache_backward(ddp, InfoNCE(), local_batch(rank), chunks=2)
        results["grad_cache"] = {n.removeprefix("module."): p.grad.clone() for n, p in ddp.named_parameters()}
        # a locked tower under DDP (no find_unused_parameters): trains the rest, leaves it untouched
        ddp = nn.parallel.DistributedDataParallel(make_model(lock_image=True))
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            sum(InfoNCE()(ddp(local_batch(rank))).values()).backward()
            opt.step()
        results["locked"] = {n.removeprefix("module."): p.detach().clone() for n, p in ddp.named_parameters()}
        if rank == 0:  # as bytes: shared-memory tensors would die with this process
            buf = io.BytesIO()
            torch.save(results, buf)
            queue.put(buf.getvalue())


def test_two_process_losses_grad_cache_and_locking_match_single_process():
    (payload,) = run_workers(worker, world=WORLD, timeout=180)
    results = torch.load(io.BytesIO(payload))
    for case in CASES:
        ref_loss, ref_grads = reference(case)
        loss, got = results[case]
        assert torch.allclose(loss, ref_loss, atol=1e-5), case
        assert set(got) == set(ref_grads) and ("logit_bias" in got) == (case == "siglip")
        for name, g in ref_grads.items():
            assert torch.allclose(got[name], g, atol=1e-5), (case, name, (got[name] - g).abs().max())
    for name, g in reference_grad_cache().items():
        assert torch.allclose(results["grad_cache"][name], g, atol=1e-5), ("grad_cache", name)
    untouched = make_model()
    for name, p in reference_locked().items():
        assert torch.allclose(results["locked"][name], p, atol=1e-5), ("locked", name)
        if name.startswith("towers.image."):
            assert torch.equal(results["locked"][name], dict(untouched.named_parameters())[name])
