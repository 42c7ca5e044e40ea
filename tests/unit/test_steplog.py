"""StepLog: the metrics of a step that logs, reduced over ranks in one collective and read on the host
in one ``tolist()``; host numbers never touch the device in a single process."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

from mmpretrain.training.steplog import StepLog
from tests.integration.gloo import gloo_group, run_workers
from tests.unit.test_training_step import CountReads


def test_one_host_read_for_every_tensor_and_readers_get_their_values(monkeypatch):
    log = StepLog()
    seen = {}
    log.log_vector(["train/loss", "train/a_loss"], torch.tensor([3.0, 1.5]), reduce="mean")
    log.log({"train/lr_like": torch.tensor(0.25), "train/host": 7})
    log.read(torch.tensor([1.0, 2.0, 2.0]), lambda v: seen.setdefault("counts", v) and None)
    log.read([4.0], lambda v: {"train/derived": v[0] * 10})
    reads = CountReads(monkeypatch)
    metrics = log.flush(torch.device("cpu"))
    assert reads.calls == ["tolist"]
    assert metrics == {
        "train/loss": 3.0,
        "train/a_loss": 1.5,
        "train/lr_like": 0.25,
        "train/host": 7.0,
        "train/derived": 40.0,
    }
    assert seen["counts"] == [1.0, 2.0, 2.0]
    assert log.last == metrics
    assert log.flush(torch.device("cpu")) == {}  # emptied by the flush


def test_host_numbers_alone_need_no_read(monkeypatch):
    log = StepLog()
    log.log({"train/data_wait_frac": 0.1})
    log.read([3.0], lambda v: {"train/skipped_samples": v[0]}, reduce="sum")
    reads = CountReads(monkeypatch)
    assert log.flush(torch.device("cpu")) == {"train/data_wait_frac": 0.1, "train/skipped_samples": 3.0}
    assert reads.calls == []


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduce='max'"):
        StepLog().log({"x": 1.0}, reduce="max")


def _flush_on_rank(rank: int, world: int, port: int, queue) -> None:
    with gloo_group(rank, world, port):
        calls = []
        original = dist.all_reduce

        def counted(*args, **kwargs):
            calls.append("all_reduce")
            return original(*args, **kwargs)

        dist.all_reduce = counted
        log = StepLog()
        log.log_vector(["loss", "term"], torch.tensor([1.0 + rank, 10.0 * (rank + 1)]), reduce="mean")
        log.read([float(rank + 1)], lambda v: {"skipped": v[0]}, reduce="sum")  # a host number
        log.log({"wait": 0.5 * (rank + 1)})  # rank-local
        log.read(torch.tensor([5.0 + rank]), lambda v: {"local": v[0]})  # rank-local on the device
        metrics = log.flush(torch.device("cpu"))
        if rank == 0:
            queue.put(json.dumps({"metrics": metrics, "collectives": calls}))


def test_two_ranks_reduce_in_one_collective():
    got = json.loads(run_workers(_flush_on_rank)[0])
    assert got["collectives"] == ["all_reduce"]
    m = got["metrics"]
    assert math.isclose(m["loss"], 1.5) and math.isclose(m["term"], 15.0)  # means over ranks
    assert m["skipped"] == 3.0  # summed
    assert m["wait"] == 0.5 and m["local"] == 5.0  # rank 0's own
