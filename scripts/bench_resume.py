"""Benchmark: time from process start to the first training step after a resume, 100 vs 10,000
steps into the digits stream. Resume reads the stream's checkpointed position (byte offset,
shuffle buffer by reference): it should cost the same at any step (goal: ratio <= 1.2).

1. Train 100 steps for real (tiny model, batch 4, 2 workers, shuffle buffer 1,000) -> a checkpoint.
2. Walk the same streams in-process to rank batch 10,000 (2 x 5,000 batches of 4: ~28 passes over
   the 1,438 digits) and write a copy of that checkpoint whose data state is the position there
   (the walk reads and decodes every sample, as a replaying resume would; its time is shown).
3. Resume each checkpoint for one step, interleaved (A B A B ...), timing from the process start
   to the first step's record; the 10,000 resume's first batch is checked against step 2's walk.

Writes benchmarks/results/resume.csv and resume.md. ~3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import bench_common as bc
import torch

TINY = [
    "data.batch_size=4",
    "data.num_workers=2",
    "data.shuffle_buffer=1000",
    "data.train_samples=400",
    "trainer.accelerator=cpu",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "logger=csv",
    "export_at_end=false",
    "model.towers.image.model_name=test_vit",
    "model.towers.image.img_size=16",
    "+model.towers.image.model_kwargs.img_size=16",
    "model.towers.text.config.text_cfg.width=32",
    "model.towers.text.config.text_cfg.heads=2",
    "model.towers.text.config.text_cfg.layers=1",
    "model.towers.text.config.text_cfg.context_length=16",
    "model.embed_dim=32",
]
WORKERS = 2


def train_cmd(run: Path, root: Path, *extra: str) -> list[str]:
    return [
        bc.python(),
        "-m",
        "mmpretrain.cli",
        "train",
        *TINY,
        f"data.root={root}",
        f"hydra.run.dir={run}",
        "+callbacks.record._target_=mmpretrain.training.callbacks.RecordBatches",
        f"+callbacks.record.dirpath={run}/rec",
        *extra,
    ]


def walk_to(root: Path, rank_batches: int) -> tuple[list[str], list[str], float]:
    """Each stream's position after the rank's first ``rank_batches`` batches, the keys of batch
    ``rank_batches`` (the first a resume there trains on), and the seconds the walk took.

    The walk runs the real stream (read, shuffle, mix, decode, collate) with a trivial preprocess in
    place of the model's: a position depends only on which samples are read and which fail to
    decode (none in the digits), and main() checks that the resumed run trains on these keys."""
    from hydra import compose, initialize_config_dir

    from mmpretrain.training.datamodule import ContrastiveDataModule

    with initialize_config_dir(str(bc.ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=[*TINY, f"data.root={root}"])
    zeros = {"image": lambda image: torch.zeros(1), "text": lambda text: torch.zeros(1)}
    stream = ContrastiveDataModule(cfg.data, lambda train: zeros, seed=cfg.seed).train_dataloader().dataset
    start = time.perf_counter()
    positions, next_keys = [], []
    for s in range(WORKERS):
        gen = stream._batch_stream(s, WORKERS)
        for _ in range(len(range(s, rank_batches, WORKERS))):
            last = next(gen)
        positions.append(last["__position__"])
        if rank_batches % WORKERS == s:
            next_keys = next(gen)["__key__"]
    return positions, next_keys, time.perf_counter() - start


def first_step_seconds(cmd: list[str], rec: Path, timeout: float = 300) -> float:
    """Seconds from the process start until its first training step is recorded."""
    shutil.rmtree(rec, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=bc.child_env(threads=1),
        cwd=bc.ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    path = rec / "rank0.jsonl"
    while not (path.exists() and path.read_text().strip()):
        if proc.poll() is not None or time.perf_counter() - start > timeout:
            proc.kill()
            raise SystemExit(f"no training step recorded: {' '.join(cmd)}\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"resume failed ({proc.returncode}):\n{err[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmpretrain-bench"))
    parser.add_argument("--far", type=int, default=10_000, help="steps into the stream of the far resume")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    root = bc.digits_root(args.work)
    base = args.work / "resume"
    shutil.rmtree(base, ignore_errors=True)

    print("training 100 steps ...", flush=True)
    bc.run_checked(train_cmd(base / "train", root, "trainer.max_steps=100"), env=bc.child_env(threads=1))
    near = base / "train" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(near, weights_only=True)
    assert ckpt["global_step"] == 100 and ckpt["ContrastiveDataModule"]["batches_consumed"] == 100

    print(f"walking the streams to step {args.far:,} ...", flush=True)
    positions, expected_keys, walk_s = walk_to(root, args.far)
    ckpt["ContrastiveDataModule"] |= {"batches_consumed": args.far, "positions": [positions]}
    far = base / f"step{args.far}.ckpt"
    torch.save(ckpt, far)

    times: dict[int, list[float]] = {100: [], args.far: []}
    for _ in range(args.repeats):
        for step, path in ((100, near), (args.far, far)):
            run = base / f"resume-{step}"
            times[step].append(
                first_step_seconds(
                    train_cmd(run, root, f"resume={path}", "trainer.max_steps=101"), run / "rec"
                )
            )
            print(f"resume at step {step:>6,}: first step after {times[step][-1]:.2f} s", flush=True)
    got = json.loads((base / f"resume-{args.far}" / "rec" / "rank0.jsonl").read_text().splitlines()[0])[
        "keys"
    ]
    assert got == expected_keys, (
        "the far resume did not train on the batch the uninterrupted stream has there"
    )

    near_s, far_s = bc.median(times[100]), bc.median(times[args.far])
    ratio = far_s / near_s
    rows = [
        {"resume_step": 100, "first_step_s": round(near_s, 2)},
        {"resume_step": args.far, "first_step_s": round(far_s, 2)},
    ]
    bc.RESULTS.mkdir(parents=True, exist_ok=True)
    with open(bc.RESULTS / "resume.csv", "w") as f:
        f.write(
            "resume_step,first_step_s\n" + "".join(f"{r['resume_step']},{r['first_step_s']}\n" for r in rows)
        )
    md = (
        f"| resume at step | process start -> first step (s, median of {args.repeats}) |\n|---:|---:|\n| "
        f"100 | {near_s:.2f} |\n| {args.far:,} | {far_s:.2f} |\n\nRatio {ratio:.2f} (goal <= 1.2). Walking "
        f"the stream to step {args.far:,} in one process (reading and decoding every sample, as a replaying "
        f"resume would, without the model's preprocessing) took {walk_s:.1f} s.\n"
    )
    (bc.RESULTS / "resume.md").write_text(md)
    print(md)
    print(f"ratio {ratio:.2f} ({'ok' if ratio <= 1.2 else 'ABOVE the 1.2 goal'})")


if __name__ == "__main__":
    main()
