"""Samples out of a tar shard, each with the byte offset it starts at.

A sample is a run of consecutive regular members sharing a key (``dir/key.ext``: the key is the
name up to the first dot of its basename, the lower-cased rest is the field), as webdataset groups
them. Every sample comes with its *reference*, the offset of its first member's header: reading
from that offset (:func:`read_samples`) or re-reading that one sample (:func:`read_sample_at`)
seeks straight there on a local file; what lies before it is never read, let alone decoded.
Remote shards (``pipe:``, ``http://``) are streamed and the members before the offset skipped.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
END = (
    -1
)  #: ``next_start`` after a shard's last sample (a position's offset once its shard is read to the end)


@contextmanager
def _open(url: str, offset: int) -> Iterator[IO[bytes]]:
    if _local(url):
        with open(os.path.expanduser(url), "rb") as f:
            f.seek(offset)
            yield f
        return
    from webdataset.gopen import gopen

    with gopen(url, "rb") as stream:
        yield stream


def _members(url: str, offset: int) -> Iterator[tuple[int, str, bytes]]:
    """``(header offset, name, bytes)`` of each regular member at or after ``offset``."""
    with _open(url, offset) as f:
        if _local(url):
            yield from _members_fast(f, offset)
        else:
            with tarfile.open(fileobj=f, mode="r|") as tf:
                yield from _members_tarfile(tf, offset)


def _members_tarfile(tf: tarfile.TarFile, offset: int) -> Iterator[tuple[int, str, bytes]]:
    """:func:`_members` as :mod:`tarfile` reads them (from wherever ``tf``'s file object stands)."""
    for info in tf:
        if info.offset < offset or not info.isreg() or _META.match(info.name):
            continue  # a streamed remote shard: members before the offset pass unread
        data = tf.extractfile(info).read()
        yield info.offset, info.name, data
        tf.members = []  # keep no list of every member of a large shard


_BLOCK = 512
_REGULAR = frozenset(b"0\x007")  # regular, old-style regular, contiguous: what ``TarInfo.isreg`` reads
_DIRECTORY, _PAX = ord("5"), ord("x")
_TIMES_ONLY = re.compile(rb"(?:[0-9]+ [acm]time=[0-9]+(?:[.][0-9]+)?\n)+")  # webdataset's pax headers


def _members_fast(f: IO[bytes], offset: int) -> Iterator[tuple[int, str, bytes]]:
    """:func:`_members_tarfile` on a seekable local file, parsing of each header only the name,
    size and type (and checking its checksum), where ``TarInfo.frombuf`` parses every field. A pax
    header that only sets times (what webdataset writes before each member) is skipped. Any header
    this does not read exactly as :mod:`tarfile` would (other pax or GNU extensions, links, a bad
    checksum, a cut header ...) hands the rest of the shard, from that header on, to :mod:`tarfile`,
    which then raises or stops as it does for any tar."""
    pos = offset
    while True:
        at = pos  # the member's offset: its first header, an extended one if any
        buf = f.read(_BLOCK)
        member = _parse_header(buf)
        if member is not None and member[2] == _PAX:
            extended = f.read(_blocks(member[1]))
            buf = f.read(_BLOCK)
            member = _parse_header(buf) if _times_only(extended, member[1]) else None
            if member is not None and member[2] == _PAX:
                member = None
        if member is None:
            if f.tell() == at + _BLOCK and buf.count(0) == _BLOCK:
                return  # end of archive
            f.seek(at)
            yield from _members_tarfile(tarfile.TarFile(fileobj=f), at)
            return
        name, size, kind = member
        data_at = f.tell()
        # A member's data fills whole 512-byte blocks after its header; the next header follows them.
        pos = data_at + (_blocks(size) if kind in _REGULAR else 0)
        if kind not in _REGULAR or _META.match(name):
            if pos != data_at:  # tarfile seeks past the data and checks it was there
                f.seek(pos - 1)
                if not f.read(1):
                    raise tarfile.ReadError("unexpected end of data")
            continue
        chunk = f.read(pos - data_at)  # the data and its padding to the next header
        if len(chunk) < size:
            raise tarfile.ReadError("unexpected end of data")
        yield at, name, chunk[:size] if len(chunk) > size else chunk
        if len(chunk) < pos - data_at:  # cut in the padding: tarfile notices at the next header
            raise tarfile.ReadError("unexpected end of data")


def _blocks(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _parse_header(buf: bytes) -> tuple[str, int, int] | None:
    """``(name, size, kind)`` of a regular file, directory or pax header as ``TarInfo.frombuf``
    would read it, or None for any other header (including a cut, empty or corrupt one). An
    old-style directory (a regular file whose name ends in a slash) has kind ``_DIRECTORY``."""
    if len(buf) != _BLOCK:
        return None
    kind = buf[156]
    if kind not in _REGULAR and kind != _DIRECTORY and kind != _PAX:
        return None
    try:
        checksum = int(buf[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(buf[124:136].split(b"\0", 1)[0].strip() or b"0", 8)  # base-256 (GNU): fails here
    except ValueError:
        return None
    unsigned = 256 + sum(buf) - sum(buf[148:156])
    if checksum != unsigned and checksum != unsigned - 256 * sum(1 for b in buf[:148] + buf[156:] if b > 127):
        return None  # not a header tarfile would read: it says so itself
    name = buf[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    if kind == 0 and name.endswith("/"):
        kind = _DIRECTORY
    prefix = buf[345:500].split(b"\0", 1)[0]
    if prefix:  # frombuf joins it whatever the magic says (GNU headers keep it empty)
        name = prefix.decode(tarfile.ENCODING, "surrogateescape") + "/" + name
    return name, size, kind


def _times_only(extended: bytes, size: int) -> bool:
    """Whether a pax header's records (``extended``, with its padding) are well-formed times only,
    which change nothing that is read here."""
    if len(extended) != _blocks(size) or extended.count(0, size) != len(extended) - size:
        return False
    records = extended[:size]
    if not _TIMES_ONLY.fullmatch(records):
        return False
    return all(int(r.split(b" ", 1)[0]) == len(r) + 1 for r in records[:-1].split(b"\n"))


def read_samples(
    url: str,
    offset: int = 0,
    on_error: Callable[[Exception], Any] | None = None,
) -> Iterator[tuple[int, int, dict]]:
    """``(start, next_start, sample)`` for each sample from ``offset`` to the end of the shard.

    ``next_start`` is where the following sample begins (the end of the shard after the last one).
    A truncated or corrupt shard ends at the fault: the sample cut there is yielded as far as it
    was read, after ``on_error`` got the error (with ``url`` as its last argument), once.
    """
    sample: dict | None = None
    start = offset
    try:
        for at, name, data in _members(url, offset):
            match = _KEY.match(name)
            if not match:
                continue
            key, field = match.group(1), match.group(2).lower()
            if sample is not None and key != sample["__key__"]:
                yield start, at, sample
                sample = None
            if sample is None:
                sample, start = {"__key__": key, "__url__": url}, at
            if field in sample:
                raise ValueError(f"{name}: duplicate file name in tar file {url}")
            sample[field] = data
    except (tarfile.TarError, OSError, ValueError) as exn:
        exn.args = (*exn.args, url)
        if on_error is None:
            raise
        on_error(exn)  # counted before the cut sample is handed on: a position after it includes the fault
        if sample is not None:
            yield start, END, sample
        return
    if sample is not None:
        yield start, END, sample


def _local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def read_sample_at(url: str, offset: int) -> dict:
    """The one sample that starts at ``offset`` (as far as it can be read: a cut one stays cut)."""
    for _, _, sample in read_samples(url, offset, on_error=lambda exn: None):
        return sample
    raise ValueError(f"no sample at offset {offset} of {url}")


def read_samples_at(url: str, offsets: list[int]) -> dict[int, dict]:
    """The samples of one shard that start at ``offsets``: a seek for each on a local file, a single
    pass over a remote one (skipping what lies between, undecoded)."""
    if _local(url):
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
