"""Benchmark: object storage (an S3 API server, moto's, in this process on 127.0.0.1).

1. Resume from the store at two run lengths, as scripts/bench_resume.py does: train 100 steps on
   shards in the bucket with ``paths.remote`` -> its checkpoint; a copy whose data state is the
   position at step 10,000 (the streams walked there in-process) uploaded as a second run's
   ``last.ckpt``. Each is resumed with ``resume=auto`` on an empty run directory; until the first
   step the server counts what the resume asked for: listings, checkpoint downloads (bytes), reads of
   shards (ranged GETs and where they start), and everything else.
2. The uploader's effect on step time: the same run with and without ``paths.remote``, a checkpoint
   every 5 steps; the median step interval, and that of the steps right after a save.

Writes benchmarks/results/store.csv and store.md. ~5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import bench_common as bc
import torch
from bench_resume import TINY, WORKERS, walk_to

sys.path.insert(0, str(bc.ROOT))
from tests.s3 import BUCKET, FaultyS3  # noqa: E402 (the test server, from the source checkout)


def cmd(run: Path, root: Path, pattern: str, *extra: str) -> list[str]:
    return [
        bc.python(), "-m", "mmpretrain.cli", "train", *TINY,
        f"data.root={root}", f"data.sources.digits.shards={pattern}", f"hydra.run.dir={run}",
        "+callbacks.record._target_=mmpretrain.training.callbacks.RecordBatches",
        f"+callbacks.record.dirpath={run}/rec", *extra,
    ]  # fmt: skip


def watch_steps(command: list[str], env: dict, rec: Path, on_first=None, timeout: float = 600) -> list[float]:
    """Run ``command``; the wall time at which each training step's record appeared (polled every 5 ms).
    ``on_first()`` is called when the first appears."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, env=env, cwd=bc.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    path, seen, stamps = rec / "rank0.jsonl", 0, []
    while proc.poll() is None and time.perf_counter() - start < timeout:
        n = path.read_text().count("\n") if path.exists() else 0
        if n > seen:
            now = time.perf_counter() - start
            stamps += [now] * (n - seen)
            if seen == 0 and on_first is not None:
                on_first()
            seen = n
        time.sleep(0.005)
    err = proc.communicate(timeout=timeout)[1]
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{err[-3000:]}")
    return stamps


def classify(log: list[str], remote: str) -> dict[str, int]:
    """Requests of a resume by what they were for."""
    out: Counter[str] = Counter()
    run_prefix = "/" + remote.split("://", 1)[1].split("/", 1)[0]
    for line in log:
        method, rest = line.split(" ", 1)
        if "list-type=2" in rest:
            out["listings"] += 1
        elif ".ckpt" in rest and method == "GET":
            out["checkpoint GETs"] += 1
        elif ".tar" in rest and method == "GET":
            start = re.search(r"bytes=(\d+)-", rest)
            out["shard ranged GETs"] += 1
            out["shard GETs from offset > 0"] += bool(start and int(start.group(1)) > 0)
        elif method == "HEAD":
            out["HEADs"] += 1
        elif method in ("PUT", "POST", "DELETE"):
            out["writes"] += 1
        elif rest.startswith(run_prefix):
            out["other GETs"] += 1
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmpretrain-bench"))
    parser.add_argument("--far", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=40, help="steps of the step-time comparison")
    args = parser.parse_args()
    root = bc.digits_root(args.work)
    base = args.work / "store"
    shutil.rmtree(base, ignore_errors=True)
    server = FaultyS3()
    env = bc.child_env(threads=1) | {
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": server.endpoint, "MMPRETRAIN_CACHE": str(base / "cache"),
    }  # fmt: skip
    os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "MMPRETRAIN_"))})
    from mmpretrain import storage

    fs, _ = storage.filesystem(f"s3://{BUCKET}")
    fs.mkdir(BUCKET)
    shards = f"s3://{BUCKET}/digits/train"
    storage.put_tree(root / "train", shards)
    files, _ = bc.train_shards(root)
    pattern = f"'{shards}/{bc.brace_pattern(files).rsplit('/', 1)[1]}'"

    print("training 100 steps on the bucket's shards with paths.remote ...", flush=True)
    near_remote = f"s3://{BUCKET}/runs/near"
    bc.run_checked(
        cmd(base / "near", root, pattern, "trainer.max_steps=100", f"paths.remote={near_remote}"), env=env
    )
    near = base / "near" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(near, weights_only=True)
    print(f"walking the streams to step {args.far:,} ...", flush=True)
    positions, expected_keys, _ = walk_to(root, args.far)
    ckpt["ContrastiveDataModule"] |= {"batches_consumed": args.far, "positions": [positions]}
    far = base / "far.ckpt"
    torch.save(ckpt, far)
    far_remote = f"s3://{BUCKET}/runs/far"
    storage.put_file(far, f"{far_remote}/checkpoints/last.ckpt")

    rows = []
    for step, remote in ((100, near_remote), (args.far, far_remote)):
        run = base / f"resume-{step}"
        counts: dict = {}

        def snapshot(counts=counts, remote=remote) -> None:
            counts.update(classify(list(server.log), remote))

        server.reset_counts()
        stamps = watch_steps(
            cmd(run, root, pattern, "resume=auto", f"paths.remote={remote}", "trainer.max_steps=101"),
            env, run / "rec", on_first=snapshot,
        )  # fmt: skip
        ckpt_mb = fs.info(f"{remote.split('://', 1)[1]}/checkpoints/last.ckpt")["size"] / 1e6
        rows.append(
            {
                "resume_step": step,
                "first_step_s": round(stamps[0], 2),
                "checkpoint_MB": round(ckpt_mb, 2),
                **counts,
            }
        )
        print(rows[-1], flush=True)
    got = json.loads((base / f"resume-{args.far}" / "rec" / "rank0.jsonl").read_text().splitlines()[0])[
        "keys"
    ]
    assert got == expected_keys, (
        "the far resume did not train on the batch the uninterrupted stream has there"
    )

    print("step time with and without paths.remote ...", flush=True)
    every = 5
    timing = []
    for label, extra in (("local only", []), ("paths.remote", [f"paths.remote=s3://{BUCKET}/runs/timing"])):
        run = base / f"timing-{label.replace(' ', '-').replace('.', '-')}"
        stamps = watch_steps(
            cmd(run, root, pattern, f"trainer.max_steps={args.steps}",
                f"callbacks.step_checkpoint.every_n_train_steps={every}",
                "callbacks.step_checkpoint.save_top_k=-1", *extra),
            env, run / "rec",
        )  # fmt: skip
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        after_save = [g for i, g in enumerate(gaps, start=2) if (i - 1) % every == 0]
        timing.append(
            {
                "run": label,
                "median_step_ms": round(bc.median(gaps[5:]) * 1e3, 1),
                "median_step_after_save_ms": round(bc.median(after_save) * 1e3, 1),
                "steps": len(stamps),
            }
        )
        print(timing[-1], flush=True)
    server.stop()

    kinds = [
        "listings",
        "checkpoint GETs",
        "HEADs",
        "shard ranged GETs",
        "shard GETs from offset > 0",
        "other GETs",
    ]
    table = bc.md_table(
        ["resume at step", "first step (s)", "checkpoint MB", *kinds],
        [
            [r["resume_step"], r["first_step_s"], r["checkpoint_MB"], *(r.get(k, 0) for k in kinds)]
            for r in rows
        ],
    )
    table += "\n\n" + bc.md_table(
        ["run", "median step (ms)", f"median step right after a save every {every} (ms)", "steps"],
        [[t["run"], t["median_step_ms"], t["median_step_after_save_ms"], t["steps"]] for t in timing],
    )
    notes = [
        f"requests counted by the server from the process start to the first step recorded; {WORKERS} "
        "DataLoader workers, shuffle buffer 1,000 (each re-reads the shards its buffered samples are in: "
        "one ranged GET a shard)",
        f"the step-{args.far:,} checkpoint is the step-100 one with the streams' position walked to "
        f"step {args.far:,} (as scripts/bench_resume.py makes it); each resume trains one step",
        f"step time: {args.steps} steps, checkpoints (every {every} steps, all kept) uploaded by the "
        "background uploader",
    ]
    bc.write_results("store", rows + timing, table, notes)


if __name__ == "__main__":
    main()
