"""Per-sample work the data stream must not repeat (the 224-px data path's budget, RESULTS §3b)."""

from __future__ import annotations

from mmpretrain.data.stream.position import SourcePosition, shard_plan
from mmpretrain.data.stream.reader import SourceReader
from tests.unit.test_data import good, write_shard


def test_a_reader_computes_each_pass_split_once_not_per_sample(tmp_path):
    urls = [write_shard(tmp_path / f"p-{s}.tar", [good(10 * s + i) for i in range(5)]) for s in range(3)]
    calls = []

    def shards_of_pass(pass_idx):
        calls.append(pass_idx)
        return shard_plan(len(urls), 7, pass_idx, 0, 1, 0, 1)

    reader = SourceReader("s", urls, shards_of_pass, SourcePosition(), on_error=print, seed=3)
    keys = [reader.next()["__key__"] for _ in range(40)]  # 2 2/3 passes of 15 samples
    assert calls == [0, 1, 2]
    for p in range(3):  # each pass still reads its own shard order
        order = shard_plan(len(urls), 7, p, 0, 1, 0, 1)
        want = [f"s{10 * s + i:03d}" for s in order for i in range(5)]
        assert keys[15 * p : 15 * p + 15] == want[: len(keys) - 15 * p]
