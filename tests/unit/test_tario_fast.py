"""The tar reader's own header parser reads every valid shard exactly as :mod:`tarfile` does: the same
members (offset, name, bytes) from any offset, from a local file (seeks), a stream or a gzip file."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from mmpretrain.data.stream import tar_entries
from mmpretrain.data.stream import tar_reader as tario

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def write_wds(path: Path, n: int = 20) -> Path:
    """A webdataset shard: a pax header with the time before each member."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write(
                {
                    "__key__": f"{i:06d}",
                    "png": bytes(i * 97),
                    "txt": b"t" * i,
                    "cls": b"%d" % i,
                    "json": b"{}",
                }
            )
    return path


def write_tar(path: Path, fmt: int | str) -> Path:
    if fmt == "webdataset":
        return write_wds(path, n=3)
    """Members of every kind the reader meets: webdataset samples, empty and block-sized files,
    a directory, a symlink, a long name (a ustar prefix, a GNU or pax long name), a ``__index__``."""

    def add(tf, name, data=b"", kind=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name)
        info.type, info.size, info.linkname, info.mtime = (
            kind,
            len(data) if kind == tarfile.REGTYPE else 0,
            link,
            7,
        )
        tf.addfile(info, io.BytesIO(data) if info.size else None)

    long_dir = "d" * 90 + "/" + "e" * 60  # 151 chars: fits as ustar prefix + name
    with tarfile.open(path, "w", format=fmt) as tf:
        add(tf, "__index__", b"{}")  # skipped, as webdataset skips __x__ members
        add(tf, "dir", kind=tarfile.DIRTYPE)
        add(tf, "dir/0001.png", bytes(range(256)) * 3)
        add(tf, "dir/0001.txt", b"a caption")
        add(tf, "dir/0001.cls", b"")  # size 0
        add(tf, "dir/0002.npy", b"x" * 512)  # exactly one block
        add(tf, "dir/0002.json", b"y" * 1024)  # exactly two blocks
        add(tf, "dir/link.txt", kind=tarfile.SYMTYPE, link="0001.txt")
        add(tf, f"{long_dir}/0003.txt", b"long dir")
        if fmt != tarfile.USTAR_FORMAT:  # a name no ustar header can hold
            add(tf, "f" * 120 + "/0004.txt", b"long name")
            add(tf, "g" * 130 + ".txt", b"long base name")
        add(tf, "dir/0005.txt", b"after the long names")
    return path


def fast(path: Path | str, offset: int = 0) -> list:
    """``(offset, name, bytes)`` of each regular member, as the reader walks them."""
    with tar_entries.open_tar(str(path)) as src:
        src.release(offset)
        return [
            (e.at, e.name, src.read(e.data_at, e.size))
            for e in tar_entries.walk(src, offset)
            if isinstance(e, tar_entries.Entry) and e.kind in tar_entries.REGULAR
        ]


def slow(path: Path, offset: int = 0) -> list:
    """The same by :mod:`tarfile`."""
    with tarfile.open(path) as tf:
        return [(m.offset, m.name, tf.extractfile(m).read()) for m in tf if m.isreg() and m.offset >= offset]


def no_tarfile(monkeypatch) -> None:
    """Make any use of tarfile's reading fail."""

    def refuse(*args, **kwargs):
        raise AssertionError("read with tarfile")

    monkeypatch.setattr(tarfile.TarFile, "next", refuse)
    monkeypatch.setattr(tarfile.TarInfo, "frombuf", refuse)


@pytest.mark.parametrize("fmt", FORMATS)
def test_members_equal_tarfiles_for_ustar_gnu_and_pax_from_every_offset(tmp_path, fmt, monkeypatch):
    path = write_tar(tmp_path / "s.tar", FORMATS[fmt])
    want = [m for m in slow(path) if not m[1].startswith("__")]  # __index__: tarfile lists it, we skip it
    names = [name for _, name, _ in want]
    assert "dir/0001.cls" in names and "dir/0005.txt" in names and "dir/link.txt" not in names
    assert any(name.startswith("d" * 90 + "/") for name in names)
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    no_tarfile(monkeypatch)
    got = [m for m in fast(path) if not m[1].startswith("__")]
    assert got == want
    for at, _, _ in want:  # from every member's offset: the same rest of the shard, seeking or streaming
        rest = [m for m in want if m[0] >= at]
        assert fast(path, at) == fast(f"pipe:cat {path}", at) == fast(gz, at) == rest


def test_non_ascii_and_undecodable_names_decode_as_tarfile_does(tmp_path, monkeypatch):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name in ("é/0001.txt", "ü/0002.txt"):  # latin-1 bytes: not utf-8
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"z"))
    assert fast(path) == slow(path)
    assert fast(path)[0][1] == b"\xe9/0001.txt".decode("utf-8", "surrogateescape")
    raw = bytearray(path.read_bytes())  # an old writer's checksum: the sum of signed bytes
    header = raw[:512]
    signed = 256 + sum(b - 256 if b > 127 else b for b in header[:148] + header[156:])
    raw[148:156] = b"%06o\0 " % signed
    path.write_bytes(bytes(raw))
    want = slow(path)
    no_tarfile(monkeypatch)
    assert fast(path) == want and len(want) == 2


def test_base256_sizes_and_pax_sizes_are_read_as_tarfile_reads_them(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i, data in enumerate((b"a" * 700, b"b" * 3)):
            info = tarfile.TarInfo(f"{i:04d}.bin")
            info.size, info.pax_headers = len(data), {"size": str(len(data))}
            tf.addfile(info, io.BytesIO(data))
    raw = bytearray(path.read_bytes())  # the first member's own header: size in GNU base-256
    with tarfile.open(path) as tf:
        h = tf.getmembers()[1].offset_data - 512
    raw[h + 124 : h + 136] = b"\x80" + (3).to_bytes(11, "big")
    raw[h + 148 : h + 156] = b" " * 8
    raw[h + 148 : h + 156] = b"%06o\0 " % sum(raw[h : h + 512])
    path.write_bytes(bytes(raw))
    assert fast(path) == slow(path) and [len(d) for _, _, d in fast(path)] == [700, 3]


def test_webdataset_shards_are_read_without_tarfile(tmp_path, monkeypatch):
    path = write_wds(tmp_path / "wds.tar")
    want = slow(path)
    no_tarfile(monkeypatch)
    assert fast(path) == want and len(want) == 80  # an empty png (sample 0) is a member too
    assert [s["__key__"] for _, _, s in tario.read_samples(str(path), want[40][0])] == [
        f"{i:06d}" for i in range(10, 20)
    ]


def test_samples_group_members_as_webdataset_does(tmp_path):
    import webdataset as wds

    path = write_tar(tmp_path / "s.tar", tarfile.PAX_FORMAT)
    ours = [s for _, _, s in tario.read_samples(str(path))]
    theirs = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs][: len(ours)]
    assert [s["__key__"] for s in ours][:2] == ["dir/0001", "dir/0002"]
    for a, b in zip(ours, theirs):
        assert {k: v for k, v in a.items() if k != "__url__"} == {
            k: v for k, v in b.items() if not k.startswith("__")
        } | {"__key__": b["__key__"]}
