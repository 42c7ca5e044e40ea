"""Validation with several captions per row, hard negatives and task labels split over 2 gloo
ranks (unevenly, and with one rank holding no batch) equals one process."""

import json

import pytest
import torch
import torch.distributed as dist

from tests.conftest import validate_batches
from tests.integration.gloo import gloo_group, run_workers
from tests.unit.test_protocol import val_batches

SPLITS = {"uneven": ([5, 3], [6]), "empty_rank": ([5, 3, 6], [])}


def make_module():
    from mmpretrain.losses import InfoNCE
    from mmpretrain.training.module import ContrastiveModule
    from tests.unit.test_gradcache import make_model

    model = make_model().eval()
    prompts = {
        f"a {c}": torch.randn(5, generator=torch.Generator().manual_seed(i))
        for i, c in enumerate(["red", "green", "blue"])
    }
    module = ContrastiveModule(
        model,
        InfoNCE(),
        optim={},
        zeroshot_tasks={"color": {"classnames": ["red", "green", "blue"], "templates": ["a {}"]}},
    )
    module.val.encode_prompts = lambda ps: model.encode("text", torch.stack([prompts[p] for p in ps]))
    return module


run = validate_batches


def worker(rank, world, port, queue):
    with gloo_group(rank, world, port):
        module = make_module()
        out = {}
        for name, split in SPLITS.items():
            batches, _ = val_batches(split[0] + split[1])
            mine = batches[: len(split[0])] if rank == 0 else batches[len(split[0]) :]
            out[name] = run(module, mine)
        queue.put(json.dumps([rank, out]))


def test_split_validation_equals_single_process():
    module = make_module()
    single = run(module, val_batches([5, 3, 6])[0])
    assert "val/probe/mean" in single and "val/retrieval_rsum/image_text" in single
    results = dict(json.loads(item) for item in run_workers(worker, results=2))
    for rank, per_split in results.items():
        for name, got in per_split.items():
            assert sorted(got) == sorted(single), (rank, name)
            for k, v in single.items():
                assert got[k] == pytest.approx(v, abs=1e-6), (rank, name, k)


def negclip_problem():
    g = torch.Generator().manual_seed(0)
    encs = {m: torch.nn.Linear(d, 4) for m, d in (("image", 6), ("text", 5))}
    with torch.no_grad():
        for enc in encs.values():
            for p in enc.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    xs = {
        "image": torch.randn(8, 6, generator=g),
        "text": torch.randn(8, 5, generator=g),
        "neg": torch.randn(8, 2, 5, generator=g),
    }
    valid = torch.rand(8, 2, generator=g) > 0.4
    xs["pos"] = torch.randn(8, 3, 5, generator=g)  # more captions per row (data.captions_per_sample)
    xs["pos_valid"] = torch.rand(8, 3, generator=g) > 0.4
    return encs, xs, valid


def negclip_loss_and_grads(rows, positives: bool = False):
    from mmpretrain.losses import InfoNCE

    encs, xs, valid = negclip_problem()
    unit = torch.nn.functional.normalize
    scale = torch.tensor(5.0, requires_grad=True)
    out = {
        "image_features": unit(encs["image"](xs["image"][rows]), dim=-1),
        "text_features": unit(encs["text"](xs["text"][rows]), dim=-1),
        "text_negatives_features": unit(encs["text"](xs["neg"][rows]), dim=-1),
        "text_negatives_mask": valid[rows],
        "logit_scale": scale,
    }
    if positives:
        out["text_positives_features"] = unit(encs["text"](xs["pos"][rows]), dim=-1)
        out["text_positives_mask"] = xs["pos_valid"][rows]
    loss = InfoNCE(hard_negatives=True)(out)["image_text_loss"]
    loss.backward()
    grads = [p.grad for enc in encs.values() for p in enc.parameters()] + [scale.grad]
    return loss.detach(), grads


def negclip_worker(rank, world, port, queue, positives=False):
    with gloo_group(rank, world, port):
        loss, grads = negclip_loss_and_grads(slice(rank * 4, rank * 4 + 4), positives)
        for gr in grads:  # what DDP does: average the gradients over ranks
            dist.all_reduce(gr)
            gr /= world
        dist.all_reduce(loss)
        queue.put(json.dumps([rank, (loss / world).item(), [gr.flatten().tolist() for gr in grads]]))


def multi_positive_worker(rank, world, port, queue):
    negclip_worker(rank, world, port, queue, positives=True)


@pytest.mark.parametrize("positives", [False, True], ids=["negclip", "negclip+multi-positive"])
def test_two_process_negclip_equals_one_process(positives):
    loss, grads = negclip_loss_and_grads(slice(0, 8), positives)
    worker = multi_positive_worker if positives else negclip_worker
    for rank, got_loss, got_grads in (json.loads(item) for item in run_workers(worker, results=2)):
        assert got_loss == pytest.approx(loss.item(), abs=1e-5), rank
        for g, want in zip(got_grads, grads):
            torch.testing.assert_close(torch.tensor(g), want.flatten(), atol=1e-5, rtol=1e-4)
