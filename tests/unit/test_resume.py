"""Resume in constant time: a stream restarts from its checkpointed position (shard, byte offset,
shuffle buffer by reference, RNG states), never by replaying what the run already consumed."""

from __future__ import annotations

import functools
import itertools
import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from mmpretrain.data import ShardStream, Source
from mmpretrain.data.stream import pipeline as pipeline_module
from mmpretrain.data.stream import reader as reader_module
from mmpretrain.data.stream.position import SourcePosition, StreamPosition
from tests.conftest import digits_datamodule
from tests.integration.gloo import gloo_group, run_workers
from tests.unit.test_data import PREPROCESS, good, write_shard


def shards(tmp_path, n=4, per=10):
    return [write_shard(tmp_path / f"r-{s}.tar", [good(s * per + i) for i in range(per)]) for s in range(n)]


def stream(urls, **kw):
    args = {"batch_size": 4, "train": True, "batches_per_worker": 10_000, "seed": 5, "shuffle_buffer": 8} | kw
    return ShardStream([Source("s", urls)], PREPROCESS, **args)


class Counting:
    """Counts samples decoded, read from shards, and re-read by reference."""

    def __init__(self, monkeypatch):
        self.decoded = self.read = self.reread = 0
        decode, read, reread = (
            pipeline_module.decode_sample,
            reader_module.read_samples,
            reader_module.read_samples_at,
        )

        def counted_decode(*a, **k):
            self.decoded += 1
            return decode(*a, **k)

        def counted_read(*a, **k):
            for item in read(*a, **k):
                self.read += 1
                yield item

        def counted_reread(url, offsets):
            self.reread += len(offsets)
            return reread(url, offsets)

        monkeypatch.setattr(pipeline_module, "decode_sample", counted_decode)
        monkeypatch.setattr(reader_module, "read_samples", counted_read)
        monkeypatch.setattr(reader_module, "read_samples_at", counted_reread)


def test_buffered_samples_are_re_read_by_reference_from_local_and_streamed_shards(tmp_path):
    from mmpretrain.data.stream.tar_reader import read_samples, read_samples_at

    (url,) = shards(tmp_path, n=1)
    refs = {start: sample for start, _, sample in read_samples(url)}
    picked = sorted(refs)[3::3]
    for source in (url, f"pipe:cat {url}"):  # a seek per sample, or one pass over a streamed shard
        got = read_samples_at(source, picked)
        assert {off: s["__key__"] for off, s in got.items()} == {off: refs[off]["__key__"] for off in picked}
        assert all(got[off]["png"] == refs[off]["png"] for off in picked)


def test_position_round_trips_through_json():
    pos = StreamPosition(
        stream=1,
        batches=7,
        samples=30,
        mix_rng=None,
        sources=[SourcePosition(pass_idx=2, item=1, offset=3072, buffer=[[0, 512], [3, 0]])],
    )
    assert StreamPosition.from_json(pos.to_json()) == pos
    assert json.loads(pos.to_json())["sources"][0]["buffer"] == [[0, 512], [3, 0]]


def test_resuming_at_step_10_or_2000_decodes_the_same_few_samples(tmp_path, monkeypatch):
    urls = shards(tmp_path)  # 40 samples: 2,000 batches of 4 are 200 passes
    full = list(itertools.islice(iter(stream(urls)), 2001))
    counts = {}
    for k in (10, 2000):
        counting = Counting(monkeypatch)
        resumed = stream(urls, start_batch=k, positions={0: full[k - 1]["__position__"]})
        batch = next(iter(resumed))
        assert batch["__key__"] == full[k]["__key__"]  # the same batch as the uninterrupted run
        assert torch.equal(batch["image"], full[k]["image"])
        assert batch["__position__"] == full[k]["__position__"]  # and the same position after it
        counts[k] = (counting.decoded, counting.read, counting.reread)
        monkeypatch.undo()
    decoded, read, reread = counts[2000]
    assert counts[10] == counts[2000], counts  # the cost does not grow with the step
    assert decoded <= 8 + 4  # at most the shuffle buffer + one batch is decoded (here: one batch)
    assert reread <= 8 and read <= 10 + 4  # the buffer re-read by reference, then at most a shard's rest


def test_a_checkpoint_position_is_that_of_the_last_consumed_batch_not_the_workers(digits_root):
    dm = digits_datamodule(digits_root)
    processed = SimpleNamespace(processed=0)
    dm.trainer = SimpleNamespace(
        global_rank=0,
        world_size=1,
        lightning_module=SimpleNamespace(skipped_total=0),
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(total=processed))),
    )
    # Batches 0..5 of the rank (streams 0,1,0,1,...) reached the main process; 4 were trained on.
    for j in range(6):
        pos = StreamPosition.start(j % 2, 1)
        pos.batches = j // 2 + 1
        batch = dm.on_before_batch_transfer({"__position__": pos.to_json(), "x": j}, 0)
        assert "__position__" not in batch
    processed.processed = 4
    state = dm.state_dict()
    assert state["batches_consumed"] == 4
    assert [json.loads(p)["batches"] for p in state["positions"][0]] == [
        2,
        2,
    ]  # after batches 2 and 3, not 4 and 5


def approx_records(monkeypatch):
    """(pass, key) of every sample each SourceReader reads from its shards."""
    reads: list[tuple[int, str]] = []
    original = reader_module.SourceReader._read

    def recording(self):
        got = original(self)
        reads.append((self.pos.pass_idx, got[1]["__key__"]))
        return got

    monkeypatch.setattr(reader_module.SourceReader, "_read", recording)
    return reads


def test_approx_after_two_workers_to_one_reads_the_rest_of_the_pass_once(tmp_path, monkeypatch, capsys):
    from mmpretrain.training.datamodule import ContrastiveDataModule

    urls = shards(tmp_path, n=6, per=9)
    every = {f"s{s * 9 + i:03d}" for s in range(6) for i in range(9)}
    cfg = {
        "sources": {"s": {"shards": str(tmp_path / "r-*.tar")}},
        "batch_size": 4,
        "train_samples": 54,
        "shuffle_buffer": 6,
    }
    old = ContrastiveDataModule(
        OmegaConf.create(cfg | {"num_workers": 2}), preprocess=lambda t: PREPROCESS, seed=3
    )
    # The old run (2 workers) consumed 5 batches: 3 of stream 0, 2 of stream 1.
    reads = approx_records(monkeypatch)
    old_stream = stream(urls, seed=3, shuffle_buffer=6)
    consumed, positions = [], []
    for worker, n in ((0, 3), (1, 2)):
        gen = old_stream._batch_stream(worker, 2)
        batches = [next(gen) for _ in range(n)]
        consumed += [k for b in batches for k in b["__key__"]]
        positions.append(batches[-1]["__position__"])
    read_before = {k for p, k in reads}
    assert {p for p, _ in reads} == {0} and len(read_before) == len(reads)
    buffered = read_before - set(consumed)
    assert buffered  # some samples sat in the shuffle buffers
    state = old._layout() | {"batches_consumed": 5, "positions": [positions], "skipped_samples": 0}

    new = ContrastiveDataModule(
        OmegaConf.create(cfg | {"num_workers": 1, "resume": "exact"}), preprocess=lambda t: PREPROCESS, seed=3
    )
    new.load_state_dict(state)
    with pytest.raises(ValueError, match=r"num_workers: checkpoint 2 != now 1.*data.resume=approx"):
        new._resume_batch(new._layout())
    new = ContrastiveDataModule(
        OmegaConf.create(cfg | {"num_workers": 1, "resume": "approx"}),
        preprocess=lambda t: PREPROCESS,
        seed=3,
    )
    new.load_state_dict(state)
    assert new._resume_batch(new._layout()) == 5
    log = capsys.readouterr().out
    assert "data.resume=approx: the data layout changed (num_workers: checkpoint 2 != now 1" in log
    assert "no sample of the pass repeats" in log
    reads.clear()
    counting = Counting(monkeypatch)
    resumed = stream(urls, seed=3, shuffle_buffer=6, start_batch=5, positions=new._start_positions)
    delivered = [k for b in itertools.islice(iter(resumed), 30) for k in b["__key__"]]
    rest = [k for p, k in reads if p == 0]
    assert len(rest) == len(set(rest))  # nothing of the pass read twice
    assert not set(rest) & read_before  # nothing the old run had read is read again...
    assert counting.reread == len(buffered)  # ...except the buffered samples, re-read by reference
    assert set(rest) | read_before == every  # and nothing of the pass lost
    assert buffered <= set(delivered[: 4 * 12])


def _gather_on_rank(digits_root: str, rank: int, world: int, port: int, queue) -> None:
    with gloo_group(rank, world, port):
        dm = digits_datamodule(digits_root)
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
        mine = [f"rank {rank} stream 0 " + "x" * (100 * rank), None]  # ranks' positions differ in length
        gathered = dm._gather(mine)
        if rank == 0:
            queue.put(json.dumps(gathered))


def test_every_ranks_positions_reach_the_checkpoint(digits_root):
    got = json.loads(run_workers(functools.partial(_gather_on_rank, str(digits_root)))[0])
    assert got == [["rank 0 stream 0 ", None], ["rank 1 stream 0 " + "x" * 100, None]]
