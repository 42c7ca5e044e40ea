"""Damaged and compressed shards: every read ends, a bad member costs its sample (counted, with the reason
and the shard), never the rest of the shard, and ``.tar.gz`` shards read, count and resume like tars."""

from __future__ import annotations

import gzip
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from mmpretrain.data.stream import tar_reader as tario
from tests.unit.test_tar_fuzz import deadline, set_checksum

FIELDS = ("png", "txt", "cls")


def write(path: Path, keys="abcde", fmt=tarfile.GNU_FORMAT, extra: tuple = ()) -> list[tarfile.TarInfo]:
    """Samples ``keys`` with three fields each (then ``extra`` members), by tarfile; their headers."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in [(f"{k}.{f}", f"{k}{f}".encode() * 3) for k in keys for f in FIELDS] + list(extra):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return tf.getmembers()


def read(url: str) -> tuple[dict[str, dict], list[tario.ShardFault]]:
    errors: list = []
    with deadline(10):
        got = {s["__key__"]: s for _, _, s in tario.read_samples(url, on_error=errors.append)}
    return got, errors


def whole(samples: dict[str, dict]) -> bool:
    return all(s[f] == f"{k}{f}".encode() * 3 for k, s in samples.items() for f in FIELDS)


def edit_header(path: Path, member: tarfile.TarInfo, at: int, value: bytes, checksum: bool = True) -> None:
    raw = bytearray(path.read_bytes())
    h = member.offset_data - 512
    raw[h + at : h + at + len(value)] = value
    if checksum:
        set_checksum(raw, h)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "kind", ["0", "V", "5"]
)  # regular; unknown and directory went to tarfile, which looped
@pytest.mark.parametrize("which, lost", [(3, "ab"), (4, "b")])  # b's first member, its middle one
def test_a_negative_size_is_a_counted_skip_on_every_path_never_a_loop(tmp_path, kind, which, lost):
    path = tmp_path / "neg.tar"
    long = "x" * 120  # a GNU long name after the damage
    members = write(path, extra=[(f"{long}.txt", b"long")])
    edit_header(path, members[which], 156, kind.encode())
    edit_header(path, members[which], 124, b"-0001000\0\0\0\0")  # -512: the next header would be itself
    for url in (str(path), f"pipe:cat {path}"):
        got, errors = read(url)
        assert got.pop(long)["txt"] == b"long"
        assert sorted(got) == sorted(set("abcde") - set(lost)) and whole(got)
        assert [(e.key, e.args[-1]) for e in errors] == [(k, url) for k in lost]
        assert all("negative" in e.reason for e in errors)
    assert tario.count_shard(str(path)) == 6 - len(lost)


@pytest.mark.parametrize("kind", ["0", "V"])
@pytest.mark.parametrize("which", range(4))
def test_every_read_of_a_four_member_tar_with_a_negative_size_ends(tmp_path, kind, which):
    """The reported hang: ``-0001000`` in one size field (checksum valid) made tarfile, and the reader's
    fallback to it, read the same header forever."""
    path = tmp_path / "neg.tar"
    members = write(path, keys="ab", fmt=tarfile.USTAR_FORMAT)
    members = [m for m in members if m.name.split(".")[1] in ("png", "txt")]
    raw = path.read_bytes()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:  # a.png a.txt b.png b.txt
        for m in members:
            tf.addfile(m, io.BytesIO(raw[m.offset_data : m.offset_data + m.size]))
    members = tarfile.open(path).getmembers()
    edit_header(path, members[which], 156, kind.encode())
    edit_header(path, members[which], 124, b"-0001000\0\0\0\0")
    for url in (str(path), f"pipe:cat {path}"):
        errors: list = []
        with deadline(10):
            got = [s for _, _, s in tario.read_samples(url, on_error=errors.append)]
        assert errors and all(e.args[-1] == url and "negative" in e.reason for e in errors)
        assert all(set(s) == {"__key__", "__url__", "png", "txt"} for s in got)
    with deadline(10):
        assert tario.count_shard(str(path)) == len(got)


def test_a_corrupt_header_mid_shard_costs_its_sample_and_the_read_goes_on(tmp_path):
    path = tmp_path / "bad.tar"
    members = write(path)
    edit_header(path, members[7], 148, b"7777", checksum=False)  # c.txt: a bad checksum
    got, errors = read(str(path))
    assert sorted(got) == list("abde") and whole(got)
    assert [(e.key, e.reason) for e in errors] == [("c", "corrupt tar header")]
    assert f"at offset {members[6].offset} of {path}" in str(errors[0])


def test_a_duplicate_field_and_a_tar_r_append_cost_their_samples_only(tmp_path):
    path = tmp_path / "dup.tar"
    write(path, extra=[("f.png", b"fpng" * 3), ("f.PNG", b"again"), ("g.png", b"gpng" * 3)])
    for k in "ab":  # tar -r: a member of an earlier sample, then a new sample (as GNU tar appends them)
        (tmp_path / f"{k}.json").write_text("{}")
    (tmp_path / "h.txt").write_text("appended")
    subprocess.run(["tar", "-C", tmp_path, "-rf", path, "b.json", "h.txt"], check=True)
    got, errors = read(str(path))
    assert sorted(got) == [*"abcde", "g", "h"] and whole({k: got[k] for k in "abcde"})
    assert got["h"]["txt"] == b"appended" and "json" not in got["b"]  # b came whole before its stray member
    assert [(e.key, e.reason) for e in errors] == [
        ("f", "two members for field 'png'"),
        ("b", "its members are not consecutive (tar them sorted: tar --sort=name)"),
    ]
    assert tario.count_shard(str(path)) == 7


def test_a_cut_shard_drops_the_cut_sample_and_counts_it(tmp_path):
    path = tmp_path / "cut.tar"
    members = write(path)
    raw = path.read_bytes()
    for cut, want, reason in [
        (members[10].offset_data + 2, "abc", "the file ends inside a member"),  # inside d.txt's data
        (members[9].offset, "ab", "no end-of-archive block (the shard was cut short)"),  # c may go on
        (members[-1].offset_data + 512, "abcd", "no end-of-archive block (the shard was cut short)"),
    ]:
        path.write_bytes(raw[:cut])
        got, errors = read(str(path))
        assert sorted(got) == list(want) and whole(got), cut
        assert [e.reason for e in errors] == [reason]
        assert tario.count_shard(str(path)) == len(want)


def test_shard_faults_reach_the_batches_skip_count_with_the_reason_and_the_shard(tmp_path):
    from mmpretrain.data import ShardStream, Source
    from mmpretrain.data.stream.skips import SampleError, SkipCounter
    from tests.unit.test_data import PREPROCESS, good, write_shard

    url = write_shard(tmp_path / "s.tar", [good(i) for i in range(12)])
    with tarfile.open(url) as tf:
        members = tf.getmembers()
    raw = bytearray(Path(url).read_bytes())
    raw[members[13].offset + 148] ^= 1  # s004's second member (after its pax header): 1 sample
    raw[members[30].offset_data - 512 + 148] ^= 1  # s010's first member's header: s009 in progress, s010
    Path(url).write_bytes(bytes(raw))
    batches = list(ShardStream([Source("s", [url])], PREPROCESS, batch_size=4, train=False))
    keys = [k for b in batches for k in b["__key__"]]
    assert keys == [f"s{i:03d}" for i in range(12) if i not in (4, 9, 10)]
    assert sum(int(b["__skipped__"]) for b in batches) == 3
    counter = SkipCounter()
    list(tario.read_samples(url, on_error=counter))
    assert dict(counter.reasons) == {"ShardFault: corrupt tar header": 3}
    with pytest.raises(SampleError, match=r"sample 's004' lost: corrupt tar header.*s\.tar"):
        list(ShardStream([Source("s", [url])], PREPROCESS, batch_size=4, train=False, on_error="raise"))


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_gzip_shards_read_count_and_resume_like_their_tar(tmp_path, suffix, monkeypatch):
    plain = tmp_path / "s.tar"
    write(plain, keys="abcdefgh")
    gz = tmp_path / f"s{suffix}"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    want = [(start, nxt, {**s, "__url__": None}) for start, nxt, s in tario.read_samples(str(plain))]
    for url in (str(gz), f"pipe:cat {gz}"):
        got = [(start, nxt, {**s, "__url__": None}) for start, nxt, s in tario.read_samples(url)]
        assert got == want and len(got) == 8
        for i, (start, _, _) in enumerate(want):  # offsets count bytes of the tar: resume at any sample
            rest = [(a, b, {**s, "__url__": None}) for a, b, s in tario.read_samples(url, start)]
            assert rest == want[i:]
    assert tario.count_shard(str(gz)) == 8
    assert tario.read_sample_at(str(gz), want[5][0])["__key__"] == "f"
    opened = []
    source = tario.open_tar
    monkeypatch.setattr(tario, "open_tar", lambda url, *rest: opened.append(url) or source(url, *rest))
    picked = [want[i][0] for i in (2, 6, 3)]
    assert [s["__key__"] for s in tario.read_samples_at(str(gz), picked).values()] == list("cdg")
    assert len(opened) == 1  # one pass from the first offset, not a decompression per sample


def test_a_cut_gzip_shard_counts_its_loss_and_raises_nothing(tmp_path):
    from tests.unit.test_data import good, write_shard

    plain = write_shard(tmp_path / "s.tar", [good(i) for i in range(20)])
    want = [s["png"] for _, _, s in tario.read_samples(plain)]
    gz = tmp_path / "s.tar.gz"
    packed = gzip.compress(Path(plain).read_bytes())
    gz.write_bytes(packed[: len(packed) * 2 // 3])  # a partial download
    got, errors = read(str(gz))
    assert 0 < len(got) < 20 and [s["png"] for s in got.values()] == want[: len(got)]
    assert [e.reason for e in errors] in (
        ["the file ends inside a member"],
        ["no end-of-archive block (the shard was cut short)"],
        ["the file ends inside a header"],
    )
    assert tario.count_shard(str(gz)) == len(got)
