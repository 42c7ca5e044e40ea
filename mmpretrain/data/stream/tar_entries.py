"""The entries of a tar, wherever its bytes come from: a local file (read by seeks), an object in a store
(``s3://``, ``gs://``, any fsspec URL: read by ranged reads, see :mod:`mmpretrain.storage`), a stream
(``pipe:``, ``http://``), or any of them gzip-compressed (known by its first bytes; positions then count bytes
of the uncompressed tar).

:func:`walk` parses each header itself (only what a reader needs: name, size, type, the checksum, GNU long
names and pax ``path``/``size``) and hands on entries and the gaps between them: a header that does not
read as one starts a gap, which ends at the next block holding a header with a valid checksum, searched
block by block from just after the last good header. Every step moves or scans forward, so a walk takes
time linear in the file's size whatever the file holds.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, NamedTuple

from mmpretrain.storage import RangedReader, is_remote


class LocalTar:
    """A local plain tar: reads seek."""

    def __init__(self, f: IO):
        self.f, self.size = f, os.fstat(f.fileno()).st_size

    def read(self, pos: int, n: int) -> bytes:
        self.f.seek(pos)
        return self.f.read(n)

    def length(self) -> int:
        return self.size

    def release(self, pos: int) -> None:
        pass


class RemoteTar(LocalTar):
    """A plain tar in a store: reads are ranged reads (retried on transient errors), so what lies
    before the first offset read is never fetched."""

    def __init__(self, reader: RangedReader):
        self.reader = reader

    def read(self, pos: int, n: int) -> bytes:
        return self.reader.read_at(pos, n)

    def length(self) -> int:
        return self.reader.size()


class StreamedTar:
    """A forward-only stream read by position: it keeps the bytes from the last :meth:`release` on (the
    sample in progress, a region a resync scans) and reads on as far as a read asks. A failing read (a cut
    or corrupt gzip stream) ends it as if the file ended there."""

    def __init__(self, f: IO, head: bytes = b""):
        self.f, self.base, self.buf, self.eof = f, 0, bytearray(head), False

    def _fill(self, upto: int) -> None:
        while self.base + len(self.buf) < upto and not self.eof:
            try:
                chunk = self.f.read(min(max(upto - self.base - len(self.buf), 1 << 16), 1 << 22))
            except (OSError, EOFError):  # gzip: a bad CRC or a cut stream (zlib.error is an OSError)
                chunk = b""
            self.eof = not chunk
            self.buf += chunk

    def read(self, pos: int, n: int) -> bytes:
        assert pos >= self.base, "a stream is read forward"
        self._fill(pos + n)
        return bytes(memoryview(self.buf)[pos - self.base : pos - self.base + n])

    def length(self) -> int | None:
        """The file's length once its end has been read, else None."""
        return self.base + len(self.buf) if self.eof else None

    def release(self, pos: int) -> None:
        """Forget the bytes before ``pos`` (reading and dropping those not read yet)."""
        while True:
            cut = min(pos - self.base, len(self.buf))
            if cut > 0:
                del self.buf[:cut]
                self.base += cut
            if self.base >= pos or self.eof:
                return
            self._fill(min(pos, self.base + (1 << 20)))


class _Unread(io.RawIOBase):
    """``f`` with the bytes already read from it (``head``) put back in front."""

    def __init__(self, head: bytes, f: IO):
        self.head, self.f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.head[: len(b)] if self.head else self.f.read(len(b))
        self.head = self.head[len(data) :]
        b[: len(data)] = data
        return len(data)


_GZIP = b"\x1f\x8b"


@contextmanager
def open_tar(url: str, offset: int = 0) -> Iterator[LocalTar | StreamedTar]:
    """The tar at ``url`` for reading from ``offset`` on."""
    if is_remote(url):
        with RangedReader(url) as reader:
            # A resumed reader's first request is the ranged read at its offset: a valid header there
            # says the object is a plain tar, without a read of its first bytes.
            at_offset = reader.read_at(offset, _BLOCK) if offset else b""
            plain = len(at_offset) == _BLOCK and not isinstance(_parse_header(at_offset), str)
            if plain or reader.read_at(0, 2) != _GZIP:
                yield RemoteTar(reader)
                return
            with gzip.GzipFile(fileobj=reader) as gz:
                yield StreamedTar(gz)
        return
    if _local(url):
        with open(os.path.expanduser(url), "rb") as f:
            if f.read(2) != _GZIP:
                yield LocalTar(f)
                return
            f.seek(0)
            with gzip.GzipFile(fileobj=f) as gz:
                yield StreamedTar(gz)
        return
    from webdataset.gopen import gopen

    with gopen(url, "rb") as stream:
        head = stream.read(2)
        if head != _GZIP:
            yield StreamedTar(stream, head)
            return
        with gzip.GzipFile(fileobj=_Unread(head, stream)) as gz:
            yield StreamedTar(gz)


def _local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def seekable(url: str) -> bool:
    if not _local(url):
        return False
    with open(os.path.expanduser(url), "rb") as f:
        return f.read(2) != _GZIP


# -- headers ----------------------------------------------------------------------------------------
_BLOCK = 512
REGULAR = frozenset(b"0\x007")  # regular, old-style regular, contiguous: what ``TarInfo.isreg`` reads
_NO_DATA = frozenset(b"123456")  # links, devices, directories, fifos: no data blocks follow the header
_LONG_NAME, _LONG_LINK, SPARSE, _GLOBAL_PAX = ord("L"), ord("K"), ord("S"), ord("g")
_PAX = frozenset(b"xgX")  # a member's, global, Solaris's (tarfile reads it as a member's)
_EXTENDED = _PAX | {_LONG_NAME, _LONG_LINK}
_MAX_EXTENDED = 1 << 20  # a long name or pax header beyond this is no header
_HIGH = bytes(range(128, 256))
_ZEROS, _EOF = "zero blocks inside the archive", "no end-of-archive block (the shard was cut short)"


def _number(field: bytes) -> int | None:
    """A numeric header field: octal digits padded with spaces (what follows a NUL is ignored, as tarfile
    does), or GNU base-256 when its first byte is 0x80; None for anything else, a minus sign included."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits.isdigit():  # int() would take a sign, blanks and underscores
        return None if digits else 0
    try:
        return int(digits, 8)
    except ValueError:  # an 8 or a 9
        return None


def _parse_header(buf: bytes) -> tuple[str, int, int] | str:
    """``(name, size, type)`` of a 512-byte header as ``TarInfo.frombuf`` reads it (an old-style directory,
    a regular file whose name ends in a slash, has type ``5``), or why it is none."""
    checksum = _number(buf[148:156])
    if checksum is None:
        return "corrupt tar header"
    unsigned = 256 + sum(buf) - sum(buf[148:156])
    # Old writers summed signed bytes: each byte over 127 then counts 256 less.
    wrong = unsigned - checksum
    if wrong and (wrong % 256 or wrong // 256 != 504 - len((buf[:148] + buf[156:]).translate(None, _HIGH))):
        return "corrupt tar header"
    size = _number(buf[124:136])
    if size is None:
        return "corrupt tar header (a size that is negative or no tar number)"
    kind = buf[156]
    name = buf[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    if kind == 0 and name.endswith("/"):
        kind = ord("5")
    prefix = buf[345:500].split(b"\0", 1)[0]
    if prefix and kind not in (_LONG_NAME, _LONG_LINK, SPARSE):  # as frombuf joins it
        name = prefix.decode(tarfile.ENCODING, "surrogateescape") + "/" + name
    return name, size, kind


def _pax_records(data: bytes) -> dict[bytes, bytes] | None:
    """The ``keyword=value`` records of a pax header (``"%d %s=%s\\n"``, the length counting the whole
    record; NULs may pad the end), or None when they do not parse as such."""
    records, pos = {}, 0
    while pos < len(data) and data[pos]:
        space = data.find(b" ", pos, pos + 21)
        length = data[pos:space]
        if space < 0 or not length.isdigit():
            return None
        end = pos + int(length)
        keyword, eq, value = data[space + 1 : end - 1].partition(b"=")
        if end <= space + 1 or end > len(data) or data[end - 1] != 0x0A or not eq:
            return None
        records[keyword] = value
        pos = end
    return records


def _pax_text(value: bytes, records: dict[bytes, bytes]) -> str:
    """A pax value decoded as ``TarFile._proc_pax`` decodes it."""
    encoding = tarfile.ENCODING if records.get(b"hdrcharset") == b"BINARY" else "utf-8"
    try:
        return value.decode(encoding, "strict")
    except UnicodeDecodeError:
        return value.decode(tarfile.ENCODING, "surrogateescape")


class Entry(NamedTuple):
    at: int  # its first header (an extended one if any): the member's offset
    name: str
    size: int
    kind: int
    data_at: int
    end: int  # where the next entry's first header is
    cut: bool = False  # the file ends before ``end``


class Gap(NamedTuple):
    at: int
    reason: str


def _entry_at(src: LocalTar | StreamedTar, at: int) -> Entry | str:
    """The entry whose first header is at ``at``, its extended headers (GNU long names, pax) applied, the
    first one winning as in tarfile; or why there is none: a reason, :data:`_ZEROS` for an all-zero
    block, :data:`_EOF` at the file's end."""
    name = size = None  # as extended headers set them
    sparse, pos = False, at
    while True:
        buf = src.read(pos, _BLOCK)
        if len(buf) < _BLOCK:
            return _EOF if pos == at and not buf else "the file ends inside a header"
        header = _parse_header(buf)
        if isinstance(header, str):
            return _ZEROS if pos == at and buf.count(0) == _BLOCK else header
        hname, hsize, kind = header
        data_at = pos + _BLOCK
        if kind not in _EXTENDED:
            size = hsize if size is None else size
            # A member's data fills whole 512-byte blocks after its header; the next header follows them.
            end = data_at + (0 if kind in _NO_DATA else _blocks(size))
            return Entry(at, hname if name is None else name, size, SPARSE if sparse else kind, data_at, end)
        if hsize > _MAX_EXTENDED:
            return "an extended header over 1 MiB"
        data = src.read(data_at, hsize)
        if len(data) < hsize:
            return "the file ends inside a header"
        if kind == _LONG_NAME and name is None:
            name = data.split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
        elif kind in _PAX and kind != _GLOBAL_PAX:
            records = _pax_records(data)
            if records is None or not records.get(b"size", b"0").isdigit():
                return "corrupt pax header"
            if name is None and b"path" in records:
                name = _pax_text(records[b"path"], records)
            if size is None and b"size" in records:
                size = int(records[b"size"])
            sparse = sparse or any(k.startswith(b"GNU.sparse.") for k in records)
        pos = data_at + _blocks(hsize)


def _blocks(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _resync(src: LocalTar | StreamedTar, start: int, keep: bool) -> tuple[int | None, bool]:
    """The first block at or after ``start`` (a multiple of 512 from it) that holds a header with a valid
    checksum, None when none does before the file's end; and whether every byte before it was zero. A
    stream forgets what was scanned once a non-zero byte is seen, or at once unless ``keep``."""
    zeros, pos, step = True, start, 64 * _BLOCK
    while True:
        chunk = src.read(pos, step)
        for i in range(0, len(chunk) - _BLOCK + 1, _BLOCK):
            block = chunk[i : i + _BLOCK]
            if not isinstance(_parse_header(block), str):
                return pos + i, zeros
            zeros = zeros and block.count(0) == _BLOCK
        if len(chunk) < step:
            return None, zeros and chunk.count(0) == len(chunk)
        pos += step
        if not (keep and zeros):
            src.release(pos)


def walk(src: LocalTar | StreamedTar, offset: int) -> Iterator[Entry | Gap]:
    """The entries and gaps of the tar from ``offset`` on, in the order they lie. An entry the file ends
    inside comes with ``cut`` set; a gap ends at the next entry a resync finds."""
    at, scan = offset, offset + _BLOCK  # scan: where a resync starts, just after the last good header
    entry = _entry_at(src, at)
    while True:
        if isinstance(entry, Entry):
            follow = _entry_at(src, entry.end)  # on a stream this reads through the entry's data
            length = src.length()
            if length is None or entry.end <= length:
                yield entry
                at, scan, entry = entry.end, entry.data_at, follow
                continue
            yield entry._replace(cut=True)
            at, scan, reason = entry.at, entry.data_at, "the file ends inside a member"
        else:
            reason = entry
        if reason == _EOF:
            yield Gap(at, reason)
            return
        if reason == _ZEROS:
            scan = at + _BLOCK
        zeros = reason == _ZEROS
        while True:
            found, before = _resync(src, scan, keep=zeros)
            zeros = zeros and before
            if found is None:
                break
            entry = _entry_at(src, found)
            if isinstance(entry, Entry):
                break
            scan, zeros = found + _BLOCK, False
        if found is None and zeros:
            return  # the end-of-archive blocks, padded with zeros to the file's end
        yield Gap(at, reason)
        if found is None:
            return
        at, scan = found, found + _BLOCK
