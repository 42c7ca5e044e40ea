"""The local-file fast path of the tar reader reads every shard exactly as :mod:`tarfile` does:
same members (offset, name, bytes), same errors at the same points, from any offset."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

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


def fast(path: Path, offset: int = 0) -> list:
    with open(path, "rb") as f:
        f.seek(offset)
        return list(tario._members_fast(f, offset))


def slow(path: Path, offset: int = 0) -> list:
    with open(path, "rb") as f:
        f.seek(offset)
        return list(tario._members_tarfile(tarfile.TarFile(fileobj=f), offset))


def no_fallback(monkeypatch) -> None:
    """Make the fast path fail if it hands any header to tarfile."""

    def refuse(tf, offset):
        raise AssertionError("fell back to tarfile")

    monkeypatch.setattr(tario, "_members_tarfile", refuse)


def outcome(read, *args) -> tuple[list, str | None]:
    """What a reader yields before it stops, and the type of error it stops with."""
    got: list = []
    try:
        for x in read(*args):
            got.append(x)  # noqa: PERF402 (what came before the error is kept)
    except tarfile.TarError as exn:
        return got, type(exn).__name__
    return got, None


@pytest.mark.parametrize("fmt", FORMATS)
def test_fast_members_equal_tarfiles_for_ustar_gnu_and_pax(tmp_path, fmt):
    path = write_tar(tmp_path / "s.tar", FORMATS[fmt])
    want = slow(path)
    assert fast(path) == want
    names = [name for _, name, _ in want]
    assert "dir/0001.cls" in names and "dir/0005.txt" in names and "dir/link.txt" not in names
    assert "__index__" not in names and "dir" not in names
    assert any(name.startswith("d" * 90 + "/") for name in names)
    for at, _, _ in want:  # from every member's offset: the same rest of the shard
        assert fast(path, at) == slow(path, at) == [m for m in want if m[0] >= at]


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
    no_fallback(monkeypatch)
    assert fast(path) == want and len(want) == 2


def test_webdataset_shards_are_read_without_tarfile(tmp_path, monkeypatch):
    path = write_wds(tmp_path / "wds.tar")
    want = slow(path)
    no_fallback(monkeypatch)
    assert fast(path) == want and len(want) == 80  # an empty png (sample 0) is a member too
    assert [s["__key__"] for _, _, s in tario.read_samples(str(path), want[40][0])] == [
        f"{i:06d}" for i in range(10, 20)
    ]


def test_samples_are_read_the_same_as_before(tmp_path, monkeypatch):
    path = str(write_tar(tmp_path / "s.tar", tarfile.PAX_FORMAT))
    want = list(tario.read_samples(path))
    monkeypatch.setattr(
        tario, "_members_fast", lambda f, offset: tario._members_tarfile(tarfile.TarFile(fileobj=f), offset)
    )
    assert list(tario.read_samples(path)) == want
    assert [s["__key__"] for _, _, s in want][:2] == ["dir/0001", "dir/0002"]


def damaged(path: Path, tmp_path: Path) -> dict[str, Path]:
    """The shard with a bad checksum (on its first, a middle and its last header) and cut at every
    kind of place: in a header, in data, in the padding after data, in the end-of-archive blocks."""
    raw = path.read_bytes()
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    out = {}
    for label, m in (("first", members[0]), ("middle", members[len(members) // 2]), ("last", members[-1])):
        bad = bytearray(raw)
        bad[m.offset + 148] = ord("7") if bad[m.offset + 148] != ord("7") else ord("6")
        out[f"checksum-{label}"] = bytes(bad)
    for m in members:
        for cut in (
            m.offset + 100,
            m.offset + 600,
            m.offset + 1024 + 100,
            m.offset_data + m.size // 2,
            m.offset_data + m.size,
            m.offset_data + m.size + 1,
        ):
            out[f"cut-{m.name[-12:]}-{cut}"] = raw[:cut]
    out["cut-end-blocks"] = raw[: members[-1].offset_data + 512 + 200]
    out["empty"] = b""
    for m in members[:3]:  # an end-of-archive block where a header should follow an extended one
        out[f"zeros-{m.offset}"] = raw[: m.offset_data - 512] + bytes(1024)
        bad = bytearray(raw)  # a bad checksum on the header after an extended one
        bad[m.offset_data - 512 + 148] ^= 1
        out[f"checksum-{m.offset}-after"] = bytes(bad)
    files = {}
    for label, data in out.items():
        files[label] = tmp_path / f"{len(files)}.tar"
        files[label].write_bytes(data)
    return files


@pytest.mark.parametrize("fmt", [*FORMATS, "webdataset"])
def test_corrupt_and_truncated_shards_fail_where_and_as_tarfile_does(tmp_path, fmt):
    path = write_tar(tmp_path / "s.tar", FORMATS.get(fmt, fmt))
    starts = [0] + [at for at, _, _ in slow(path)][1::3]
    for label, bad in damaged(path, tmp_path).items():
        for at in starts:
            assert outcome(fast, bad, at) == outcome(slow, bad, at), (label, at)
    checksum = damaged(path, tmp_path)["checksum-first"]
    assert outcome(fast, checksum) == ([], "ReadError")  # tarfile refuses a bad first header


def test_read_samples_counts_a_truncated_shards_fault_once_and_keeps_the_cut_sample(tmp_path, monkeypatch):
    path = write_tar(tmp_path / "s.tar", tarfile.GNU_FORMAT)
    with tarfile.open(path) as tf:
        png = tf.getmember("dir/0001.txt")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[: png.offset_data + png.size + 3])  # inside the padding

    def read() -> tuple[list, list]:
        errors: list = []
        return list(tario.read_samples(str(cut), on_error=errors.append)), errors

    got, errors = read()
    assert [type(e) for e in errors] == [tarfile.ReadError] and errors[0].args[-1] == str(cut)
    assert [sorted(s) for _, _, s in got] == [["__key__", "__url__", "png", "txt"]]
    monkeypatch.setattr(
        tario, "_members_fast", lambda f, offset: tario._members_tarfile(tarfile.TarFile(fileobj=f), offset)
    )
    before, before_errors = read()
    assert got == before and [repr(e) for e in errors] == [repr(e) for e in before_errors]
