import io

import pytest
import torch
import webdataset as wds
from PIL import Image

from mmpretrain.data import NoShardsError, ShardStream, Source, expand_shards
from mmpretrain.data.stream.skips import SampleError
from tests.conftest import digits_datamodule


def png_bytes(value=128):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


PREPROCESS = {
    "image": lambda img: torch.tensor(next(iter(img.getdata())), dtype=torch.float32),
    "text": lambda t: torch.tensor([len(t)]),
}


def good(i):
    return {"__key__": f"s{i:03d}", "png": png_bytes(i), "txt": f"caption {i}", "cls": str(i % 3)}


def test_pattern_matching_nothing_names_the_pattern(tmp_path):
    with pytest.raises(NoShardsError, match=r"missing-\{000\.\.003\}\.tar"):
        expand_shards(str(tmp_path / "missing-{000..003}.tar"))


def test_brace_and_glob_expansion(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"x-{i:03d}.tar", [good(i)])
    assert len(expand_shards(str(tmp_path / "x-{000..002}.tar"))) == 3
    assert len(expand_shards([str(tmp_path / "x-*.tar")])) == 3


def test_a_brace_range_naming_missing_shards_fails_saying_how_many_and_how_to_go_on(tmp_path, caplog):
    from mmpretrain.data import MissingShardsError

    for i in (0, 1, 3):  # a partial download: 2 of 5 shards never arrived
        write_shard(tmp_path / f"x-{i:03d}.tar", [good(i)])
    pattern = str(tmp_path / "x-{000..004}.tar")
    with pytest.raises(MissingShardsError, match=r"2 of the 5 shards .* are missing") as err:
        expand_shards(pattern)
    assert isinstance(err.value, NoShardsError) and isinstance(err.value, FileNotFoundError)
    assert "x-002.tar, " in str(err.value) and "x-004.tar)" in str(err.value)
    assert "data.missing_shards=warn" in str(err.value)
    with pytest.raises(MissingShardsError, match="1 of the 2"):  # a plain path names a shard too
        expand_shards([str(tmp_path / "x-000.tar"), str(tmp_path / "x-002.tar")])
    with caplog.at_level("WARNING"):
        present = expand_shards(pattern, missing="warn")
    assert [p.rsplit("/", 1)[1] for p in present] == ["x-000.tar", "x-001.tar", "x-003.tar"]
    assert "2 of the 5 shards" in caplog.text and "training on the 3 present" in caplog.text
    assert len(expand_shards(str(tmp_path / "x-*.tar"))) == 3  # a glob names what exists
    assert expand_shards(["pipe:cat a.tar", "https://host/b-{0..1}.tar"]) == [
        "pipe:cat a.tar",
        "https://host/b-0.tar",
        "https://host/b-1.tar",
    ]
    with pytest.raises(ValueError, match="'error' or 'warn'"):
        expand_shards(pattern, missing="ignore")


def test_corrupt_and_incomplete_samples_are_skipped_and_counted(tmp_path):
    samples = [good(i) for i in range(10)]
    samples[2]["png"] = b"not a png at all"
    samples[5]["png"] = png_bytes()[:30]  # truncated file
    del samples[7]["txt"]  # missing caption
    url = write_shard(tmp_path / "bad.tar", samples)
    stream = ShardStream([Source("s", [url])], PREPROCESS, batch_size=4, train=False)
    batches = list(stream)
    assert sum(len(b["__key__"]) for b in batches) == 7
    assert sum(int(b["__skipped__"]) for b in batches) == 3
    keys = {k for b in batches for k in b["__key__"]}
    assert keys.isdisjoint({"s002", "s005", "s007"})


def test_on_error_raise_names_the_sample_and_shard(tmp_path):
    samples = [good(0), good(1)]
    samples[1]["png"] = b"garbage"
    url = write_shard(tmp_path / "bad.tar", samples)
    stream = ShardStream([Source("s", [url])], PREPROCESS, batch_size=4, train=False, on_error="raise")
    with pytest.raises(SampleError, match=r"s001.*bad\.tar"):
        list(stream)


def test_train_stream_has_fixed_length_and_is_deterministic(tmp_path):
    urls = [write_shard(tmp_path / f"t-{s}.tar", [good(s * 10 + i) for i in range(10)]) for s in range(4)]

    def keys(rank):
        stream = ShardStream(
            [Source("s", urls)],
            PREPROCESS,
            batch_size=4,
            train=True,
            batches_per_worker=7,
            rank=rank,
            world_size=2,
            seed=3,
            shuffle_buffer=8,
        )
        return [k for b in stream for k in b["__key__"]]

    k0, k1 = keys(0), keys(1)
    assert len(k0) == len(k1) == 28  # every rank the same number of batches, cycling its shards
    assert k0 == keys(0)
    assert set(k0[:10]).isdisjoint(k1[:10])  # ranks read different shards within a pass


def test_too_few_shards_for_ranks_fails_fast(tmp_path):
    url = write_shard(tmp_path / "one.tar", [good(0)])
    stream = ShardStream(
        [Source("s", [url])], PREPROCESS, batch_size=1, train=True, batches_per_worker=1, rank=1, world_size=2
    )
    with pytest.raises(ValueError, match="1 shards for 2 ranks"):
        list(stream)


def test_augmentations_are_seeded_per_sample_without_global_side_effects(tmp_path, monkeypatch):
    urls = [write_shard(tmp_path / f"a-{s}.tar", [good(s * 10 + i) for i in range(10)]) for s in range(2)]
    noisy = {"image": lambda img: torch.rand(3), "text": lambda t: torch.tensor([len(t)])}

    def images():
        stream = ShardStream(
            [Source("s", urls)], noisy, batch_size=4, train=True, batches_per_worker=3, seed=1
        )
        return torch.cat([b["image"] for b in stream])

    # torch.manual_seed also queues a lazy CUDA seeding that records a stack trace on every call
    # (~1 ms a sample): the stream must seed the CPU generator only.
    calls = []
    monkeypatch.setattr(torch, "manual_seed", calls.append)  # (a raise would be a counted skip)
    torch.default_generator.manual_seed(123)
    before = torch.default_generator.get_state()
    first = images()
    assert torch.equal(torch.default_generator.get_state(), before)  # the caller's RNG is untouched
    assert torch.equal(first, images())  # a batch is a pure function of its position
    assert len({tuple(r.tolist()) for r in first}) == len(first)  # each sample has its own seed
    assert calls == []


def test_a_stream_where_every_sample_fails_stops_with_the_reason(tmp_path, monkeypatch):
    """A transform failing on every sample used to spin a training stream forever (all skips)."""
    from mmpretrain.data.stream.skips import SkipCounter

    monkeypatch.setattr(SkipCounter, "MAX_CONSECUTIVE", 25)
    urls = [write_shard(tmp_path / f"f-{s}.tar", [good(s * 10 + i) for i in range(10)]) for s in range(2)]

    def broken(img):
        raise ValueError("resize to a negative size")

    stream = ShardStream(
        [Source("s", urls)], {**PREPROCESS, "image": broken}, batch_size=4, train=True, batches_per_worker=3
    )
    with pytest.raises(SampleError, match=r"25 samples in a row failed.*negative size.*on_error=raise"):
        next(iter(stream))
    # isolated failures still count as skips and reset the run of failures
    samples = [good(i) for i in range(60)]
    for i in range(0, 60, 3):
        samples[i]["png"] = b"broken"
    stream = ShardStream(
        [Source("s", [write_shard(tmp_path / "some-bad.tar", samples)])],
        PREPROCESS,
        batch_size=4,
        train=False,
    )
    assert sum(int(b["__skipped__"]) for b in stream) == 20


def test_digits_shards_are_plain_ustar_and_reproducible(digits_root, tmp_path):
    """webdataset's default float mtime put a pax header on every member (2x the tar parsing)."""
    import tarfile

    from mmpretrain.data.synthetic.digits import build_digits

    first = digits_root / "train" / "train-0000.tar"
    with tarfile.open(first) as tf:
        members = tf.getmembers()
    assert members and all(m.pax_headers == {} for m in members)
    again = build_digits(tmp_path / "again", image_size=32)
    assert (again / "train" / "train-0000.tar").read_bytes() == first.read_bytes()


# -- seeds: one derivation (numpy SeedSequence) for every seed of the stream -----------------------
SEEDED = {"image": lambda img: torch.rand(2), "text": lambda t: torch.tensor([len(t)])}


@pytest.mark.parametrize("seed", [0, 2**31, 2**63 - 1, 10**30])
def test_any_non_negative_seed_streams_samples_without_skips(tmp_path, seed):
    """The old hand-written seeds (~seed * 1e15) overflowed int64 from seed ~18,300 on: every sample
    was skipped with 'Overflow when unpacking long long'."""
    urls = [write_shard(tmp_path / f"z-{s}.tar", [good(s * 10 + i) for i in range(10)]) for s in range(2)]
    stream = ShardStream(
        [Source("a", urls, weight=1.0), Source("b", urls, weight=2.0)],
        SEEDED,
        batch_size=4,
        train=True,
        batches_per_worker=3,
        seed=seed,
        shuffle_buffer=8,
    )
    batches = list(stream)
    assert len(batches) == 3 and all(len(b["__key__"]) == 4 for b in batches)
    assert sum(int(b["__skipped__"]) for b in batches) == 0
    again = list(
        ShardStream(
            [Source("a", urls, weight=1.0), Source("b", urls, weight=2.0)],
            SEEDED,
            batch_size=4,
            train=True,
            batches_per_worker=3,
            seed=seed,
            shuffle_buffer=8,
        )
    )
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, again))


def test_negative_or_non_integer_seeds_are_refused_saying_what_a_seed_is(tmp_path):
    for bad in (-1, 1.5, "3"):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            ShardStream(
                [Source("s", ["x.tar"])], SEEDED, batch_size=1, train=True, batches_per_worker=1, seed=bad
            )


def test_the_stream_seeds_each_augmentation_with_derive_of_rank_stream_and_sample(tmp_path):
    from mmpretrain.data.stream.seeds import derive

    urls = [write_shard(tmp_path / f"d-{s}.tar", [good(s * 10 + i) for i in range(10)]) for s in range(4)]
    # inside the augmentation, torch's CPU generator was seeded with the sample's seed
    spy = {
        "image": lambda img: torch.tensor([torch.initial_seed()]),
        "text": lambda t: torch.tensor([len(t)]),
    }
    for rank in (0, 1):
        stream = ShardStream(
            [Source("s", urls)],
            spy,
            batch_size=3,
            train=True,
            batches_per_worker=2,
            rank=rank,
            world_size=2,
            seed=2**63 - 1,
        )
        for worker in (0, 1):
            gen = stream._batch_stream(worker, 2)
            seen = torch.cat([next(gen)["image"] for _ in range(2)]).flatten().tolist()
            assert seen == [derive(2**63 - 1, "augment", rank, worker, n) for n in range(1, 7)]


@pytest.mark.parametrize("seed", [0, 2**63 - 1])
def test_augmentation_seeds_never_collide_over_ranks_streams_and_samples(seed):
    """The old formula ((seed*1_000_003 + rank)*1009 + worker)*1_000_003 + n gave stream w at sample
    n + 1_000_003 the seed of stream w + 1 at sample n."""
    from mmpretrain.data.stream.seeds import derive

    samples = [*range(64), *range(1_000_003, 1_000_003 + 64)]
    grid = [(r, w, n) for r in range(4) for w in range(4) for n in samples]
    seeds = [derive(seed, "augment", *key) for key in grid]
    assert len(set(seeds)) == len(grid)
    assert all(0 <= s < 2**63 for s in seeds)
    # other purposes at the same keys are other streams, and so is the next user seed
    assert set(seeds).isdisjoint(derive(seed, "shuffle_buffer", *key) for key in grid[:200])
    assert set(seeds).isdisjoint(derive(seed + 1, "augment", *key) for key in grid[:200])


def test_global_seed_fits_seed_everything_and_keeps_32_bit_seeds():
    """Lightning's seed_everything refuses (or, in other versions, replaces by 0) seeds beyond 32 bits."""
    import warnings

    import lightning as L

    from mmpretrain.data.stream.seeds import global_seed

    assert global_seed(31337) == 31337 and global_seed(2**32 - 1) == 2**32 - 1
    big = [global_seed(s) for s in (2**32, 2**63 - 1, 10**30)]
    assert all(0 <= s < 2**32 for s in big) and len(set(big)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert L.seed_everything(global_seed(2**63 - 1)) == big[1]


# -- batches that fit in shared memory: uint8 images, 2 batches ahead, pinned on CUDA ----------------
def test_train_batches_carry_uint8_images_a_quarter_of_the_float_bytes(digits_root):
    from omegaconf import OmegaConf

    from mmpretrain.towers.timm import TimmTower
    from mmpretrain.training.datamodule import ContrastiveDataModule

    tower = TimmTower("resnet10t", img_size=32)
    cfg = OmegaConf.create(
        {
            "sources": {"d": {"shards": f"{digits_root}/train/*.tar"}},
            "batch_size": 8,
            "num_workers": 0,
            "train_samples": 32,
        }
    )
    dm = ContrastiveDataModule(cfg, preprocess=lambda train: {"image": tower.preprocess(train)}, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 32, 32)
    assert batch["image"].nbytes == 8 * 3 * 32 * 32  # float32 was 4x this


@pytest.mark.parametrize(("device", "pinned"), [("cuda", True), ("cpu", False)])
def test_loaders_prefetch_two_batches_and_pin_memory_only_on_cuda(digits_root, device, pinned):
    from types import SimpleNamespace

    dm = digits_datamodule(digits_root, val={"shards": f"{digits_root}/val/*.tar"})
    fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=None))
    dm.trainer = SimpleNamespace(
        global_rank=0,
        world_size=1,
        fit_loop=fit_loop,
        strategy=SimpleNamespace(root_device=torch.device(device)),
    )
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert loader.prefetch_factor == 2 and loader.pin_memory is pinned
