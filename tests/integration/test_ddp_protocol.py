"""Validation with several captions per row, hard negatives and task labels split over 2 gloo
ranks (unevenly, and with one rank holding no batch) equals one process."""

import json
import os

import pytest
import torch
import torch.distributed as dist

from tests.integration.gloo import run_workers
from tests.unit.test_protocol import val_batches

SPLITS = {"uneven": ([5, 3], [6]), "empty_rank": ([5, 3, 6], [])}


def make_module():
    from mmpretrain.losses import InfoNCE
    from mmpretrain.module import ContrastiveModule
    from tests.unit.test_gradcache import make_model

    model = make_model().eval()
    prompts = {f"a {c}": torch.randn(5, generator=torch.Generator().manual_seed(i))
               for i, c in enumerate(["red", "green", "blue"])}
    module = ContrastiveModule(model, InfoNCE(), optim={},
                               zeroshot_tasks={"color": {"classnames": ["red", "green", "blue"], "templates": ["a {}"]}})
    module._encode_prompts = lambda ps: model.encode("text", torch.stack([prompts[p] for p in ps]))
    return module


def run(module, batches):
    with torch.no_grad():
        for i, b in enumerate(batches):
            module.validation_step(b, i)
        cols = {k: torch.cat(v) for k, v in module._val.items()}
    module._val.clear()
    module._val_rows = 0
    return module.validation_metrics(cols)


def worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    module = make_module()
    out = {}
    for name, split in SPLITS.items():
        batches, _ = val_batches(split[0] + split[1])
        mine = batches[: len(split[0])] if rank == 0 else batches[len(split[0]) :]
        out[name] = run(module, mine)
    queue.put(json.dumps([rank, out]))
    dist.destroy_process_group()


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
