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
_END = -1  # ``next_start`` after a shard's last sample (position.END)


@contextmanager
def _open(url: str, offset: int) -> Iterator[tuple[tarfile.TarFile, IO[bytes]]]:
    if _local(url):
        with open(os.path.expanduser(url), "rb") as f:
            f.seek(offset)
            # A TarFile reads from wherever its file object stands; member offsets stay absolute.
            yield tarfile.TarFile(fileobj=f), f
        return
    from webdataset.gopen import gopen

    with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
        yield tf, stream


def _members(url: str, offset: int) -> Iterator[tuple[int, str, bytes]]:
    """``(header offset, name, bytes)`` of each regular member at or after ``offset``."""
    with _open(url, offset) as (tf, _):
        for info in tf:
            if info.offset < offset or not info.isreg() or _META.match(info.name):
                continue  # a streamed remote shard: members before the offset pass unread
            data = tf.extractfile(info).read()
            yield info.offset, info.name, data
            tf.members = []  # keep no list of every member of a large shard


def read_samples(url: str, offset: int = 0, on_error: Callable[[Exception], Any] | None = None,
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
            yield start, _END, sample
        return
    if sample is not None:
        yield start, _END, sample


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
