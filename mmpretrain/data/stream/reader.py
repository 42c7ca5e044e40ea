"""One source's raw samples for one stream: its shards pass after pass, then a seeded shuffle buffer.

The reader advances a :class:`~mmpretrain.data.stream.position.SourcePosition` as it reads and reports
where it stands (:meth:`SourceReader.position`); built from a saved position it seeks to the shard
offset and re-reads the buffered samples by reference. Samples leave it as raw bytes: decoding is
the next stage's job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mmpretrain.data.stream.position import END, SourcePosition, restore_rng, rng_state
from mmpretrain.data.stream.tar_reader import read_samples, read_samples_at


class SourceReader:
    """Reads one source for one stream. ``shards_of_pass(p)`` gives the shards (indices into ``urls``)
    the stream reads in pass ``p``; ``endless`` streams start the next pass at the end of one
    (training), others end (validation)."""

    def __init__(
        self,
        name: str,
        urls: list[str],
        shards_of_pass: Callable[[int], list[int]],
        pos: SourcePosition,
        on_error: Callable[[Exception], Any],
        buffer_size: int = 0,
        seed: int = 0,
        endless: bool = True,
    ):
        self.name, self.urls, self.shards_of_pass = name, urls, shards_of_pass
        self.pos, self.on_error = pos, on_error
        self.size, self.initial, self.endless = buffer_size, min(100, buffer_size), endless
        self.rng = restore_rng(pos.rng, seed)
        # The buffered samples are re-read by reference (their bytes; decoding happens when drawn).
        by_shard: dict[int, list[int]] = {}
        for k, off in pos.buffer:
            by_shard.setdefault(k, []).append(off)
        reread = {k: read_samples_at(urls[k], offs) for k, offs in by_shard.items()}
        self.buffer = [((k, off), reread[k][off]) for k, off in pos.buffer]
        self._shard = None  # the current shard's samples from pos.offset on
        self._read_this_pass = pos.item > 0 or pos.offset != 0 or bool(pos.buffer) or pos.plan is not None
        self._plan: tuple[int, list[list[int]]] | None = None  # (pass, its computed split)

    def _items(self) -> list[list[int]]:
        """This pass's ``[shard, start offset]`` items: the computed split (computed once a pass, not
        per sample read), or under ``data.resume=approx`` this stream's share of what the checkpointed
        pass had left."""
        if self.pos.plan is not None:
            return self.pos.plan
        if self._plan is None or self._plan[0] != self.pos.pass_idx:
            self._plan = (self.pos.pass_idx, [[k, 0] for k in self.shards_of_pass(self.pos.pass_idx)])
        return self._plan[1]

    def _read(self) -> tuple[tuple[int, int], dict] | None:
        """The next sample of the shards with its reference ``(shard, offset)``; None at the end of
        a stream that is not endless."""
        pos = self.pos
        while True:
            plan = self._items()
            if pos.item >= len(plan):
                if not self.endless:
                    return None
                if not self._read_this_pass:
                    raise ValueError(f"source '{self.name}': a whole pass of its shards gave no sample")
                pos.advance_pass()
                self._read_this_pass = False
                continue
            shard = plan[pos.item][0]
            if pos.offset == END:
                pos.item, self._shard = pos.item + 1, None
                pos.offset = plan[pos.item][1] if pos.item < len(plan) else 0
                continue
            if self._shard is None:
                self._shard = read_samples(self.urls[shard], pos.offset, on_error=self.on_error)
            found = next(self._shard, None)
            if found is None:
                pos.offset = END
                continue
            start, pos.offset, sample = found
            self._read_this_pass = True
            return (shard, start), sample

    def next(self) -> dict | None:
        """The next raw sample (through the shuffle buffer when there is one); None at the end."""
        if not self.size:
            item = self._read()
            return None if item is None else item[1]
        while True:  # mirrors webdataset's shuffle: refill (two reads while filling), then draw one
            item = self._read()
            if item is not None:
                self.buffer.append(item)
            if len(self.buffer) < self.size and item is not None:
                item = self._read()
                if item is not None:
                    self.buffer.append(item)
            if not self.buffer:
                return None
            if len(self.buffer) >= self.initial or item is None:
                k = self.rng.randint(0, len(self.buffer) - 1)
                self.buffer[k], self.buffer[-1] = self.buffer[-1], self.buffer[k]
                return self.buffer.pop()[1]

    def position(self) -> SourcePosition:
        return replace(self.pos, buffer=[list(ref) for ref, _ in self.buffer], rng=rng_state(self.rng))
