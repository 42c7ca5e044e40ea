"""What a resume leaves behind and picks up: resume=auto never restarts at the divergence guard's
checkpoint, interrupted checkpoint writes are cleaned up, a sharded checkpoint caught mid-publication
still counts, and metrics.csv holds each step once after a resume from an earlier checkpoint."""

from __future__ import annotations

import csv
import os
import time
from collections import Counter
from pathlib import Path

import torch

from mmpretrain.runs import newest_complete_checkpoint, remove_interrupted_writes, resume_path
from tests.integration.test_launch import run_cli


def complete(path):
    torch.save({"global_step": 1}, path)
    return path


def test_resume_auto_skips_the_nonfinite_stop_checkpoint_unless_named(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    good = complete(ckpts / "step0000010.ckpt")
    time.sleep(0.01)
    stop = complete(ckpts / "nonfinite-stop.ckpt")  # the newest file
    assert newest_complete_checkpoint(ckpts) == good
    assert resume_path({"resume": "auto"}, tmp_path) == str(good)
    assert resume_path({"resume": str(stop)}, tmp_path) == str(stop)


def test_temporary_files_of_interrupted_checkpoint_writes_are_removed(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    keep = complete(ckpts / "last.ckpt")
    leftovers = [ckpts / ".last.ckpt.1234-abcd1234.tmp", ckpts / ".last.ckpt.tmp-999"]
    for path in leftovers:
        path.write_bytes(b"PK half a checkpoint")
    (ckpts / ".step0000004.ckpt.tmp").mkdir()  # a sharded checkpoint's unpublished directory
    assert sorted(remove_interrupted_writes(ckpts)) == sorted([*leftovers, ckpts / ".step0000004.ckpt.tmp"])
    assert sorted(p.name for p in ckpts.iterdir()) == [keep.name]


def test_a_sharded_checkpoint_caught_between_its_two_renames_is_resumed_from(tmp_path):
    """trainer=fsdp publishes by renaming the old directory to .<name>.old, then the new one to <name>:
    between the two renames only .<name>.old exists, and it is complete."""
    ckpts = tmp_path / "checkpoints"
    old = ckpts / ".last.ckpt.old"
    old.mkdir(parents=True)
    (old / ".metadata").write_bytes(b"x")
    complete(old / "meta.pt")
    assert newest_complete_checkpoint(ckpts) == old
    (ckpts / "last.ckpt").mkdir()  # published: the .old one is not a candidate any more
    assert newest_complete_checkpoint(ckpts) is None  # (the new one here is incomplete)


def test_metrics_csv_holds_each_step_once_after_resuming_from_an_earlier_checkpoint(digits_root, tmp_path):
    run = tmp_path / "run"
    common = [
        "debug=fast",
        f"data.root={digits_root}",
        "data.num_workers=0",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "callbacks.step_checkpoint.every_n_train_steps=2",
        "callbacks.step_checkpoint.save_top_k=-1",
        "logger=csv",
        "callbacks.plots=null",
        "model.towers.text.config.text_cfg.width=32",
        "model.towers.text.config.text_cfg.heads=2",
        "model.towers.text.config.text_cfg.layers=1",
        f"hydra.run.dir={run}",
    ]
    run_cli(["train", *common], cwd=tmp_path)
    os.utime(run / "checkpoints" / "step0000002.ckpt")
    proc = run_cli(["train", *common, f"resume={run / 'checkpoints' / 'step0000002.ckpt'}"], cwd=tmp_path)
    # Lightning warned at every resume that the loader is not resumable; it is, and we say so instead.
    assert "resumed the data stream exactly: after the 2 batches" in proc.stdout, proc.stdout[-2000:]
    assert "dataloader is not resumable" not in proc.stdout + proc.stderr
    with open(run / "metrics.csv", newline="") as f:
        steps = Counter(int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss"))
    assert sorted(steps) == list(range(6)) and set(steps.values()) == {1}, steps


def test_resume_refuses_shards_that_are_not_the_checkpointed_ones(digits_root, tmp_path):
    """The same number of shards under other names (a re-glob, a replaced download) would get the byte
    offsets saved for other files: an exact resume is refused, naming data.resume=approx."""
    import shutil
    import subprocess
    import sys

    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    run = tmp_path / "run"
    common = [
        "debug=fast",
        f"data.root={root}",
        "data.num_workers=0",
        "logger=csv",
        "callbacks.plots=null",
        "model.towers.text.config.text_cfg.width=32",
        "model.towers.text.config.text_cfg.heads=2",
        "model.towers.text.config.text_cfg.layers=1",
        f"hydra.run.dir={run}",
    ]
    run_cli(["train", *common, "trainer.max_steps=2"], cwd=tmp_path)
    for i, shard in enumerate(sorted((root / "train").glob("*.tar"))):
        shard.rename(shard.with_name(f"renamed-{i:04d}.tar"))
    (root / "train" / "sizes.json").unlink()
    cmd = [
        str(Path(sys.executable).parent / "mmpretrain"),
        "train",
        *common,
        "trainer.max_steps=4",
        "resume=auto",
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"WANDB_MODE": "offline"},
    )
    assert proc.returncode != 0
    assert "not the checkpointed ones" in proc.stderr and "data.resume=approx" in proc.stderr, proc.stderr[
        -3000:
    ]
    run_cli(["train", *common, "trainer.max_steps=4", "resume=auto", "data.resume=approx"], cwd=tmp_path)
