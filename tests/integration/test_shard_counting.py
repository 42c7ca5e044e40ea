"""Counting a large shard set without sizes.json: once across ranks, then never again.

1,000 small shards (1-3 samples each, 2,000 in all), 2 gloo ranks x 2 loader workers, through the
datamodule's own path (``train_dataloader`` with a stand-in trainer). Each rank reads the tar
headers of only its half of the shards, one all-reduce shares the counts, every rank gets the same
epoch length (the right one), the first batch comes within seconds, and rank 0 leaves a
``sizes.json`` that the next run reads instead of any tar header.
"""

import json
import tarfile
import time
from pathlib import Path
from queue import Empty
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.integration.gloo import free_port, gloo_group

SHARDS, WORLD, WORKERS, BATCH = 1000, 2, 2, 4


def samples_in(i: int) -> int:
    return 1 + i % 3


def write_shards(root: Path) -> int:
    from tests.unit.test_data import good, write_shard

    for i in range(SHARDS):
        write_shard(root / f"train-{i:04d}.tar", [good(i * 3 + j) for j in range(samples_in(i))])
    return sum(samples_in(i) for i in range(SHARDS))


def first_pixel(img):
    return torch.tensor(next(iter(img.getdata())), dtype=torch.float32)


def text_length(text):
    return torch.tensor([len(text)])


def preprocess(train: bool) -> dict:  # picklable: the loader's workers may be spawned
    return {"image": first_pixel, "text": text_length}


def worker(rank, port, root, queue):
    from mmpretrain.data.stream import shards
    from mmpretrain.training.datamodule import ContrastiveDataModule

    with gloo_group(rank, WORLD, port):
        opened = []
        count_tar = shards._count_tar
        shards._count_tar = lambda path: opened.append(path.name) or count_tar(path)
        cfg = {
            "sources": {"s": {"shards": f"{root}/train-{{0000..{SHARDS - 1:04d}}}.tar"}},
            "batch_size": BATCH,
            "num_workers": WORKERS,
            "shuffle_buffer": 8,
        }
        runs = []
        for _ in range(2):  # the second run finds sizes.json
            dm = ContrastiveDataModule(cfg, preprocess, seed=0)
            dm.trainer = SimpleNamespace(
                global_rank=rank,
                world_size=WORLD,
                strategy=SimpleNamespace(root_device=SimpleNamespace(type="cpu")),
            )
            opened.clear()
            t0 = time.perf_counter()
            loader = dm.train_dataloader()
            batches = iter(loader)
            next(batches)
            first_batch_s = time.perf_counter() - t0
            n_batches = 1 + sum(1 for _ in batches) if not runs else None  # the whole epoch once
            runs.append(
                {
                    "per_worker": dm.batches_per_worker(),
                    "opened": sorted(opened),
                    "first_batch_s": first_batch_s,
                    "batches": n_batches,
                }
            )
            dist.barrier()  # rank 0 has written sizes.json before anyone starts the second run
            del batches, loader
        queue.put((rank, runs))


def test_a_thousand_shards_are_counted_once_across_ranks_and_remembered(tmp_path):
    total = write_shards(tmp_path)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, str(tmp_path), queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = {}
    while len(results) < WORLD:  # fail at once, not after the timeout, when a rank dies
        try:
            rank, runs = queue.get(timeout=5)
            results[rank] = runs
        except Empty:
            assert all(p.is_alive() or p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    first = [results[r][0] for r in range(WORLD)]
    per_worker = -(-total // (BATCH * WORLD * WORKERS))  # ceil: 2,000 samples -> 125 batches per worker
    assert [f["per_worker"] for f in first] == [per_worker] * WORLD
    assert [f["batches"] for f in first] == [per_worker * WORKERS] * WORLD  # the same epoch on every rank
    # Each rank read the headers of its half of the shards, and together all of them, once.
    opened = [set(f["opened"]) for f in first]
    assert len(opened[0]) == len(opened[1]) == SHARDS // WORLD and opened[0].isdisjoint(opened[1])
    assert max(f["first_batch_s"] for f in first) < 20, first

    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {f"train-{i:04d}.tar": samples_in(i) for i in range(SHARDS)}
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary file, renamed
    for r in range(WORLD):  # the next run reads sizes.json: no tar header at all
        assert results[r][1]["opened"] == [] and results[r][1]["per_worker"] == per_worker


def test_counting_without_distributed_writes_sizes_json_and_an_unwritable_folder_still_counts(
    tmp_path, monkeypatch
):
    from mmpretrain.data import count_samples
    from mmpretrain.data.stream import shards

    urls = [str(tmp_path / f"train-{i:04d}.tar") for i in range(4)]
    for i, url in enumerate(urls):
        with tarfile.open(url, "w") as tf:
            for j in range(samples_in(i)):
                for ext in ("txt", "cls"):  # two members per sample: samples are counted by key
                    info = tarfile.TarInfo(f"k{i}_{j}.{ext}")
                    tf.addfile(info)
    assert count_samples(urls) == 1 + 2 + 3 + 1
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        Path(u).name: samples_in(i) for i, u in enumerate(urls)
    }
    (tmp_path / "sizes.json").unlink()

    def refuse(*args):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(shards.os, "replace", refuse)
    assert count_samples(urls) == 7
    assert set(tmp_path.iterdir()) == set(tmp_path.glob("*.tar"))  # no sizes.json, no temporary file left


def users_tars(root: Path) -> dict[str, tuple[Path, int | None]]:
    """Five samples (jpg + txt + json) tarred the ways users tar them; each tar with the samples it
    holds whole (None: whatever GNU tar's directory order leaves whole)."""
    import gzip
    import subprocess

    import webdataset as wds

    def fill(folder: Path) -> Path:
        folder.mkdir(parents=True)
        for i in range(5):  # img2dataset's names: 00000.jpg, 00000.txt, 00000.json
            for ext, data in (("jpg", b"\xff\xd8 %d" % i), ("txt", b"caption %d" % i), ("json", b"{}")):
                (folder / f"{i:05d}.{ext}").write_bytes(data)
        return folder

    tars: dict[str, tuple[Path, int | None]] = {}
    out = fill(root / "out")
    for label, args in {
        "gnu-tar-of-a-folder": ["-C", out, "."],  # ./, ./00003.txt, ... in the folder's order
        "gnu-tar-sorted": ["--sort=name", "-C", out, "."],
        "gnu-tar-posix": ["--sort=name", "--format=posix", "-C", out, "."],  # a pax header per member
        "dotted-folder": ["--sort=name", "-C", fill(root / "cc3m.v1").parent, "cc3m.v1"],
    }.items():
        tars[label] = (root / f"{label}.tar", None if label == "gnu-tar-of-a-folder" else 5)
        subprocess.run(["tar", "-cf", tars[label][0], *args], check=True)
    python = root / "python-tarfile.tar"
    with tarfile.open(python, "w") as tf:  # a folder, ./ names, __meta__ members: only samples count
        tf.add(out, arcname="./", recursive=False)
        for name in ("__index__", "__meta__/info.json", "./.DS_Store", "./._00000.jpg"):
            info = tarfile.TarInfo(name)
            tf.addfile(info)
        for path in sorted(out.iterdir()):
            tf.add(path, arcname=f"./{path.name}")
    tars["python-tarfile"] = (python, 5)
    writer = root / "webdataset.tar"
    with wds.TarWriter(str(writer)) as sink:
        for i in range(5):
            sink.write({"__key__": f"{i:05d}", "jpg": b"\xff\xd8", "txt": b"c", "json": b"{}"})
    tars["webdataset"] = (writer, 5)
    gz = root / "gnu-tar-sorted.tar.gz"
    gz.write_bytes(gzip.compress(tars["gnu-tar-sorted"][0].read_bytes()))
    tars["gzip"] = (gz, 5)
    return tars


def test_tars_made_the_ways_users_make_them_count_what_the_reader_reads(tmp_path):
    from mmpretrain.data import count_samples
    from mmpretrain.data.stream.tar_reader import count_shard, read_samples

    tars = users_tars(tmp_path / "users")
    for label, (path, want) in tars.items():
        samples = [s for _, _, s in read_samples(str(path), on_error=lambda exn: None)]
        assert count_shard(str(path)) == len(samples), label
        assert want is None or len(samples) == want, (label, len(samples))
        if want is not None:
            keys = [s["__key__"] for s in samples]
            assert [k.rsplit("/", 1)[-1] for k in keys] == [f"{i:05d}" for i in range(5)], (label, keys)
            assert all({"jpg", "txt", "json"} <= set(s) for s in samples), label
    assert [s["__key__"] for _, _, s in read_samples(str(tars["dotted-folder"][0]))][0] == "cc3m.v1/00000"
    urls = [str(path) for path, _ in tars.values()]  # through sizes.json, as a run counts them
    total = sum(count_shard(u) for u in urls)
    assert count_samples(urls) == total and total >= 5 * (len(tars) - 1)
    sizes = json.loads((tmp_path / "users" / "sizes.json").read_text())
    assert sizes["python-tarfile.tar"] == 5 and sizes["gnu-tar-sorted.tar.gz"] == 5
