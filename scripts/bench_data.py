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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=bc.CPU_MODEL)
    p.add_argument("--batches", type=int, default=24, help="batches read per measurement")
    p.add_argument("--train-steps", type=int, default=10, help="plain-loop steps for the consumption rate")
    p.add_argument("--batch", type=int, default=bc.CPU_BATCH)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--work", default="/tmp/mmpretrain-bench")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
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
