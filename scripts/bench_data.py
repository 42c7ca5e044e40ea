"""Benchmark 3: decoded samples/s of our webdataset pipeline vs the model's consumption rate.

Our ``ShardStream`` (tar -> shuffle -> decode -> open_clip preprocess -> collate) in a DataLoader
with 0, 1, 2 workers, read as fast as possible (first batch excluded: worker start-up), against
the samples/s a plain training loop of the model consumes on this machine. A pipeline slower than
the model starves training: ratio < 1.

Also the bytes of one batch as the workers send it through shared memory: images as uint8 (the
tower normalises on the device) against float32 (what the workers sent before, the library's
ToTensor + Normalize in the worker), and what that means for the shared memory a rank holds
(workers x prefetch_factor batches) at a large configuration.
"""

from __future__ import annotations

import argparse
import functools
import math
import subprocess
import time
from pathlib import Path

import bench_common as bc
import torch
from bench_overhead import collect_batches, compose, plain_loop


def pipeline_rate(model, cfg, workers: int, batches: int) -> float:
    from torch.utils.data import DataLoader

    from mmpretrain.data import ShardStream
    from mmpretrain.training.datamodule import sources_from_config

    per_worker = -(-batches // max(workers, 1))
    stream = ShardStream(
        sources_from_config(cfg.data),
        model.preprocess(True),
        batch_size=int(cfg.data.batch_size),
        train=True,
        batches_per_worker=per_worker,
        seed=0,
    )
    loader = DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    times = [time.perf_counter() for _ in loader]
    bs = int(cfg.data.batch_size)
    return bs * (len(times) - 1) / (times[-1] - times[0])


def batch_bytes(batch: dict) -> int:
    """Bytes of every tensor of a batch: what a worker puts in shared memory for it."""
    return sum(v.nbytes for v in batch.values() if isinstance(v, torch.Tensor))


def bytes_per_batch(model, cfg) -> dict[str, int]:
    """One batch's bytes with images as uint8 (now) and as normalised float32 (before)."""
    from mmpretrain.data import ShardStream
    from mmpretrain.training.datamodule import sources_from_config

    now = model.preprocess(True)
    tower = model.towers["image"]
    before = now | {"image": lambda img: tower.normalize_input(now["image"](img)[None])[0]}
    out = {}
    for name, prep in (("float32", before), ("uint8", now)):
        stream = ShardStream(
            sources_from_config(cfg.data),
            prep,
            batch_size=int(cfg.data.batch_size),
            train=True,
            batches_per_worker=1,
            seed=0,
        )
        batch = next(iter(stream))
        out[name] = batch_bytes(batch)
        out[f"{name}_image"] = batch["image"].nbytes
    return out


def shared_memory_gb(image_bytes_per_pixel: int, prefetch: int, batch=512, size=224, workers=8) -> float:
    """Images held in shared memory per rank: workers x prefetch_factor batches of ``batch`` images."""
    return batch * 3 * size * size * image_bytes_per_pixel * workers * prefetch / 1e9


# -- section 3b: 224 px from img2dataset-like shards, ours vs open_clip_train's get_wds_dataset -----------
PIPES = ("openclip", "exact", "fast", "gpu")
PIPE_NAMES = {
    "openclip": "open_clip_train `get_wds_dataset` (PIL decode, its transform, float32)",
    "exact": "ours, data.image_decode=exact (the library transform, uint8)",
    "fast": "ours, data.image_decode=fast (default: reduced JPEG decode, one resample)",
    "gpu": "ours, data.image_decode=gpu (workers send JPEG bytes + box; device decode not included)",
}


def scenes224(work: Path) -> Path:
    """img2dataset-like shards: scenes whose JPEGs are 256..512 px a side, 8 train shards of 250."""
    return bc.scenes(
        work / "scenes224",
        train=2000,
        val=100,
        test=50,
        image_size_min=256,
        image_size_max=512,
        shard_size=250,
    )


def _rate(loader, batch: int, skip: int) -> tuple[float, int]:
    """Samples/s after the first ``skip`` batches (worker start-up, shuffle-buffer fill), and the bytes
    of one batch as it arrives (tensors, plus the JPEG bytes of data.image_decode=gpu)."""
    times, nbytes = [], 0
    for b in loader:
        times.append(time.perf_counter())
        if len(times) == 1:
            nbytes = batch_bytes(b) if isinstance(b, dict) else sum(t.nbytes for t in b)
            rows = b.get("image") if isinstance(b, dict) else None
            if isinstance(rows, list):
                nbytes += sum(len(r.data) if r.data is not None else r.pixels.nbytes for r in rows if r)
    return batch * (len(times) - skip) / (times[-1] - times[skip - 1]), nbytes


def child(pipe: str, root: Path, batch: int, batches: int, workers_list: list[int]) -> None:
    """One pipeline, measured at each worker count; one JSON line per measurement on stdout."""
    import json

    torch.set_num_threads(1)
    for workers in workers_list:
        loader = (_openclip_loader if pipe == "openclip" else _our_loader)(
            pipe, root, batch, batches, workers
        )
        rate, nbytes = _rate(loader, batch, max(workers, 1))
        print(json.dumps({"pipe": pipe, "workers": workers, "samples_per_s": rate, "batch_bytes": nbytes}))
        del loader


def _openclip_loader(pipe: str, root: Path, batch: int, batches: int, workers: int):
    """open_clip_train's own training loader: its transforms and tokenizer for ViT-B-32, resampled shards."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    preprocess = _openclip_transform()
    files, _ = bc.train_shards(root)
    args = argparse.Namespace(
        train_data=bc.brace_pattern(files),
        train_num_samples=batch * batches,
        dataset_resampled=True,
        train_data_upsampling_factors=None,
        batch_size=batch,
        workers=workers,
        world_size=1,
        seed=0,
    )
    return get_wds_dataset(args, preprocess, True, tokenizer=open_clip.get_tokenizer("ViT-B-32")).dataloader


@functools.cache
def _openclip_transform():
    import open_clip

    return open_clip.create_model_and_transforms("ViT-B-32")[1]


@functools.cache
def _our_parts(pipe: str, root: Path, batch: int):
    """(config, datamodule, training preprocess) of `mmpretrain train data=scenes model=openclip
    model.config=ViT-B-32 data.image_decode=<pipe>`, built once per child."""
    from mmpretrain.model import build_model
    from mmpretrain.training.datamodule import ContrastiveDataModule

    cfg = compose(
        [
            "data=scenes",
            f"data.root={root}",
            "model=openclip",
            "model.config=ViT-B-32",
            f"data.batch_size={batch}",
            f"data.image_decode={pipe}",
            "data.build=null",
        ]
    )
    model = build_model(cfg.model)
    dm = ContrastiveDataModule(cfg.data, model.preprocess, seed=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpu without CUDA: measured as the workers run it, below
        preprocess = dm._train_preprocess()
    if pipe == "gpu":
        from mmpretrain.data.stream.image import training_image_transform

        preprocess = model.preprocess(True)
        preprocess["image"] = training_image_transform(preprocess["image"], "gpu")
    return cfg, dm, preprocess


def _our_loader(pipe: str, root: Path, batch: int, batches: int, workers: int):
    """Our training stream as `mmpretrain train data=scenes model=openclip model.config=ViT-B-32` has it."""
    from torch.utils.data import DataLoader

    from mmpretrain.data import ShardStream

    cfg, dm, preprocess = _our_parts(pipe, root, batch)
    stream = ShardStream(
        dm.sources,
        preprocess,
        train=True,
        batches_per_worker=-(-batches // max(workers, 1)),
        shuffle_buffer=int(cfg.data.shuffle_buffer),
        **dm._common(),
    )
    return DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)


def split224(root: Path, n: int = 200) -> dict[str, dict[str, float]]:
    """Per-sample ms of each stage on the first ``n`` images of a shard (one thread, in process): decode
    and resize/crop for open_clip's transforms, ours exact and ours fast (the same seeded boxes)."""
    import tarfile

    import open_clip

    from mmpretrain.data.stream.decode import decode_image
    from mmpretrain.data.stream.image import decoded_box, training_image_transform
    from mmpretrain.data.stream.seeds import seeded
    from mmpretrain.towers.base import uint8_transform

    torch.set_num_threads(1)
    files, _ = bc.train_shards(root)
    with tarfile.open(files[0]) as t:
        jpgs = [t.extractfile(m).read() for m in t if m.name.endswith(".jpg")][:n]
    _, ref, _ = open_clip.create_model_and_transforms("ViT-B-32")
    exact = uint8_transform(ref)
    fast = training_image_transform(exact, "fast")
    crop = fast.crop

    def per_sample(fn) -> float:
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for k, j in enumerate(jpgs):
                with seeded(k):
                    fn(j)
            best = min(best, time.perf_counter() - t0)
        return best / len(jpgs) * 1e3

    def fast_decode(j: bytes):
        return decoded_box(j, crop)  # the box's draw and the reduced decode, as the fast path runs them

    decoded = [decode_image(j) for j in jpgs]
    pil_decode = per_sample(decode_image)
    out = {
        "openclip": {"decode": pil_decode},
        "exact": {"decode": pil_decode},
        "fast": {"decode": per_sample(fast_decode)},
    }
    it = iter(decoded * 3)
    out["openclip"]["resize/crop"] = per_sample(lambda j: ref(next(it)))
    it = iter(decoded * 3)
    out["exact"]["resize/crop"] = per_sample(lambda j: exact(next(it)))
    out["fast"]["resize/crop"] = per_sample(fast) - out["fast"]["decode"]
    return out


def section224(a, work: Path) -> None:
    import json

    root = scenes224(work)
    rows: list[dict] = []
    for rep in range(a.reps224):
        for pipe in PIPES:
            env = bc.child_env(reference=pipe == "openclip")
            cmd = [
                bc.python(),
                str(Path(__file__).resolve()),
                "--child",
                pipe,
                "--scenes",
                str(root),
                "--batch224",
                str(a.batch224),
                "--batches224",
                str(a.batches224),
                "--workers224",
                str(a.workers224),
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise SystemExit(f"{pipe} failed:\n{proc.stderr[-3000:]}")
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    r = json.loads(line) | {"what": "224px pipeline", "rep": rep}
                    rows.append(r)
                    print(
                        f"rep {rep} {pipe:8s} {r['workers']} workers: {r['samples_per_s']:.1f} samples/s, "
                        f"{r['batch_bytes']:,} bytes/batch",
                        flush=True,
                    )
    split = split224(root)
    for pipe, stages in split.items():
        rows.append(
            {"what": "224px split (ms/sample)", "pipe": pipe, **{k: round(v, 3) for k, v in stages.items()}}
        )

    def med(pipe, workers):
        return bc.median(
            [r["samples_per_s"] for r in rows if r.get("pipe") == pipe and r.get("workers") == workers]
        )

    def nbytes(pipe):
        return next(r["batch_bytes"] for r in rows if r.get("pipe") == pipe and r.get("workers") == 1)

    w = a.workers224
    table_rows = []
    for pipe in PIPES:
        one = med(pipe, 1)
        table_rows.append(
            [
                PIPE_NAMES[pipe],
                f"{med(pipe, 0):.0f}",
                f"{one:.0f}",
                f"{med(pipe, w):.0f}",
                f"{one / med('openclip', 1):.2f}",
                f"{nbytes(pipe):,}",
                f"{math.ceil(1500 / one)}–{math.ceil(3000 / one)}",
            ]
        )
    table = bc.md_table(
        [
            "pipeline",
            "samples/s, in process",
            "samples/s, 1 worker",
            f"samples/s, {w} workers",
            "per worker vs open_clip",
            f"bytes per batch of {a.batch224}",
            "workers for 1,500–3,000 samples/s",
        ],
        table_rows,
    )
    split_rows = []
    for pipe in ("openclip", "exact", "fast"):
        total = 1e3 / med(pipe, 0)
        s = split[pipe]
        rest = total - s["decode"] - s["resize/crop"]
        split_rows.append(
            [PIPE_NAMES[pipe], f"{total:.2f}", f"{s['decode']:.2f}", f"{s['resize/crop']:.2f}", f"{rest:.2f}"]
        )
    table += "\n\n" + bc.md_table(
        [
            "pipeline (one process)",
            "ms/sample, total",
            "decode",
            "resize/crop (+ to tensor)",
            "read + rest (tar, shuffle, tokenize, collate)",
        ],
        split_rows,
    )
    notes = [
        f"the same 8 shards ({root.name}: 2,000 scenes, JPEG quality 70–95, 256–512 px a side), ViT-B-32's "
        f"transforms and tokenizer (224 px, bicubic, RandomResizedCrop scale 0.9–1), batch {a.batch224}, "
        f"{a.batches224} batches per measurement (the first `workers` excluded), {a.reps224} reps with the "
        "pipelines interleaved in each; medians. One torch thread per process",
        "samples/s per worker is the 1-worker figure; the in-process figure (0 workers) gives the total of "
        "the time split. Workers for 1,500–3,000 samples/s = ceil(rate / 1-worker rate), assuming the per-"
        "worker rate holds on cores of this speed",
        "data.image_decode=gpu: what the workers do (draw the box, send the bytes); the decode then runs on "
        "the GPU (`make gpu-check`), not measured here",
        "decode, resize/crop: one thread, best of 3 over 200 images; read + rest = total - the two",
    ]
    bc.write_results("data_224", rows, table, notes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=bc.CPU_MODEL)
    p.add_argument("--batches", type=int, default=24, help="batches read per measurement")
    p.add_argument("--train-steps", type=int, default=10, help="plain-loop steps for the consumption rate")
    p.add_argument("--batch", type=int, default=bc.CPU_BATCH)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--work", default="/tmp/mmpretrain-bench")
    p.add_argument(
        "--section", choices=("all", "64", "224"), default="all", help="64 px digits, 224 px scenes"
    )
    p.add_argument("--batch224", type=int, default=64)
    p.add_argument("--batches224", type=int, default=24, help="batches per measurement at 224 px")
    p.add_argument("--workers224", type=int, default=2, help="the N of the N-worker figure at 224 px")
    p.add_argument("--reps224", type=int, default=3)
    p.add_argument("--child", choices=PIPES, help=argparse.SUPPRESS)
    p.add_argument("--scenes", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, Path(a.scenes), a.batch224, a.batches224, [0, 1, a.workers224])
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.section in ("all", "224"):
        section224(a, Path(a.work))
    if a.section == "224":
        return
    digits = bc.digits_root(Path(a.work))
    cfg = compose(
        [
            f"data.root={digits}",
            "model=openclip",
            f"model.config={bc.model_json(a.model)}",
            f"data.batch_size={a.batch}",
        ]
    )
    from mmpretrain.config import safe_instantiate as _instantiate
    from mmpretrain.config import to_plain as _plain
    from mmpretrain.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    loss_fn = _instantiate(cfg.loss)
    train_batches = collect_batches(model, cfg, a.train_steps)
    sizes = bytes_per_batch(model, cfg)
    rows = [
        {"what": "bytes per batch", "images": k, "bytes": sizes[k], "image_bytes": sizes[f"{k}_image"]}
        for k in ("float32", "uint8")
    ]
    for k in ("float32", "uint8"):
        print(
            f"one batch of {a.batch} with {k} images: {sizes[k]:,} bytes ({sizes[f'{k}_image']:,} of them "
            "images)",
            flush=True,
        )
    for rep in range(a.reps):
        times = plain_loop(model, loss_fn, _plain(cfg.optim), train_batches, 1.0)
        model_rate = bc.steady_rate([t - times[0] for t in times], a.batch, 2)
        rows.append(
            {"what": "model (plain loop)", "workers": "", "rep": rep, "samples_per_s": round(model_rate, 1)}
        )
        print(f"model consumes {model_rate:.1f} samples/s", flush=True)
        for workers in (0, 1, 2):
            rate = pipeline_rate(model, cfg, workers, a.batches)
            rows.append({"what": "pipeline", "workers": workers, "rep": rep, "samples_per_s": round(rate, 1)})
            print(f"pipeline with {workers} workers: {rate:.1f} samples/s", flush=True)
    model_rate = bc.median([r["samples_per_s"] for r in rows if r["what"].startswith("model")])
    table_rows = [["model consumption (plain fp32 loop)", "–", model_rate, "1.00"]]
    for workers in (0, 1, 2):
        rate = bc.median([r["samples_per_s"] for r in rows if r.get("workers") == workers])
        table_rows.append(
            [f"our webdataset pipeline, {workers} workers", workers, rate, f"{rate / model_rate:.2f}"]
        )
    table = bc.md_table(["what", "workers", "samples/s (median)", "vs model"], table_rows)
    size_rows = [
        [
            "float32, normalised in the worker (before)",
            f"{sizes['float32']:,}",
            4,
            f"{shared_memory_gb(4, 4):.1f}",
        ],
        ["uint8, normalised by the tower (now)", f"{sizes['uint8']:,}", 2, f"{shared_memory_gb(1, 2):.2f}"],
    ]
    table += "\n\n" + bc.md_table(
        [
            "images sent as",
            f"bytes per batch of {a.batch} (measured)",
            "prefetch_factor",
            "GB shared memory per rank at batch 512, 224 px, 8 workers",
        ],
        size_rows,
    )
    notes = [
        (
            f"model `{a.model}` preprocess (open_clip transform + tokenizer), batch {a.batch}, {a.batches} "
            f"batches per measurement (first excluded), {a.reps} interleaved reps; the workers share the "
            "same cores as the model in real training, so the worker rates are an upper bound"
        ),
        (
            "bytes per batch: every tensor of one training batch (images, tokens, labels) as a worker "
            "sends it; shared memory per rank = 512 x 3 x 224 x 224 x (4 or 1 bytes) x 8 workers x "
            "prefetch_factor (images only)"
        ),
    ]
    bc.write_results("data", rows, table, notes)


if __name__ == "__main__":
    main()
