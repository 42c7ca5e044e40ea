"""Shards in object storage, against a real S3 API server (moto's, in-process): listing and counting,
ranged-read resume, retries with backoff, a shard that still fails is a counted skip."""

from __future__ import annotations

import json
import logging

import pytest

from mmpretrain import storage
from mmpretrain.data.stream.shards import MissingShardsError, count_samples, expand_shards, shards_fingerprint
from mmpretrain.data.stream.tar_reader import read_samples
from tests.s3 import BUCKET, s3  # noqa: F401 (the fixture)

PREFIX = f"s3://{BUCKET}/digits/train"


@pytest.fixture
def stored(s3, digits_root):  # noqa: F811
    """The digits train shards (and their sizes.json) uploaded to the bucket."""
    storage.put_tree(digits_root / "train", PREFIX)
    names = sorted(p.name for p in (digits_root / "train").glob("*.tar"))
    return s3, names


def brace(names: list[str]) -> str:
    first, last = names[0].split("-")[-1][:-4], names[-1].split("-")[-1][:-4]
    return f"{PREFIX}/{names[0].rsplit('-', 1)[0]}-{{{first}..{last}}}.tar"


def test_listing_counting_and_fingerprint(stored, digits_root):
    server, names = stored
    urls = expand_shards(brace(names))
    assert urls == [f"{PREFIX}/{n}" for n in names]
    assert expand_shards(f"{PREFIX}/*.tar") == urls
    local = sorted(str(p) for p in (digits_root / "train").glob("*.tar"))
    assert count_samples(urls) == count_samples(local)
    assert shards_fingerprint(urls) == shards_fingerprint(local)  # names and sizes, from one listing

    # A missing shard is named, as for local ones; without sizes.json the headers are read (ranged
    # reads) and the counts uploaded for the next run.
    with pytest.raises(MissingShardsError, match="1 of the"):
        expand_shards([brace(names), f"{PREFIX}/{names[0].rsplit('-', 1)[0]}-9999.tar"])
    storage.remove(f"{PREFIX}/sizes.json")
    server.reset_counts()
    assert count_samples(urls) == count_samples(local)
    assert server.requests["GET-range"] >= len(urls)
    assert json.loads(storage.read_bytes(f"{PREFIX}/sizes.json")) == json.loads(
        (digits_root / "train" / "sizes.json").read_text()
    )


def test_resume_is_a_ranged_read_at_the_offset(stored, digits_root):
    server, names = stored
    url, local = f"{PREFIX}/{names[0]}", str(digits_root / "train" / names[0])
    expected = list(read_samples(local))
    got = list(read_samples(url))
    assert [(a, b, s["__key__"]) for a, b, s in got] == [(a, b, s["__key__"]) for a, b, s in expected]
    assert all(g[2]["png"] == e[2]["png"] for g, e in zip(got, expected))

    middle = expected[len(expected) // 2][0]
    expand_shards(brace(names))  # as training does first: the folder's listing gives every size
    server.reset_counts()
    resumed = list(read_samples(url, middle))
    assert [s["__key__"] for _, _, s in resumed] == [s["__key__"] for a, _, s in expected if a >= middle]
    # One request: a ranged read from the offset (no HEAD: the size was listed); nothing before it is fetched.
    assert len(server.log) == 1 and server.log[0].startswith("GET "), server.log
    assert f"bytes={middle}-" in server.log[0]


def test_transient_errors_are_retried_and_counted(stored, digits_root, caplog):
    server, names = stored
    expected = [s["__key__"] for n in names for _, _, s in read_samples(str(digits_root / "train" / n))]
    before = storage.retries_so_far()
    server.fail_every, server.fail_match = 3, "^(GET|HEAD) "  # every third request that reads fails
    with caplog.at_level(logging.WARNING, logger="mmpretrain.storage"):
        got = [s["__key__"] for n in names for _, _, s in read_samples(f"{PREFIX}/{n}")]
    assert got == expected
    assert server.failed > 0 and storage.retries_so_far() - before == server.failed
    assert f"storage retry {storage.retries_so_far()} (this process)" in caplog.text


def test_a_shard_that_still_fails_is_one_counted_skip(stored, monkeypatch):
    from mmpretrain.data.stream.skips import SkipCounter

    server, names = stored
    monkeypatch.setattr(storage, "ATTEMPTS", 2)
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    server.dead, server.fail_match = True, "^(GET|HEAD) "
    skips = SkipCounter("skip")
    assert list(read_samples(f"{PREFIX}/{names[0]}", on_error=skips)) == []
    assert skips.take() == 1 and list(skips.reasons) == ["StorageError"]
    with pytest.raises(storage.StorageError, match="failed 2 times"):
        list(read_samples(f"{PREFIX}/{names[0]}"))


def test_converter_writes_to_the_store(s3, tmp_path, monkeypatch):  # noqa: F811
    """`mmpretrain data digits out=s3://...` through the installed console script."""
    from tests.integration.test_launch import run_cli

    out = f"s3://{BUCKET}/built"
    proc = run_cli(["data", "digits", f"out={out}", "image_size=16"], cwd=tmp_path)
    assert f"wrote digits to {out}" in proc.stdout
    urls = expand_shards(f"{out}/train/*.tar")
    sizes = json.loads(storage.read_bytes(f"{out}/train/sizes.json"))
    assert sorted(sizes) == [u.rsplit("/", 1)[1] for u in urls]
    assert count_samples(urls) == sum(sizes.values()) > 0
    assert not [k for k in storage.listing(f"{out}/train") if k.startswith(".")]  # no temporary key left


def test_any_fsspec_store_reads_like_a_local_shard(digits_root):
    """Not only S3: fsspec's in-memory store, read and resumed the same way."""
    name = sorted(p.name for p in (digits_root / "train").glob("*.tar"))[0]
    local = str(digits_root / "train" / name)
    url = f"memory://mmpretrain-test/{name}"
    storage.put_file(local, url)
    expected = list(read_samples(local))
    assert expand_shards("memory://mmpretrain-test/*.tar") == [url]
    middle = expected[len(expected) // 2][0]
    got = list(read_samples(url, middle))
    assert [(a, s["__key__"], s["png"]) for a, _, s in got] == [
        (a, s["__key__"], s["png"]) for a, _, s in expected if a >= middle
    ]
