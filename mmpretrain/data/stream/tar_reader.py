"""Samples out of a tar shard, each with the byte offset it starts at.

A sample is a run of consecutive regular members sharing a key (:func:`member_key`), as webdataset
groups them. Every sample comes with its *reference*, the offset of its first member's first header:
reading from that offset (:func:`read_samples`) or re-reading that one sample (:func:`read_sample_at`)
seeks straight there on a local tar; what lies before it is never read. Streamed shards (``pipe:``,
``http://``) and gzip-compressed ones (``.tar.gz``, known by their first bytes) are read forward, their
offsets counting bytes of the uncompressed tar, and what lies before an offset is skipped undecoded.
:func:`count_shard` counts the samples the reader yields, from the headers alone.

A damaged shard loses only the samples the damage reaches, each reported (:class:`ShardFault`), none
yielded cut. Around a gap in the tar (see :mod:`~mmpretrain.data.stream.tar_entries`: a bad checksum, a
negative size, an entry past the file's end, zero blocks, the file's end before the end-of-archive
blocks) the sample in progress and the first one after it may have lost members: both are dropped, and
the next one too when that first one has a single member (its name may have been in a pax header or GNU
long name the gap took). So are a sample with two members for one field, one whose key recurs after
other samples (its members are not consecutive) and one with a GNU sparse member.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mmpretrain.data.stream.tar_entries import REGULAR, SPARSE, Entry, Gap, open_tar, seekable, walk

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
END = (
    -1
)  #: ``next_start`` after a shard's last sample (a position's offset once its shard is read to the end)


def member_key(name: str) -> tuple[str, str] | None:
    """``(key, field)`` of a member name, the one rule for every reader and counter: the key is the name up
    to the first dot of its basename, the field the lower-cased rest; a leading ``./`` (what ``tar -C dir
    -cf x.tar .`` writes) is no part of the key. None for names that are no sample's field: ``__meta__``
    names and basenames without a dot or starting with one (``.DS_Store``, macOS's ``._0001.jpg``)."""
    while name.startswith("./"):
        name = name[2:]
    match = None if _META.match(name) else _KEY.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


class ShardFault(ValueError):
    """One sample of a shard lost to damage in the tar: ``reason`` (the same text for every such fault),
    ``key`` (None when the samples lost are unknown), ``offset`` and ``url`` (the last of ``args``)."""

    def __init__(self, reason: str, url: str, key: str | None = None, offset: int = 0):
        what = f"sample '{key}'" if key is not None else "the samples there"
        super().__init__(f"{what} lost: {reason}, at offset {offset} of {url}", url)
        self.reason, self.url, self.key, self.offset = reason, url, key, offset

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class _Sample:
    key: str
    start: int
    members: list[tuple[str, Entry]] = field(default_factory=list)
    fault: str | None = None
    after: Gap | None = None  # the gap this sample is the first after


def _samples(
    url: str, offset: int, on_error: Callable[[Exception], Any] | None, with_data: bool
) -> Iterator[tuple[int, int, dict]]:
    """:func:`read_samples`, or with ``with_data=False`` the same samples without their members' bytes
    (none is read: a local plain tar seeks past them)."""

    def lose(reason: str, key: str | None, at: int) -> None:
        exn = ShardFault(reason, url, key, at)
        if on_error is None:
            raise exn
        on_error(exn)

    def settle(sample: _Sample, next_start: int) -> Iterator[tuple[int, int, dict]]:
        if sample.fault is not None:
            lose(sample.fault, sample.key, sample.start)
            return
        out = {"__key__": sample.key, "__url__": url}
        for name, m in sample.members:
            out[name] = src.read(m.data_at, m.size) if with_data else None
            if with_data and len(out[name]) != m.size:  # the file changed while read
                lose("the file ends inside a member", sample.key, sample.start)
                return
        yield sample.start, next_start, out

    with open_tar(url, offset) as src:
        src.release(offset)
        cur: _Sample | None = None
        seen: set[str] = set()
        gap: Gap | None = None  # a gap no sample has followed yet: the next one may have lost to it
        charged = False  # whether a sample was dropped for that gap
        for item in walk(src, offset):
            if isinstance(item, Gap):
                if cur is not None:
                    cur.fault = cur.fault or item.reason
                gap, charged = item, cur is not None
                continue
            key_field = member_key(item.name) if item.kind in REGULAR or item.kind == SPARSE else None
            if key_field is None:
                continue
            key, name = key_field
            if cur is None or key != cur.key:
                after = gap
                # The first member after a gap may bear the short name of a ustar header whose pax header
                # or GNU long name the gap took: unless a second member confirms its key, the sample
                # after it may have lost that member.
                if gap is None and cur is not None and cur.after is not None and len(cur.members) == 1:
                    gap = cur.after
                if cur is not None:
                    yield from settle(cur, item.at)
                cur = _Sample(key, item.at, after=after)
                src.release(item.at)
                if key in seen:
                    cur.fault = "its members are not consecutive (tar them sorted: tar --sort=name)"
                elif gap is not None:
                    cur.fault, charged = gap.reason, True
                seen.add(key)
            gap = None  # a gap inside this sample: the next one lost nothing to it
            if any(name == n for n, _ in cur.members):
                cur.fault = cur.fault or f"two members for field '{name}'"
            elif item.kind == SPARSE or item.cut:
                cur.fault = cur.fault or (
                    "a GNU sparse member" if item.kind == SPARSE else "the file ends inside a member"
                )
            cur.members.append((name, item))
        if cur is not None:
            yield from settle(cur, END)
        if gap is not None and not charged:
            lose(gap.reason, None, gap.at)


def read_samples(
    url: str,
    offset: int = 0,
    on_error: Callable[[Exception], Any] | None = None,
) -> Iterator[tuple[int, int, dict]]:
    """``(start, next_start, sample)`` for each whole sample from ``offset`` to the end of the shard.

    ``next_start`` is where the member after the sample begins (:data:`END` after the last); reading from
    it yields the samples that follow here, except that a key recurring from before it goes unnoticed.
    Each sample lost (see the module docstring) is reported to ``on_error`` as a :class:`ShardFault`, one
    call per sample and before the next sample is yielded; without ``on_error`` the first is raised. An
    I/O error ends the shard, reported once with ``url`` as the last of its args.
    """
    try:
        yield from _samples(url, offset, on_error, with_data=True)
    except OSError as exn:
        exn.args = (*exn.args, url)
        if on_error is None:
            raise
        on_error(exn)


def count_shard(url: str, on_error: Callable[[Exception], Any] = lambda exn: None) -> int:
    """How many samples :func:`read_samples` yields from ``url``, counted from the headers alone; the
    samples it would lose go to ``on_error`` as they would there."""
    return sum(1 for _ in _samples(url, 0, on_error, with_data=False))


def first_sample_fields(url: str) -> set[str]:
    """The fields (member extensions) of ``url``'s first whole sample, from the tar headers alone (no
    member's bytes are read); empty for a shard without one."""
    for _, _, sample in _samples(url, 0, lambda exn: None, with_data=False):
        return {k for k in sample if not k.startswith("__")}
    return set()


def read_sample_at(url: str, offset: int) -> dict:
    """The one sample that starts at ``offset``."""
    for start, _, sample in read_samples(url, offset, on_error=lambda exn: None):
        if start == offset:
            return sample
        break
    raise ValueError(f"no sample at offset {offset} of {url}")


def read_samples_at(url: str, offsets: list[int]) -> dict[int, dict]:
    """The samples of one shard that start at ``offsets``: a seek for each on a local plain tar, a single
    pass over any other (skipping what lies between, undecoded)."""
    if seekable(url):
        return {off: read_sample_at(url, off) for off in offsets}
    wanted, found = set(offsets), {}
    for start, _, sample in read_samples(url, min(offsets), on_error=lambda exn: None):
        if start in wanted:
            found[start] = sample
            if len(found) == len(wanted):
                break
    missing = wanted - set(found)
    if missing:
        raise ValueError(f"no sample at offsets {sorted(missing)[:5]} of {url}")
    return found
