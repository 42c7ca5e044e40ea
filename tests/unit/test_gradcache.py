"""Feature caching gives the gradient of the full batch's contrastive loss, for any k."""

import pytest
import torch
from torch import nn

from mmpretrain.losses import InfoNCE, SigLIP
from mmpretrain.model import ContrastiveModel
from mmpretrain.towers.base import Tower
from mmpretrain.training.gradcache import grad_cache_backward, split_batch


class DropoutTower(Tower):
    """A tiny tower with dropout, so the test fails if the two passes draw different masks."""

    def __init__(self, modality, in_dim):
        super().__init__({})
        self.modality, self.output_dim = modality, 8
        self.net = nn.Sequential(nn.Linear(in_dim, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 8))

    def forward(self, x):
        return self.net(x)


def make_model(bias=None):
    torch.manual_seed(0)
    return ContrastiveModel(
        {"image": DropoutTower("image", 6), "text": DropoutTower("text", 5)}, 4, init_logit_bias=bias
    )


def batch(n=12):
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(n, 6, generator=g),
        "text": torch.randn(n, 5, generator=g),
        "__key__": [str(i) for i in range(n)],
    }


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "loss,bias", [(InfoNCE(), None), (SigLIP(), -10.0), (InfoNCE(tiled=True, tile_size=5), None)]
)
@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_grad_cache_equals_one_big_batch(loss, bias, chunks):
    big, cached = make_model(bias), make_model(bias)
    big.train(), cached.train()
    torch.manual_seed(7)  # same RNG draws in the same order: micro-batches are encoded in order
    rng = torch.get_rng_state()
    # reference: dropout masks drawn per micro-batch in order equal those of one pass per chunk
    outs = [big(mb) for mb in split_batch(batch(), chunks)]
    merged = {k: torch.cat([o[k] for o in outs]) if v.ndim else v for k, v in outs[0].items()}
    ref_terms = loss(merged)
    ref_total = sum(ref_terms.values())
    ref_total.backward()
    torch.set_rng_state(rng)
    terms = grad_cache_backward(cached, loss, batch(), chunks)
    assert torch.allclose(sum(terms.values()), ref_total.detach(), atol=1e-6)
    want, got = grads_of(big), grads_of(cached)
    assert set(want) == set(got) and len(got) > 4
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5), (name, (got[name] - want[name]).abs().max())


def test_grad_cache_without_dropout_equals_the_unsplit_batch():
    # eval mode: no randomness, so the reference is literally one forward of the whole batch
    big, cached = make_model().eval(), make_model().eval()
    sum(InfoNCE()(big(batch())).values()).backward()
    grad_cache_backward(cached, InfoNCE(), batch(), 4)
    for name, g in grads_of(big).items():
        assert torch.allclose(grads_of(cached)[name], g, atol=1e-5)


def test_plain_accumulation_would_differ():
    # the point of grad caching: the sum of per-chunk losses is another objective
    big, acc = make_model().eval(), make_model().eval()
    sum(InfoNCE()(big(batch())).values()).backward()
    for mb in split_batch(batch(), 3):
        (sum(InfoNCE()(acc(mb)).values()) / 3).backward()
    diffs = [(acc_g - g).abs().max() for acc_g, g in zip(grads_of(acc).values(), grads_of(big).values())]
    assert max(diffs) > 1e-3


def test_split_batch_keeps_shared_entries_and_explains_too_many_chunks():
    parts = split_batch(batch(10) | {"__skipped__": torch.tensor(3)}, 3)
    assert [p["image"].shape[0] for p in parts] == [3, 4, 3]
    assert parts[1]["__key__"] == ["3", "4", "5", "6"] and parts[2]["__skipped__"].item() == 3
    with pytest.raises(ValueError, match="grad_cache_chunks"):
        split_batch(batch(2), 3)


def test_batchnorm_running_stats_are_updated_once_per_micro_batch():
    class BNTower(DropoutTower):
        def __init__(self, modality, in_dim):
            super().__init__(modality, in_dim)
            self.net = nn.Sequential(nn.Linear(in_dim, 8), nn.BatchNorm1d(8))

    torch.manual_seed(0)
    model = ContrastiveModel({"image": BNTower("image", 6), "text": BNTower("text", 5)}, 4).train()
    torch.manual_seed(0)
    plain = ContrastiveModel({"image": BNTower("image", 6), "text": BNTower("text", 5)}, 4).train()
    grad_cache_backward(model, InfoNCE(), batch(), 2)
    with torch.no_grad():
        for mb in split_batch(batch(), 2):
            plain(mb)  # what two micro-batches of plain training do to the statistics
    for (name, b), (_, ref) in zip(model.named_buffers(), plain.named_buffers()):
        assert torch.equal(b, ref), name
