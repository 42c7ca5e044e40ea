"""Training with shards and checkpoints in object storage, through the installed console script, against
a real S3 API server (moto's, in this process: tests/s3.py): ``paths.remote`` uploads, ``resume=auto``
from the store on a node without the run directory, ``eval``/``export ckpt=s3://``, ``finetune
pretrained=s3://``, kill -9 mid-run, a server failing requests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mmpretrain import storage
from tests.integration.test_fault_tolerance import TINY, record, records
from tests.integration.test_launch import console_script, run_cli
from tests.s3 import BUCKET, s3  # noqa: F401 (the fixture)

SHARDS = f"s3://{BUCKET}/digits/train"


def upload_shards(digits_root: Path) -> str:
    """The digits (shards, sizes.json, class names) in the bucket; the brace pattern of its train shards."""
    storage.put_tree(digits_root, SHARDS.rsplit("/", 1)[0])
    names = sorted(p.name for p in (digits_root / "train").glob("*.tar"))
    stem, first, last = names[0].rsplit("-", 1)[0], names[0][-8:-4], names[-1][-8:-4]
    return f"{SHARDS}/{stem}-{{{first}..{last}}}.tar"


def train_args(run: Path, digits_root: Path | str, pattern: str | None, remote: str, *more: str) -> list[str]:
    """Training on the train shards of ``pattern`` (None: those of ``digits_root``), validating on the
    val shards of ``digits_root``."""
    shards = [f"data.sources.digits.shards='{pattern}'"] if pattern else []  # quoted: Hydra reserves braces
    return [
        "train",
        *TINY,
        f"hydra.run.dir={run}",
        f"data.root={digits_root}",
        *shards,
        f"paths.remote={remote}",
        *more,
    ]


def remote_names(url: str) -> set[str]:
    fs, path = storage.filesystem(url)
    return {os.path.relpath(p, path) for p in fs.find(path)}


def test_run_uploaded_to_the_store_and_read_back_from_it(s3, digits_root, tmp_path):  # noqa: F811
    upload_shards(digits_root)
    remote = f"s3://{BUCKET}/runs/a"
    run = tmp_path / "a"
    args = train_args(  # everything from the bucket: train and val shards, sizes.json, class names
        run, SHARDS.rsplit("/", 1)[0], None, remote,
        "data.num_workers=0", "trainer.max_steps=4", "trainer.limit_val_batches=1",
        "trainer.val_check_interval=4",
        "callbacks.step_checkpoint.every_n_train_steps=2", "export_at_end=true",
    )  # fmt: skip
    out = run_cli(args, cwd=tmp_path).stdout
    assert any(
        "zeroshot_top1" in k for k in json.loads((run / "metrics.json").read_text())
    )  # class names read
    assert f"paths.remote: uploading checkpoints and run files to {remote}" in out
    assert f"uploads to {remote}: " in out and " 0 failed" in out
    names = remote_names(remote)
    for name in ("config.yaml", "metrics.csv", "metrics.json", "checkpoints/last.ckpt", "export/config.json"):
        assert name in names, sorted(names)
    local_ckpts = {p.name for p in (run / "checkpoints").glob("*.ckpt")}
    assert {n.split("/", 1)[1] for n in names if n.startswith("checkpoints/")} == local_ckpts
    assert not [n for n in names if "/." in f"/{n}"], names  # no temporary key left behind
    assert (storage.read_bytes(f"{remote}/checkpoints/last.ckpt")) == (
        run / "checkpoints/last.ckpt"
    ).read_bytes()

    # export reads the checkpoint straight from the store (eval: the slow tests below)
    ex = run_cli(
        ["export", f"ckpt={remote}/checkpoints/last.ckpt", f"out={tmp_path}/ex"], cwd=tmp_path
    ).stdout
    assert (tmp_path / "ex" / "config.json").exists(), ex


def test_a_failed_upload_leaves_nothing_a_resume_takes(s3, tmp_path):  # noqa: F811
    """The server stops answering while a checkpoint is uploaded: the object at its name stays the
    previous complete one, and a resume takes that; a sharded checkpoint without its marker is never taken."""
    from mmpretrain.runs import newest_remote_checkpoint

    remote = f"s3://{BUCKET}/runs/b"
    old, new = tmp_path / "old.ckpt", tmp_path / "new.ckpt"
    old.write_bytes(b"complete checkpoint" * 1000)
    new.write_bytes(b"newer checkpoint" * 1000)
    up = storage.Uploader(remote, tmp_path / "staging")
    up.upload(old, "checkpoints/last.ckpt")
    up.queue.join()
    storage.ATTEMPTS, attempts = 2, storage.ATTEMPTS
    try:
        # The temporary object is written, then the server dies before the copy to the name.
        s3.dead, s3.fail_match = True, r"^(PUT|POST) .*/checkpoints/(last|step9)"
        up.upload(new, "checkpoints/last.ckpt")
        up.upload(new, "checkpoints/step9.ckpt")
        up.queue.join()
        sharded = tmp_path / "sharded.ckpt"
        sharded.mkdir()
        (sharded / ".metadata").write_bytes(b"m")
        (sharded / "meta.pt").write_bytes(b"p")
        s3.fail_match = r"\.complete"
        up.upload(sharded, "checkpoints/step99.ckpt")
        up.close()
    finally:
        storage.ATTEMPTS = attempts
        s3.dead = False
    assert up.failed == 3
    assert storage.read_bytes(f"{remote}/checkpoints/last.ckpt") == old.read_bytes()
    assert storage.read_bytes(f"{remote}/checkpoints/step9.ckpt") is None
    assert "meta.pt" in storage.listing(f"{remote}/checkpoints/step99.ckpt")  # files there, no marker
    assert newest_remote_checkpoint(remote) == f"{remote}/checkpoints/last.ckpt"


# -- slow: kill -9 mid-run, the run directory lost, resume=auto from the store --------------------
RESUME = [
    "data.train_samples=48",
    "trainer.max_steps=10",
    "trainer.limit_val_batches=1",
    "callbacks.step_checkpoint.every_n_train_steps=3",
]


def cli_env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.mark.slow
def test_sigkill_then_resume_auto_from_the_store_continues_exactly(s3, digits_root, tmp_path):  # noqa: F811
    pattern = upload_shards(digits_root)
    full = tmp_path / "full"
    run_cli(
        train_args(full, digits_root, pattern, f"s3://{BUCKET}/runs/full", *RESUME, *record(full)),
        cwd=tmp_path,
    )

    remote = f"s3://{BUCKET}/runs/killed"
    killed = tmp_path / "killed"
    rec = tmp_path / "killed-rec"  # the batch records live outside the run directory the node loses
    args = train_args(killed, digits_root, pattern, remote, *RESUME, *record(rec), "resume=auto")
    proc = subprocess.Popen(
        [str(console_script()), *args],
        env=cli_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if "step0000003.ckpt" in storage.listing(f"{remote}/checkpoints"):
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer, its DataLoader workers and its uploader
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    shutil.rmtree(killed)  # a new node: nothing of the run on its disk

    out = run_cli(args, cwd=tmp_path).stdout
    assert f"resume=auto: downloaded {remote}/checkpoints/" in out, out[-3000:]
    a, b = records(full), records(rec)
    resumed = sorted(s for _, s in b)
    assert resumed[-1] == 10
    for step in range(4, 11):
        assert a[(0, step)]["keys"] == b[(0, step)]["keys"], step  # the same samples, in the same order
        assert abs(a[(0, step)]["loss"] - b[(0, step)]["loss"]) <= 1e-6, step
    assert "checkpoints/last.ckpt" in remote_names(remote)


@pytest.mark.slow
def test_training_through_a_server_that_fails_requests(s3, digits_root, tmp_path):  # noqa: F811
    """One read in 5 answered 503: training finishes, every retry logged with its running count, and
    the checkpoints still reach the store (its writes fail one in 5 too)."""
    pattern = upload_shards(digits_root)
    remote = f"s3://{BUCKET}/runs/faulty"
    s3.fail_every, s3.fail_match = 5, "^(GET|HEAD|PUT) "
    run = tmp_path / "faulty"
    proc = run_cli(
        train_args(run, digits_root, pattern, remote, *RESUME, "data.num_workers=2", "data.shuffle_buffer=0"),
        cwd=tmp_path,
    )
    log = (run / "train.log").read_text()  # library records go to the run's log (conf/hydra)
    assert s3.failed > 0
    assert "storage retry 1 (this process)" in log, log[-3000:]
    assert log.count("storage retry ") >= s3.failed - 1  # each injected failure retried and logged
    assert " 0 failed" in proc.stdout
    s3.fail_every = 0
    assert "checkpoints/last.ckpt" in remote_names(remote)


@pytest.mark.slow
def test_eval_and_finetune_from_the_store(s3, digits_root, tmp_path):  # noqa: F811
    pattern = upload_shards(digits_root)
    remote = f"s3://{BUCKET}/runs/pre"
    short = ["trainer.max_steps=2", "export_at_end=true", "trainer.limit_val_batches=1", "data.num_workers=0"]
    run_cli(train_args(tmp_path / "pre", digits_root, pattern, remote, *short), cwd=tmp_path)
    shutil.rmtree(tmp_path / "pre")
    ev = run_cli(
        [
            "eval",
            f"ckpt={remote}/checkpoints/last.ckpt",
            f"data.root={digits_root}",
            f"hydra.run.dir={tmp_path}/ev",
        ],
        cwd=tmp_path,
    ).stdout
    assert f"downloading {remote}/checkpoints/last.ckpt" in ev
    assert (tmp_path / "ev" / "eval_metrics.json").exists()
    out = run_cli(
        ["finetune", "task=linear_probe", f"pretrained={remote}/export", f"data.root={digits_root}",
         f"hydra.run.dir={tmp_path}/ft"],
        cwd=tmp_path,
    ).stdout  # fmt: skip
    assert f"downloading {remote}/export" in out
    assert (tmp_path / "ft" / "metrics.json").exists()


@pytest.mark.slow
def test_fsdp_sharded_checkpoints_to_the_store(s3, digits_root, tmp_path):  # noqa: F811
    """trainer=fsdp on 2 CPU ranks: its checkpoint directories reach the store (their marker last), a node
    without the run resumes from one, and eval reads one straight from the store. Lightning never sees an
    s3:// path (it writes locally; the uploader copies), so its FSDP ``s3://`` -> ``s3:/`` bug cannot bite."""
    pattern = upload_shards(digits_root)
    remote = f"s3://{BUCKET}/runs/fsdp"
    run = tmp_path / "fsdp"
    fsdp = [
        "trainer=fsdp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data.num_workers=0",
        "callbacks.plots=null",
    ]
    common = [
        *fsdp,
        "data.train_samples=64",
        "trainer.limit_val_batches=1",
        "callbacks.step_checkpoint.every_n_train_steps=3",
    ]
    run_cli(train_args(run, digits_root, pattern, remote, *common, "trainer.max_steps=3"), cwd=tmp_path)
    names = remote_names(remote)
    assert {"checkpoints/step0000003.ckpt/.metadata", "checkpoints/step0000003.ckpt/meta.pt"} <= names
    assert "checkpoints/step0000003.ckpt/.complete" in names
    shutil.rmtree(run)

    out = run_cli(
        train_args(run, digits_root, pattern, remote, *common, "trainer.max_steps=5", "resume=auto"),
        cwd=tmp_path,
    ).stdout
    assert f"resume=auto: downloaded {remote}/checkpoints/" in out, out[-3000:]
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows and max(int(r.split(",")[rows[0].split(",").index("step")]) for r in rows[1:] if r) >= 4
    ev = run_cli(
        [
            "eval",
            f"ckpt={remote}/checkpoints/last.ckpt",
            f"data.root={digits_root}",
            f"hydra.run.dir={tmp_path}/ev",
        ],
        cwd=tmp_path,
    ).stdout
    assert f"downloading {remote}/checkpoints/last.ckpt" in ev
