"""Benchmark 3: decoded samples/s of our webdataset pipeline vs the model's consumption rate.

Our ``ShardStream`` (tar -> shuffle -> decode -> open_clip preprocess -> collate) in a DataLoader
with 0, 1, 2 workers, read as fast as possible (first batch excluded: worker start-up), against
the samples/s a plain training loop of the model consumes on this machine. A pipeline slower than
the model starves training: ratio < 1.
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
    from mmpretrain.datamodule import sources_from_config

    per_worker = -(-batches // max(workers, 1))
    stream = ShardStream(sources_from_config(cfg.data), model.preprocess(True), batch_size=int(cfg.data.batch_size),
                         train=True, batches_per_worker=per_worker, seed=0)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    times, n = [], 0
    for batch in loader:
        times.append(time.perf_counter())
        n += 1
    bs = int(cfg.data.batch_size)
    return bs * (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=bc.CPU_MODEL)
    p.add_argument("--batches", type=int, default=24, help="batches read per measurement")
    p.add_argument("--train-steps", type=int, default=10, help="plain-loop steps for the consumption rate")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--work", default="/tmp/mmpretrain-bench")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    digits = bc.digits_root(Path(a.work))
    cfg = compose([f"data.root={digits}", "model=openclip", f"model.config={bc.MODEL_DIR / (a.model + '.json')}",
                   f"data.batch_size={a.batch}"])
    from mmpretrain.cli import _instantiate, _plain
    from mmpretrain.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    loss_fn = _instantiate(cfg.loss)
    train_batches = collect_batches(model, cfg, a.train_steps)
    rows = []
    for rep in range(a.reps):
        times = plain_loop(model, loss_fn, _plain(cfg.optim), train_batches, 1.0)
        model_rate = bc.steady_rate([t - times[0] for t in times], a.batch, 2)
        rows.append(dict(what="model (plain loop)", workers="", rep=rep, samples_per_s=round(model_rate, 1)))
        print(f"model consumes {model_rate:.1f} samples/s", flush=True)
        for workers in (0, 1, 2):
            rate = pipeline_rate(model, cfg, workers, a.batches)
            rows.append(dict(what="pipeline", workers=workers, rep=rep, samples_per_s=round(rate, 1)))
            print(f"pipeline with {workers} workers: {rate:.1f} samples/s", flush=True)
    model_rate = bc.median([r["samples_per_s"] for r in rows if r["what"].startswith("model")])
    table_rows = [["model consumption (plain fp32 loop)", "–", model_rate, "1.00"]]
    for workers in (0, 1, 2):
        rate = bc.median([r["samples_per_s"] for r in rows if r["workers"] == workers])
        table_rows.append([f"our webdataset pipeline, {workers} workers", workers, rate, f"{rate / model_rate:.2f}"])
    table = bc.md_table(["what", "workers", "samples/s (median)", "vs model"], table_rows)
    notes = [f"model `{a.model}` preprocess (open_clip transform + tokenizer), batch {a.batch}, "
             f"{a.batches} batches per measurement (first excluded), {a.reps} interleaved reps; "
             "the workers share the same cores as the model in real training, so the worker rates are an upper bound"]
    bc.write_results("data", rows, table, notes)


if __name__ == "__main__":
    main()
