"""Fault injection through the real CLI in subprocesses: DDP (2 gloo processes, 2 torchrun "nodes"),
SIGKILL + exact resume, SIGTERM preemption, bad data across workers and ranks, NaN on one rank.

Every run is tiny (test_vit 16 px, 1-layer text tower, batch 8), so each takes seconds; the file
is marked slow (``make test-slow``). The image tower has no BatchNorm, so a DDP step equals the
single-process step of the concatenated global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration import stacks
from tests.integration.gloo import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY = [
    "data.batch_size=8",
    "data.num_workers=2",
    "data.shuffle_buffer=50",
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


def record(run: Path, tensors: bool = False) -> list[str]:
    return [
        "+callbacks.record._target_=mmpretrain.training.callbacks.RecordBatches",
        f"+callbacks.record.dirpath={run}/rec",
        f"+callbacks.record.tensors={str(tensors).lower()}",
    ]


def env() -> dict[str, str]:
    return os.environ | {
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
    }


def train_cmd(run: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mmpretrain.cli", "train", *TINY, f"hydra.run.dir={run}", *overrides]


def kill_at_checkpoint(run: Path, *overrides: str, step: int = 3, timeout: float = 180) -> Path:
    """Start ``mmpretrain train`` into ``run``, SIGKILL its whole process group (every rank and data
    worker) as soon as the checkpoint of ``step`` appears, and return that checkpoint's path."""
    proc = subprocess.Popen(
        train_cmd(run, *overrides),
        env=env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = run / "checkpoints" / f"step{step:07d}.ckpt"
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and marker.exists()
    return marker


def run_cli(
    run: Path, *overrides: str, check: bool = True, timeout: int = 240
) -> subprocess.CompletedProcess:
    proc = stacks.run(train_cmd(run, *overrides), env=env(), cwd=ROOT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def records(run: Path) -> dict[tuple[int, int], dict]:
    """(rank, step) -> the last record written for it (a resumed run rewrites the redone steps)."""
    out = {}
    for path in sorted((run / "rec").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by SIGKILL
                continue
            out[(rec["rank"], rec["step"])] = rec
    return out


# -- DDP: 2 processes == 1 process on the same global batch; val metrics over the whole val set --
def single_process_losses(run: Path, overrides: list[str], steps: int, digits_root: Path) -> list[float]:
    """Train the same model single-process on the recorded global batches (rank 0's ++ rank 1's)."""
    import lightning as L

    from mmpretrain.config import safe_instantiate as _instantiate
    from mmpretrain.config import to_plain as _plain
    from mmpretrain.model import build_model
    from mmpretrain.training.module import ContrastiveModule
    from tests.conftest import compose_config

    cfg = compose_config("train", TINY + overrides + [f"data.root={digits_root}"], run_dir=run / "ref")
    L.seed_everything(cfg.seed, workers=True)
    model = build_model(cfg.model)
    module = ContrastiveModule(model, _instantiate(cfg.loss), _plain(cfg.optim))
    batches = []
    for step in range(1, steps + 1):
        parts = [torch.load(run / "rec" / f"rank{r}-step{step:06d}.pt", weights_only=True) for r in (0, 1)]
        # each rank's text comes cut to its own longest caption: pad back with the padding id (exact)
        width = max(p["text"].shape[-1] for p in parts)
        text = torch.cat(
            [torch.nn.functional.pad(p["text"], (0, width - p["text"].shape[-1])) for p in parts]
        )
        batches.append({"image": torch.cat([p["image"] for p in parts]), "text": text})
    losses: list[float] = []

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Grab()],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return losses


def ddp_losses(run: Path, steps: int) -> list[float]:
    rec = records(run)
    return [(rec[(0, s)]["loss"] + rec[(1, s)]["loss"]) / 2 for s in range(1, steps + 1)]


# 2 ranks x 2 workers x batch 8, 64 samples per epoch: an epoch is 4 steps, then validation.
DDP = [
    "trainer.accelerator=cpu",
    "data.train_samples=64",
    "trainer.max_steps=4",
    "trainer.limit_val_batches=null",
]


def test_ddp_two_processes_match_single_process_and_validate_on_the_whole_val_set(digits_root, tmp_path):
    run = tmp_path / "ddp"
    run_cli(
        run, f"data.root={digits_root}", "trainer=ddp", "trainer.devices=2", *DDP, *record(run, tensors=True)
    )
    rec = records(run)
    assert sorted(rec) == [(r, s) for r in (0, 1) for s in range(1, 5)]
    for s in range(1, 5):  # the ranks read disjoint samples
        assert not set(rec[(0, s)]["keys"]) & set(rec[(1, s)]["keys"])
    ref = single_process_losses(run, DDP, 4, digits_root)
    got = ddp_losses(run, 4)
    assert got == pytest.approx(ref, abs=1e-5), (got, ref)

    # Validation metrics of the 2-process run == single-process eval of the same weights.
    from mmpretrain.commands.evaluate import evaluate
    from tests.conftest import compose_config

    ddp_metrics = json.loads((run / "metrics.json").read_text())
    single = evaluate(
        compose_config(
            "eval",
            [
                f"data.root={digits_root}",
                "data.num_workers=0",
                "trainer.enable_progress_bar=false",
                f"ckpt={run}/checkpoints/last.ckpt",
            ],
            run_dir=tmp_path / "eval",
        )
    )
    keys = [k for k in single if k.startswith("val/")]
    assert "val/zeroshot_top1/image_text" in keys and "val/retrieval_R@1/image_to_text" in keys
    for k in keys:
        # Many digits captions are identical, so their similarities tie exactly; a different order of the
        # val set (gathered from 2 ranks) changes matmul rounding and can flip such ties by one rank.
        tol = {"rel": 1e-3} if "rank/" in k else {"abs": 1e-5}
        assert ddp_metrics[k] == pytest.approx(single[k], **tol), k


def test_two_torchrun_nodes_on_loopback_match_single_process(digits_root, tmp_path):
    run = tmp_path / "nodes"
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(node),
            "--rdzv-backend",
            "static",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "-m",
            "mmpretrain.cli",
            "train",
            *TINY,
            f"hydra.run.dir={run}",
            f"data.root={digits_root}",
            "trainer=ddp_multinode",
            "trainer.num_nodes=2",
            "trainer.devices=1",
            *DDP,
            "trainer.limit_val_batches=1",
            *record(run, tensors=True),
        ]
        procs.append(
            subprocess.Popen(
                cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert sorted(records(run)) == [(r, s) for r in (0, 1) for s in range(1, 5)]
    ref = single_process_losses(run, DDP, 4, digits_root)
    assert ddp_losses(run, 4) == pytest.approx(ref, abs=1e-5)


# -- SIGKILL at step k, resume=auto: the same batches and losses as the uninterrupted run ---------
RESUME = [
    "data.train_samples=48",
    "trainer.max_steps=10",
    "trainer.limit_val_batches=1",
    "callbacks.step_checkpoint.every_n_train_steps=3",
]


#: loss=coca: the caption decoder's weights, its optimizer state and the caption targets resume too
COCA = ["loss=coca", "model.decoder.width=32", "model.decoder.heads=2", "model.decoder.layers=1"]


#: model.ema: the weight average resumes bit-exact too (compared in the last checkpoints)
EMA = ["model.ema.enabled=true", "model.ema.decay=0.9", "model.ema.eval_both=true"]


@pytest.mark.parametrize("objective", [[], COCA, EMA], ids=["infonce", "coca", "ema"])
def test_sigkill_then_resume_auto_continues_exactly(digits_root, tmp_path, objective):
    common = [f"data.root={digits_root}", *RESUME, *objective]
    full = tmp_path / "full"
    run_cli(full, *common, *record(full))

    killed = tmp_path / "killed"
    kill_at_checkpoint(killed, *common, *record(killed), "resume=auto")
    out = run_cli(killed, *common, *record(killed), "resume=auto").stdout
    assert "resume=auto: resuming from" in out

    a, b = records(full), records(killed)
    assert sorted(a) == sorted(b) == [(0, s) for s in range(1, 11)]
    for key in a:
        assert a[key]["keys"] == b[key]["keys"], key  # same samples, same order, none twice or skipped
        assert abs(a[key]["loss"] - b[key]["loss"]) <= 1e-6, (key, a[key]["loss"], b[key]["loss"])
    diff = max(abs(a[key]["loss"] - b[key]["loss"]) for key in a)
    resumed_from = next(line for line in out.splitlines() if "resume=auto" in line)
    # Step 3 of 2 workers, epochs of 6 steps: the streams change worker at the epoch boundary (handed over
    # by position, not replayed).
    assert resumed_from.endswith("step0000003.ckpt"), resumed_from
    print(resumed_from, f"max |loss diff| {diff}")
    seen_full = [k for s in range(1, 11) for k in a[(0, s)]["keys"]]
    seen_killed = [k for s in range(1, 11) for k in b[(0, s)]["keys"]]
    assert sorted(seen_full) == sorted(seen_killed)
    if objective == COCA:  # the caption term was trained (and logged) in the resumed run too
        assert "train/caption_loss" in (killed / "metrics.csv").read_text().splitlines()[0]
    if objective == EMA:  # the average after the resumed steps is the uninterrupted run's, bit for bit
        # step 9: the newest step checkpoint of both (last.ckpt is the epoch end's, step 6)
        ends = [torch.load(r / "checkpoints" / "step0000009.ckpt", weights_only=True) for r in (full, killed)]
        state = {"updates": 9, "last_step": 9}
        assert ends[0]["callbacks"]["WeightEMA"] == ends[1]["callbacks"]["WeightEMA"] == state
        assert torch.equal(
            ends[0]["state_dict"]["model.logit_scales.shared"],
            ends[1]["state_dict"]["model.logit_scales.shared"],
        )
        for key, value in ends[0]["ema_state_dict"].items():
            assert torch.equal(value, ends[1]["ema_state_dict"][key]), key
        assert "val_raw/zeroshot_top1/image_text" in (killed / "metrics.csv").read_text().splitlines()[0]


def test_ddp_resume_continues_every_ranks_stream_exactly(digits_root, tmp_path):
    """Each rank's streams resume from their own checkpointed positions (gathered into rank 0's
    checkpoint): at step 3 of 2 workers, across the epoch boundary at step 4."""
    common = [
        f"data.root={digits_root}",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data.train_samples=64",
        "trainer.max_steps=6",
        "trainer.limit_val_batches=1",
        "callbacks.step_checkpoint.every_n_train_steps=3",
        "callbacks.step_checkpoint.save_top_k=-1",
    ]
    full = tmp_path / "full"
    run_cli(full, *common, *record(full))
    resumed = tmp_path / "resumed"
    run_cli(resumed, *common, *record(resumed), f"resume={full}/checkpoints/step0000003.ckpt")
    a, b = records(full), records(resumed)
    assert sorted(b) == [(r, s) for r in (0, 1) for s in range(4, 7)]
    for key in b:
        assert a[key]["keys"] == b[key]["keys"], key
        assert abs(a[key]["loss"] - b[key]["loss"]) <= 1e-6, key


# -- SIGTERM (preemption): every rank stops, one checkpoint, exit 0; resume=auto picks it up ------
def test_sigterm_saves_a_checkpoint_and_exits_cleanly_on_every_rank(digits_root, tmp_path):
    run = tmp_path / "preempt"
    args = [
        f"data.root={digits_root}",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data.train_samples=64",
        "trainer.max_steps=400",
        "trainer.limit_val_batches=1",
        *record(run),
    ]
    proc = subprocess.Popen(
        train_cmd(run, *args),
        env=env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:  # wait until both ranks train
        rec = records(run) if (run / "rec").exists() else {}
        if {r for r, s in rec if s >= 2} == {0, 1}:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to rank 0 only: the other rank learns of it through an all-reduce
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-4000:]
    saved = sorted((run / "checkpoints").glob("preempted-step*.ckpt"))
    assert len(saved) == 1, out[-3000:]
    step = int(saved[0].stem.removeprefix("preempted-step"))
    assert 2 <= step < 400
    ranks_at_stop = {r: max(s for rr, s in records(run) if rr == r) for r in (0, 1)}
    assert ranks_at_stop[0] == ranks_at_stop[1] == step  # both ranks stopped after the same step
    ckpt = torch.load(saved[0], weights_only=True)
    assert ckpt["global_step"] == step
    assert "SIGTERM: saved" in out


# -- bad data: exact skip count across 2 workers x 2 ranks; on_error=raise names key and shard -----
def write_bad_shards(
    digits_root: Path, dest: Path, n_shards: int = 8, per_shard: int = 12
) -> dict[str, list]:
    """Small shards from the digits where every shard starts with a corrupt image and a sample without
    text, and the last shard is cut inside sample 6's image. Returns each shard's items in read
    order: a key for a good sample, or an int (skips counted there)."""
    import tarfile

    import webdataset as wds

    shutil.copytree(digits_root / "val", dest / "val")
    for name in ("classnames.txt", "templates.txt"):
        shutil.copy(digits_root / name, dest / name)
    (dest / "train").mkdir()
    source = iter(wds.WebDataset(str(digits_root / "train" / "train-0000.tar"), shardshuffle=False))
    items: dict[str, list] = {}
    for i in range(n_shards):
        path = dest / "train" / f"bad-{i:02d}.tar"
        samples = [
            {k: v for k, v in next(source).items() if k in ("__key__", "png", "txt", "cls")}
            for _ in range(per_shard)
        ]
        samples[0]["png"] = b"\x89PNG but not really"  # corrupt image bytes
        del samples[1]["txt"]  # a sample missing its text
        with wds.TarWriter(str(path)) as sink:
            for sample in samples:
                sink.write(sample)
        items[str(path)] = [1, 1] + [s["__key__"] for s in samples[2:]]
    with tarfile.open(path) as tf:  # truncate the last shard inside sample 6's image
        png = next(m for m in tf.getmembers() if m.name == f"{samples[6]['__key__']}.png")
    path.write_bytes(path.read_bytes()[: png.offset_data + png.size // 2])
    # the 4 good samples, then the cut: sample 6, which the tar holds in part, is dropped and counted
    items[str(path)] = items[str(path)][:6] + [1]
    return items


def expected_skips(items: dict[str, list], rec: dict, world: int, workers: int, seed: int = 0) -> int:
    """Naive reference: walk each reader's stream (its shards pass after pass, as ShardStream splits
    them) along the keys it really delivered; count the bad samples before its last delivered one."""
    from mmpretrain.data.stream.position import shard_plan

    urls = sorted(items)
    total = 0
    for rank in range(world):

        def shards_of_pass(p, worker, rank=rank):
            return [urls[k] for k in shard_plan(len(urls), seed, p, rank, world, worker, workers)]

        for worker in range(workers):
            delivered = [
                k
                for (r, s), v in sorted(rec.items())
                if r == rank and (s - 1) % workers == worker
                for k in v["keys"]
            ]
            stream = [x for p in range(10) for u in shards_of_pass(p, worker) for x in items[u]]
            got, pos = [], 0
            while len(got) < len(delivered):
                if isinstance(stream[pos], str):
                    got.append(stream[pos])
                pos += 1
            assert got == delivered, (rank, worker)  # the reader delivered exactly its good samples, in order
            total += sum(x for x in stream[:pos] if isinstance(x, int))
    return total


def test_bad_data_skips_are_counted_exactly_across_workers_and_ranks(digits_root, tmp_path):
    data = tmp_path / "data"
    items = write_bad_shards(digits_root, data)
    run = tmp_path / "bad"
    # 8 steps x batch 8: every reader (2 ranks x 2 workers, 2 shards each) goes into its second pass.
    out = run_cli(
        run,
        f"data.root={data}",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data.train_samples=64",
        "trainer.max_steps=8",
        "trainer.limit_val_batches=1",
        "data.shuffle_buffer=0",
        "trainer.log_every_n_steps=1",
        *record(run),
    ).stdout
    skipped = json.loads((run / "metrics.json").read_text())["skipped_samples"]
    expected = expected_skips(items, records(run), world=2, workers=2)
    assert skipped == expected, (skipped, expected, out[-2000:])
    assert expected >= 16  # every reader passed at least its first 2 shards' 4 bad samples
    assert f"skipped samples: {expected}" in out
    csv = (run / "metrics.csv").read_text().splitlines()
    col = csv[0].split(",").index("train/skipped_samples")
    assert max(float(line.split(",")[col]) for line in csv[1:] if line.split(",")[col]) == expected


def test_on_error_raise_stops_at_the_first_bad_sample_naming_key_and_shard(digits_root, tmp_path):
    data = tmp_path / "data"
    items = write_bad_shards(digits_root, data, n_shards=2)
    first = min(items)
    Path(sorted(items)[1]).unlink()
    proc = run_cli(
        tmp_path / "raise",
        f"data.root={data}",
        "data.num_workers=1",
        "data.on_error=raise",
        "trainer.max_steps=3",
        "data.shuffle_buffer=0",
        "data.train_samples=64",
        check=False,
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "SampleError" in text and "sample 'digits_" in text and Path(first).name in text, text[-3000:]
    assert "data.on_error=skip" in text


# -- NaN on one rank: both ranks skip together; K in a row stops with a checkpoint -----------------
def test_nan_on_one_rank_is_skipped_by_all_ranks_then_stops_after_k(digits_root, tmp_path):
    base = [
        f"data.root={digits_root}",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data.train_samples=64",
        "trainer.limit_val_batches=1",
        "callbacks.nonfinite_guard.max_consecutive=3",
        "+callbacks.nan._target_=mmpretrain.training.callbacks.InjectNaN",
        "+callbacks.nan.rank=1",
    ]
    run = tmp_path / "nan"
    out = run_cli(run, *base, "trainer.max_steps=8", "+callbacks.nan.steps=[3]", *record(run)).stdout
    rec = records(run)
    assert rec[(1, 3)]["loss"] != rec[(1, 3)]["loss"]  # NaN on rank 1 at step 3
    assert all(rec[(r, s)]["loss"] == rec[(r, s)]["loss"] for r in (0, 1) for s in range(4, 9))
    csv = (run / "metrics.csv").read_text().splitlines()
    col = csv[0].split(",").index("train/nonfinite_skips")
    counts = [float(line.split(",")[col]) for line in csv[1:] if line.split(",")[col]]
    assert max(counts) == 1.0, out[-2000:]
    from mmpretrain.io import read_state_dict

    weights = read_state_dict(run / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in weights.values())

    stop = tmp_path / "stop"  # single process: the stop logic; the all-ranks decision is checked above
    proc = run_cli(
        stop,
        *base[:1],
        *base[4:-1],
        "trainer.max_steps=20",
        "+callbacks.nan.rank=0",
        "+callbacks.nan.steps=[2,3,4,5,6]",
        "callbacks.step_checkpoint.every_n_train_steps=1",
        "callbacks.step_checkpoint.save_top_k=-1",
        check=False,
    )
    assert proc.returncode != 0
    # The guard reads its device-side streak every check_every (= log_every_n_steps = 5) steps: the
    # read inside step 5 finds 4 skipped steps in a row (2-5) and stops before step 5's update.
    assert "4 consecutive steps had a non-finite loss or gradient" in proc.stdout + proc.stderr
    ckpt = torch.load(stop / "checkpoints" / "nonfinite-stop.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    good = read_state_dict(stop / "checkpoints" / "nonfinite-stop.ckpt")
    after_step1 = read_state_dict(stop / "checkpoints" / "step0000001.ckpt")
    for k, v in good.items():  # the skipped steps did not move the weights: the last good state
        assert torch.isfinite(v).all() and torch.equal(v, after_step1[k]), k


# -- secrets: a wandb key in the environment never lands in the run directory -------------------
def test_wandb_key_in_env_never_reaches_the_run_directory(digits_root, tmp_path):
    secret = "0123456789abcdef0123456789abcdef01234567"  # 40 hex chars, the shape of a real key
    run = tmp_path / "wandb"
    cmd = train_cmd(
        run,
        f"data.root={digits_root}",
        "logger=default",
        "trainer.max_steps=2",
        "data.train_samples=64",
        "trainer.limit_val_batches=1",
        "data.num_workers=0",
    )
    proc = subprocess.run(
        cmd,
        env=env() | {"WANDB_API_KEY": secret},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert any(run.rglob("*.wandb")), "the wandb offline run was not written"
    leaks = [p for p in run.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []
    assert secret not in proc.stdout + proc.stderr
