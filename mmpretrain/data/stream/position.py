"""Where a training stream stands: what the checkpoint holds so a resume reads, never replays.

A *stream* (one per DataLoader worker of a rank) reads each source's shards pass after pass. Pass
``p`` of a source is a *plan*: the shards this stream reads in that pass, in order (the source's
shard list shuffled by a seed of ``(seed, p)``, split by rank then by stream; or, for
``shard_policy=resample``, drawn with replacement), each with the offset it starts at.

A :class:`SourcePosition` is one source's place in that walk: the pass, the plan item being read,
the byte offset where its next sample starts, the shuffle buffer's contents as references
``[shard, offset]`` plus the buffer's RNG state. A :class:`StreamPosition` adds the batches
produced, the samples read (each sample's augmentation is seeded by this count) and the
source-mixing RNG's state. Positions are plain ints and lists, saved as JSON: nothing in a
checkpoint needs unpickling.

Restoring opens the current shard at its offset (tar headers give it; skipped members are never
decoded) and re-reads the buffered samples by reference: the cost is bounded by the shuffle buffer
and one shard, whatever the step.

:func:`continue_pass` is ``data.resume=approx``: the positions of a run with another layout
(ranks, workers) turned into positions for this one that read, across the new streams, what the
pass had not read yet (the rest of every shard in progress, the shards not started, and the
samples that sat in shuffle buffers).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any

from mmpretrain.data.stream.seeds import derive
from mmpretrain.data.stream.tar_reader import END
from mmpretrain.io import write_text_atomic

#: ``offset`` once a shard is read to its end.
_HEAD = re.compile(r'\{"stream":(\d+),"batches":(\d+),')


def shard_plan(
    n_shards: int,
    seed: int,
    pass_idx: int,
    rank: int,
    world_size: int,
    stream: int,
    num_streams: int,
    policy: str = "error",
    shuffle: bool = True,
) -> list[int]:
    """The shards (indices into the source's list) that ``stream`` of ``rank`` reads in pass ``pass_idx``."""
    order = list(range(n_shards))
    if policy == "resample":
        # Every (rank, stream) draws its own shards with replacement: no shard count is too small.
        rng = random.Random(derive(seed, "shard_resample", pass_idx, rank, stream))
        return [rng.choice(order) for _ in range(max(1, n_shards // (world_size * num_streams)))]
    if shuffle:
        random.Random(derive(seed, "shard_order", pass_idx)).shuffle(order)
    return order[rank::world_size][stream::num_streams]


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def restore_rng(state: list | None, seed: int) -> random.Random:
    """A ``random.Random`` in ``state``; seeded with ``seed`` when there is no state yet."""
    rng = random.Random(seed)
    if state is not None:
        rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


@dataclass
class SourcePosition:
    pass_idx: int = 0
    item: int = 0  # index into the pass's plan of the shard being read
    offset: int = 0  # where its next sample starts (END: read to its end)
    buffer: list[list[int]] = field(default_factory=list)  # [shard, offset] of each buffered sample
    rng: list | None = None  # the shuffle buffer's RNG state; None: freshly seeded
    plan: list[list[int]] | None = (
        None  # [shard, start offset] items of this pass when not the computed split
    )

    def advance_pass(self) -> None:
        self.pass_idx, self.item, self.offset, self.plan = self.pass_idx + 1, 0, 0, None


@dataclass
class StreamPosition:
    stream: int = 0
    batches: int = 0  # batches this stream has produced
    samples: int = 0  # samples it has read (seeds each sample's augmentation)
    mix_rng: list | None = None  # which source the next sample comes from; None: freshly seeded
    sources: list[SourcePosition] = field(default_factory=list)

    def to_json(self) -> str:
        # vars(), not dataclasses.asdict: the buffer's references are not deep-copied
        return json.dumps(vars(self) | {"sources": [vars(s) for s in self.sources]}, separators=(",", ":"))

    @staticmethod
    def peek(text: str) -> tuple[int, int]:
        """``(stream, batches)`` of a position's JSON without parsing the rest (its buffer and RNG
        states): what the main process reads of every batch. ``to_json`` writes these two first."""
        found = _HEAD.match(text)
        if found is None:
            raise ValueError(f"not a stream position: {text[:80]!r}")
        return int(found.group(1)), int(found.group(2))

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> StreamPosition:
        d = json.loads(text) if isinstance(text, str) else dict(text)
        d["sources"] = [SourcePosition(**s) for s in d["sources"]]
        return cls(**d)

    @classmethod
    def start(cls, stream: int, n_sources: int) -> StreamPosition:
        return cls(stream=stream, sources=[SourcePosition() for _ in range(n_sources)])


class PositionFiles:
    """Stream positions passed between DataLoader workers through small files (one per stream) in
    a directory the main process owns: workers share nothing else, and persistent ones are never
    sent the dataset again. Needed when a stream changes worker at an epoch boundary (after a
    resume at a batch that is not a multiple of the workers)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mmpretrain-streams-")
        weakref.finalize(self, _remove_if_owner, self.dir, os.getpid())

    def put(self, stream: int, position: str) -> None:
        write_text_atomic(os.path.join(self.dir, f"stream-{stream}.json"), position)

    def get(self, stream: int, batches: int) -> StreamPosition | None:
        """The position of ``stream`` left there, if it is the one after ``batches`` batches."""
        path = os.path.join(self.dir, f"stream-{stream}.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            pos = StreamPosition.from_json(f.read())
        return pos if pos.batches == batches else None


def _remove_if_owner(path: str, pid: int) -> None:
    if os.getpid() == pid:  # a forked worker's copy must not remove the main process's directory
        shutil.rmtree(path, ignore_errors=True)


def continue_pass(
    old: list[list[StreamPosition | None]],
    old_plan: Any,
    source_map: list[int | None],
    new_slots: int,
    batches_before: list[int],
) -> tuple[list[StreamPosition], dict[str, int]]:
    """Positions for ``new_slots`` streams (rank-major: slot = rank x workers + stream) that read the
    rest of the current pass of every source across the new layout.

    ``old[rank][stream]`` are the checkpointed positions (None: a stream that had produced nothing);
    ``old_plan(old_source, pass, rank, stream)`` the old layout's plan; ``source_map[i]`` the old index
    of new source ``i`` (None: new, it starts afresh). Per source the pass continued is the furthest
    any old stream reached; its work left is each old stream's plan of that pass from where it stood
    (all of it for a stream still in an earlier pass) and every buffered sample of streams in that
    pass, dealt round robin to the new streams. Nothing read in the pass repeats and nothing unread
    is lost, except what streams still in an earlier pass had left of theirs (``dropped_streams``).
    ``batches_before[slot]`` is the batch count the new stream starts at.
    """
    new = [StreamPosition(stream=s, batches=batches_before[s]) for s in range(new_slots)]
    summary = {"shards": 0, "buffered": 0, "dropped_streams": 0}
    for old_i in source_map:
        if old_i is None:
            for pos in new:
                pos.sources.append(SourcePosition())
            continue
        flat = [
            (r, s, pos.sources[old_i] if pos is not None else SourcePosition())
            for r, streams in enumerate(old)
            for s, pos in enumerate(streams)
        ]
        current = max(p.pass_idx for _, _, p in flat)
        items: list[list[int]] = []
        buffered: list[list[int]] = []
        for r, s, p in flat:
            if p.pass_idx < current:
                summary["dropped_streams"] += 1
                items += [[k, 0] for k in old_plan(old_i, current, r, s)]
                continue
            plan = p.plan if p.plan is not None else [[k, 0] for k in old_plan(old_i, current, r, s)]
            rest = [list(x) for x in plan[p.item :]]
            if rest:
                rest[0][1] = p.offset
                if rest[0][1] == END:
                    rest = rest[1:]
            items += rest
            buffered += p.buffer
        summary["shards"] += len(items)
        summary["buffered"] += len(buffered)
        for slot, pos in enumerate(new):
            mine = items[slot::new_slots]
            pos.sources.append(
                SourcePosition(
                    pass_idx=current,
                    offset=mine[0][1] if mine else 0,
                    buffer=buffered[slot::new_slots],
                    plan=mine,
                )
            )
    return new, summary
