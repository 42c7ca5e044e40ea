"""Seeded fuzzing of the tar reader: mutants of valid shards, read from a local file and streamed.

The shards (a few samples with png/txt/cls/json fields) are written by webdataset's TarWriter (a pax
header before each member) and by tarfile (GNU long names, pax paths). A mutant flips a bit in a header
or in data, cuts the file at a 512-byte boundary or inside a block, sets a size or a type field (the
checksum recomputed, so the header reads as valid), edits a name (with or without a valid checksum), or
inserts zero blocks. Each is read through the local path (seeks) and through ``pipe:cat``, and:

- every read ends within a time bound and yields at most one sample per 512-byte block;
- nothing raises out of ``read_samples`` (``on_error`` is given); both paths give the same samples and
  faults, :func:`count_shard` counts what they yield, and reading from a sample's offset gives the same
  rest (unless a header was edited: a key may then recur from before the offset);
- each sample yielded has a key that appears once, an original one unless a header was edited;
- a field a member untouched by the mutation holds equals the original bytes, and a sample none of
  whose members was touched comes whole or not at all (never cut);
- every sample whose members were all untouched is yielded or counted as lost.

A tar holds no checksum of its data: a bit flipped in a member's data, or a size shrunk within the same
number of blocks, changes that field silently. So a member counts as touched when the mutation reaches
its headers or data, and so does every member whose bytes an edited size, type or name hands to another
(the next one, and those an enlarged size swallows) or a cut removes.
"""

from __future__ import annotations

import io
import random
import signal
import subprocess
import tarfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmpretrain.data.stream import tar_entries
from mmpretrain.data.stream import tar_reader as tario

BLOCK = 512
SECONDS = 5  # per read of a mutant of a few KiB: a loop, not slowness, would pass it


@dataclass(frozen=True)
class Member:
    key: str
    field: str
    at: int  # first header (an extended one if any)
    data_at: int
    size: int

    @property
    def end(self) -> int:
        return self.data_at + -(-self.size // BLOCK) * BLOCK


def sample_fields(rng: random.Random, i: int) -> dict[str, bytes]:
    return {
        "png": rng.randbytes(rng.choice([0, 1, 100, 511, 512, 513, 1500])),
        "txt": f"caption {i}".encode() * rng.randint(0, 3),
        "cls": b"%d" % i,
        "json": b'{"i": %d}' % i,
    }


def write_base(path: Path, kind: str, seed: int) -> dict[str, dict[str, bytes]]:
    rng = random.Random(seed)
    names = {"wds": [f"s{i:03d}" for i in range(4)], "gnu": [], "pax": []}
    names["gnu"] = ["a" * 110 + "/s000", "s001", "dir.v1/s002", "s003"]  # a GNU long name, a dotted folder
    names["pax"] = ["s000", "é" * 60 + "/s001", "s002", "s003"]  # pax paths (long, non-ascii)
    samples = {key: sample_fields(rng, i) for i, key in enumerate(names[kind])}
    if kind == "wds":
        import webdataset as wds

        with wds.TarWriter(str(path)) as sink:
            for key, fields in samples.items():
                sink.write({"__key__": key, **fields})
    else:
        fmt = tarfile.GNU_FORMAT if kind == "gnu" else tarfile.PAX_FORMAT
        with tarfile.open(path, "w", format=fmt) as tf:
            for key, fields in samples.items():
                for ext, data in fields.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 7
                    tf.addfile(info, io.BytesIO(data))
    return samples


def members_of(path: Path) -> list[Member]:
    with tarfile.open(path) as tf:
        return [Member(*tario.member_key(m.name), m.offset, m.offset_data, m.size) for m in tf]


def set_checksum(raw: bytearray, h: int) -> None:
    raw[h + 148 : h + 156] = b" " * 8
    raw[h + 148 : h + 156] = b"%06o\0 " % sum(raw[h : h + BLOCK])


def mutate(
    raw: bytes, members: list[Member], rng: random.Random, kind: str
) -> tuple[bytes, set[int], bool, tuple[int, int]]:
    """A mutant of ``raw``, the indices of the members it touches, whether it edits a header, and where
    it inserted how many bytes of zero blocks (the offsets from there on move by as many)."""
    out, n = bytearray(raw), len(members)

    def spanning(lo: int, hi: int) -> set[int]:
        return {i for i, m in enumerate(members) if m.at < hi and lo < m.end}

    def and_next(touched: set[int]) -> set[int]:
        return touched | {i + 1 for i in touched if i + 1 < n}

    i = rng.randrange(n)
    m = members[i]
    h = m.data_at - BLOCK  # the member's own header (after its extended ones)
    if kind == "flip_header":
        b = rng.randrange(m.at, m.data_at)
        out[b] ^= 1 << rng.randrange(8)
        return bytes(out), and_next({i}), True, NO_SHIFT
    if kind == "flip_data":
        if not m.size:
            return mutate(raw, members, rng, "flip_header")
        out[rng.randrange(m.data_at, m.data_at + m.size)] ^= 1 << rng.randrange(8)
        return bytes(out), {i}, False, NO_SHIFT
    if kind in ("cut_block", "cut_mid"):
        cut = rng.randrange(len(raw) // BLOCK) * BLOCK
        cut += rng.randrange(1, BLOCK) if kind == "cut_mid" else 0
        return bytes(out[:cut]), {j for j, x in enumerate(members) if x.end > cut}, False, NO_SHIFT
    if kind == "size":
        choice = rng.choice(["-0001000", "-1", "0", "+1", "grow", "shrink", "huge", "base256", "junk"])
        field = {
            "-0001000": b"-0001000\0\0\0\0",
            "-1": b"-1\0",
            "0": b"0\0",
            "+1": b"%011o\0" % (m.size + 1),
            "grow": b"%011o\0" % (m.size + rng.choice([BLOCK, 3 * BLOCK, 10 * BLOCK, len(raw)])),
            "shrink": b"%011o\0" % max(0, m.size - rng.choice([1, BLOCK, 2 * BLOCK])),
            "huge": b"77777777777\0",
            "base256": b"\x80" + (len(raw) * 4).to_bytes(11, "big"),
            "junk": bytes(rng.randrange(256) for _ in range(12)),
        }[choice]
        out[h + 124 : h + 136] = field.ljust(12, b"\0")
        set_checksum(out, h)
        new = tar_entries._number(bytes(out[h + 124 : h + 136]))
        reach = m.data_at + -(-(new or 0) // BLOCK) * BLOCK if new is not None and new >= 0 else m.end
        return bytes(out), and_next(spanning(m.at, max(m.end, reach))), True, NO_SHIFT
    if kind == "type":
        out[h + 156] = rng.choice(b"0125LKxgSV7\0")
        set_checksum(out, h)
        return bytes(out), and_next({i}), True, NO_SHIFT
    if kind == "name":
        other = rng.choice(members)
        name = rng.choice(
            [
                f"{other.key}.{other.field}".encode(),
                b"nodot",
                b"./" + m.key.encode() + b".png",
                rng.randbytes(9),
            ]
        )
        out[h : h + 100] = name[:100].ljust(100, b"\0")
        if rng.random() < 0.7:
            set_checksum(out, h)
        return bytes(out), and_next({i}), True, NO_SHIFT
    assert kind == "zeros"
    at = rng.randrange(len(raw) // BLOCK) * BLOCK
    zeros = bytes(BLOCK * rng.choice([1, 2, 3]))
    out[at:at] = zeros
    return (
        bytes(out),
        spanning(at, at + 1) - {j for j, x in enumerate(members) if x.at == at},
        False,
        (at, len(zeros)),
    )


NO_SHIFT = (-1, 0)
KINDS = ["flip_header", "flip_data", "cut_block", "cut_mid", "size", "type", "name", "zeros"]


class Overrun(BaseException):
    """A read past its deadline (no reader's error handling catches a BaseException: TimeoutError is an
    OSError, which the reader reports and a stream treats as its end)."""


@contextmanager
def deadline(seconds: float):
    """Raise :class:`Overrun` in this (the main) thread if the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise Overrun(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read(url: str, limit: int, offset: int = 0) -> tuple[list, list]:
    """The samples read from ``offset`` and the reasons of the samples lost, in the order they came."""
    got, events = [], []
    with deadline(SECONDS):
        for start, next_start, sample in tario.read_samples(url, offset, on_error=events.append):
            assert sample.pop("__url__") == url
            got.append((start, next_start, sample))
            events.append(start)
            assert len(got) <= limit, "more samples than blocks"
    return got, [e.reason if isinstance(e, tario.ShardFault) else e for e in events]


def lost(events: list) -> list:
    return [e for e in events if not isinstance(e, int)]


def check(
    path: Path,
    samples: dict,
    members: list[Member],
    touched: set[int],
    header_edit: bool,
    shift: tuple[int, int] = (-1, 0),
) -> dict:
    """The properties in the module docstring for one mutant; what it found, for the tally. A sample
    yielded where its original started (moved by zero blocks inserted before it: ``shift``) is that
    sample; one starting elsewhere can only come of an edited header (a member renamed into a key)."""
    data = path.read_bytes()
    origin = {}
    for m in members:
        origin.setdefault(m.key, m.at + (shift[1] if 0 <= shift[0] <= m.at else 0))
    limit = len(data) // BLOCK + 1
    got, events = read(str(path), limit)
    assert (got, events) == read(f"pipe:cat {path}", limit), "the streamed path differs"
    errors = lost(events)
    for i, (start, _, _) in enumerate(got if not header_edit else []):  # resuming at a sample: the same rest
        assert read(str(path), limit, start) == (got[i:], events[events.index(start) :]), start
    with deadline(SECONDS):
        assert tario.count_shard(str(path)) == len(got)
    keys = [s["__key__"] for _, _, s in got]
    assert len(keys) == len(set(keys)), keys
    assert header_edit or set(keys) <= set(samples), keys
    untouched_keys = {m.key for m in members} - {members[i].key for i in touched}
    for start, _, sample in got:
        key = sample["__key__"]
        if start != origin.get(key):
            assert header_edit, (key, start, origin.get(key))
            continue
        for field, value in sample.items():
            j = next((j for j, m in enumerate(members) if (m.key, m.field) == (key, field)), None)
            if j is not None and j not in touched:
                assert value == samples[key][field], (key, field)
        if key in untouched_keys:
            assert set(samples[key]) <= set(sample), f"sample {key} yielded cut"
    assert len(got) + len(errors) >= len(untouched_keys), (keys, errors, sorted(untouched_keys))
    return {"yielded": len(got), "lost": len(errors), "reasons": Counter(errors)}


def run_cases(tmp_path: Path, seed: int, n: int, kinds=KINDS) -> Counter:
    rng = random.Random(seed)
    tally: Counter = Counter()
    bases = {}
    for kind in ("wds", "gnu", "pax"):
        base = tmp_path / f"{kind}.tar"
        bases[kind] = (base, write_base(base, kind, seed), members_of(base))
    mutant = tmp_path / "mutant.tar"
    for case in range(n):
        base, samples, members = bases[rng.choice(list(bases))]
        kind = kinds[case % len(kinds)]
        data, touched, header_edit, shift = mutate(base.read_bytes(), members, rng, kind)
        mutant.write_bytes(data)
        try:
            found = check(mutant, samples, members, touched, header_edit, shift)
        except AssertionError as exn:
            raise AssertionError(f"case {case} ({kind}, seed {seed}, base {base.name}): {exn}") from exn
        tally["cases"] += 1
        tally[f"lost:{kind}"] += found["lost"]
        tally.update(found["reasons"])
    return tally


def test_seeded_mutants_of_valid_shards_read_within_bounds_and_lose_only_what_they_touch(tmp_path):
    t0 = time.perf_counter()
    tally = run_cases(tmp_path, seed=0, n=96)
    assert tally["cases"] == 96
    assert tally["lost:cut_block"] > 0 and tally["lost:size"] > 0  # the mutations do reach the reader
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 5))
def test_thousands_of_seeded_mutants(tmp_path, seed):
    assert run_cases(tmp_path, seed=seed, n=800)["cases"] == 800


@pytest.mark.slow
def test_every_cut_of_every_base_shard(tmp_path):
    """Truncation at every 512-byte boundary and inside every block (at a seeded byte)."""
    rng = random.Random(0)
    for kind in ("wds", "gnu", "pax"):
        base = tmp_path / f"{kind}.tar"
        samples, members = write_base(base, kind, 0), members_of(base)
        raw = base.read_bytes()
        for cut in sorted({c for b in range(0, len(raw), BLOCK) for c in (b, b + rng.randrange(1, BLOCK))}):
            path = tmp_path / "cut.tar"
            path.write_bytes(raw[:cut])
            touched = {j for j, x in enumerate(members) if x.end > cut}
            check(path, samples, members, touched, header_edit=False)


def test_the_fuzzer_sees_what_the_reader_sees(tmp_path):
    """The oracle's member layout is tarfile's, and an unmutated base reads whole through both paths."""
    for kind in ("wds", "gnu", "pax"):
        base = tmp_path / f"{kind}.tar"
        samples = write_base(base, kind, 3)
        members = members_of(base)
        assert {m.key for m in members} == set(samples) and len(members) == 16
        found = check(base, samples, members, set(), header_edit=False)
        assert found == {"yielded": 4, "lost": 0, "reasons": Counter()}
    assert subprocess.run(["cat", str(base)], capture_output=True).stdout == base.read_bytes()
