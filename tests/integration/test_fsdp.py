"""``trainer=fsdp`` through the real CLI on 2 CPU processes (gloo): the same losses as ``trainer=ddp``
on the same global batches (InfoNCE and SigLIP, a partly locked tower, per-tower lr and layer
decay, gradient clipping), SIGKILL + ``resume=auto`` from the sharded checkpoint, and the sharded
checkpoint read by ``export`` (our layout and open_clip's, which open_clip loads) and ``eval``.

The runs reuse test_fault_tolerance's tiny recipe (test_vit 16 px, 1-layer text tower, batch 8 per
rank); the file is slow (``make test-slow``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.test_fault_tolerance import (
    ROOT,
    env,
    kill_at_checkpoint,
    record,
    records,
    run_cli,
)

pytestmark = pytest.mark.slow

STEPS = 10
TWO_RANKS = [
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    "data.train_samples=64",
    f"trainer.max_steps={STEPS}",
    "trainer.limit_val_batches=1",
    "callbacks.plots=null",
]
# A tower locked but for its last 2 parameter groups, another learning rate for the text tower, layer decay.
OPTIONS = [
    "+model.towers.image.lock={unlocked_groups:2}",
    "model.towers.text.lr_scale=0.5",
    "optim.layer_decay=0.8",
]


def mean_losses(run: Path) -> list[float]:
    """train/loss of every step: each rank's loss is its share, their mean the global batch's."""
    rec = records(run)
    assert sorted(rec) == [(r, s) for r in (0, 1) for s in range(1, STEPS + 1)], sorted(rec)
    return [(rec[(0, s)]["loss"] + rec[(1, s)]["loss"]) / 2 for s in range(1, STEPS + 1)]


def train_pair(tmp_path: Path, digits_root: Path, *overrides: str) -> tuple[Path, Path]:
    runs = []
    for trainer in ("ddp", "fsdp"):
        run = tmp_path / trainer
        run_cli(
            run,
            f"data.root={digits_root}",
            f"trainer={trainer}",
            *TWO_RANKS,
            *OPTIONS,
            "export_at_end=true",
            *overrides,
            *record(run, tensors=True),
            timeout=420,
        )
        runs.append(run)
    ddp, fsdp = runs
    a, b = records(ddp), records(fsdp)
    for key in a:  # the same samples on the same rank at every step
        assert a[key]["keys"] == b[key]["keys"], key
    return ddp, fsdp


def test_fsdp_losses_equal_ddp_and_its_sharded_checkpoint_exports_the_same_model(digits_root, tmp_path):
    ddp, fsdp = train_pair(tmp_path, digits_root, "loss=infonce")
    got, ref = mean_losses(fsdp), mean_losses(ddp)
    assert got == pytest.approx(ref, abs=1e-5), (got, ref)
    assert ref[-1] < ref[0]  # it trained

    sharded = fsdp / "checkpoints" / "last.ckpt"
    assert sharded.is_dir() and {p.name for p in sharded.iterdir()} >= {
        ".metadata",
        "meta.pt",
        "__0_0.distcp",
        "__1_0.distcp",
    }
    assert not list((fsdp / "checkpoints").glob(".*")), "a temporary checkpoint directory was left behind"

    # export from the sharded directory, in one process (not the 2 that wrote it) = the DDP run's export
    from mmpretrain.commands.export import export_cmd
    from tests.conftest import compose_config

    outs = {}
    for name, ckpt in (("fsdp", sharded), ("ddp", ddp / "checkpoints" / "last.ckpt")):
        outs[name] = export_cmd(compose_config("export", [f"ckpt={ckpt}", f"out={tmp_path}/export-{name}"]))
    import mmpretrain

    a, b = (mmpretrain.load_pretrained(outs[n]) for n in ("fsdp", "ddp"))
    batch = torch.load(next((fsdp / "rec").glob("rank0-step000001.pt")), weights_only=True)
    with torch.no_grad():
        for m in ("image", "text"):
            torch.testing.assert_close(a.encode(m, batch[m]), b.encode(m, batch[m]), atol=1e-6, rtol=0)
        # the end-of-run exports (step 10; last.ckpt is step 8's epoch end): FSDP's, gathered from both ranks
        a, b = (mmpretrain.load_pretrained(run / "export") for run in (fsdp, ddp))
        for m in ("image", "text"):
            torch.testing.assert_close(a.encode(m, batch[m]), b.encode(m, batch[m]), atol=1e-6, rtol=0)

    # eval reads the sharded checkpoint directly
    from mmpretrain.commands.evaluate import evaluate

    metrics = evaluate(
        compose_config(
            "eval",
            [
                f"data.root={digits_root}",
                "data.num_workers=0",
                "trainer.enable_progress_bar=false",
                f"ckpt={sharded}",
            ],
            run_dir=tmp_path / "eval",
        )
    )
    assert 0 <= metrics["val/zeroshot_top1/image_text"] <= 1


@pytest.mark.parametrize(
    "loss", [["loss=siglip"], ["loss.tiled=true", "loss.tile_size=4"]], ids=["siglip", "tiled"]
)
def test_fsdp_siglip_and_the_tiled_infonce_equal_ddp(digits_root, tmp_path, loss):
    ddp, fsdp = train_pair(tmp_path, digits_root, *loss)
    got, ref = mean_losses(fsdp), mean_losses(ddp)
    assert got == pytest.approx(ref, abs=1e-5), (got, ref)


def test_fsdp_sigkill_then_resume_auto_continues_exactly(digits_root, tmp_path):
    common = [
        f"data.root={digits_root}",
        "trainer=fsdp",
        *TWO_RANKS,
        "callbacks.step_checkpoint.every_n_train_steps=3",
    ]
    full = tmp_path / "full"
    run_cli(full, *common, *record(full), timeout=420)

    killed = tmp_path / "killed"
    marker = kill_at_checkpoint(killed, *common, *record(killed), "resume=auto", timeout=300)
    assert marker.is_dir()  # a sharded checkpoint
    out = run_cli(killed, *common, *record(killed), "resume=auto", timeout=420).stdout
    resumed_from = next(line for line in out.splitlines() if "resume=auto" in line)
    assert "resuming from" in resumed_from and ".ckpt" in resumed_from, resumed_from

    a, b = records(full), records(killed)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key]["keys"] == b[key]["keys"], key  # the same samples: the data stream resumed exactly
        assert abs(a[key]["loss"] - b[key]["loss"]) <= 1e-6, (key, a[key]["loss"], b[key]["loss"])


OPEN_CLIP_CHILD = r"""
import sys, torch, open_clip
model, _, _ = open_clip.create_model_and_transforms("local-dir:" + sys.argv[1])
model.eval()
batch = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    out = {"image": model.encode_image(batch["image"], normalize=True),
           "text": model.encode_text(batch["text"], normalize=True)}
torch.save(out, sys.argv[3])
"""


def test_fsdp_open_clip_model_with_grad_cache_exports_to_open_clip(digits_root, tmp_path):
    """An open_clip model trained under trainer=fsdp (GradCache on): its sharded checkpoint exports to
    open_clip's layout, which open_clip itself loads with the same embeddings."""
    cfg = tmp_path / "oc.json"
    cfg.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
            }
        )
    )
    run = tmp_path / "oc"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mmpretrain.cli",
            "train",
            "model=openclip",
            f"model.config={cfg}",
            f"data.root={digits_root}",
            "trainer=fsdp",
            *TWO_RANKS,
            "trainer.max_steps=3",
            "optim.grad_cache_chunks=2",
            "data.batch_size=8",
            "data.num_workers=0",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            "callbacks.progress_bar=null",
            f"hydra.run.dir={run}",
            *record(run, tensors=True),
        ],
        env=env(),
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=420,
    )
    sharded = run / "checkpoints" / "last.ckpt"
    from mmpretrain.commands.export import export_cmd
    from mmpretrain.export import model_from_checkpoint
    from tests.conftest import compose_config

    out = export_cmd(
        compose_config("export", [f"ckpt={sharded}", f"out={tmp_path}/oc-export", "format=open_clip"])
    )
    ours = model_from_checkpoint(sharded).eval()
    batch = torch.load(next((run / "rec").glob("rank0-step000001.pt")), weights_only=True)
    # open_clip takes normalised float images (our towers normalise uint8 pixels themselves) and text at its
    # context length (our data stream cuts the padding columns: padding them back is exact)
    context = ours.towers["text"].model_cfg["text_cfg"]["context_length"]
    text = torch.nn.functional.pad(batch["text"], (0, context - batch["text"].shape[-1]))
    batch = {"image": ours.towers["image"].normalize_input(batch["image"]), "text": text}
    batch_file = tmp_path / "batch.pt"
    torch.save(batch, batch_file)
    result = tmp_path / "theirs.pt"
    child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-c", OPEN_CLIP_CHILD, str(out), str(batch_file), str(result)],
        env=child_env,
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    theirs = torch.load(result, weights_only=True)
    with torch.no_grad():
        for m in ("image", "text"):
            torch.testing.assert_close(theirs[m], ours.encode(m, batch[m]), atol=1e-5, rtol=0)


def test_fsdp_nan_on_one_rank_is_skipped_and_batchnorm_statistics_stay_finite(digits_root, tmp_path):
    """The non-finite guard under trainer=fsdp (rank 1's batch all-NaN at step 2) on the default
    digits model, whose resnet10t has BatchNorm: the step is skipped on both ranks, later losses are
    finite, and rank 1's NaN running statistics do not reach the checkpoint (rank 0's are taken
    before every training forward, as DDP broadcasts them)."""
    run = tmp_path / "nan"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mmpretrain.cli",
            "train",
            "debug=fast",
            "trainer=fsdp",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            f"data.root={digits_root}",
            "data.num_workers=0",
            "logger=csv",
            "trainer.log_every_n_steps=1",
            "callbacks.plots=null",
            "trainer.enable_progress_bar=false",
            "callbacks.progress_bar=null",
            f"hydra.run.dir={run}",
            "model.towers.text.config.text_cfg.width=32",
            "model.towers.text.config.text_cfg.heads=2",
            "model.towers.text.config.text_cfg.layers=1",
            "+callbacks.nan._target_=mmpretrain.training.callbacks.InjectNaN",
            "+callbacks.nan.steps=[2]",
            "+callbacks.nan.rank=1",
        ],
        env=env(),
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=420,
    )
    import csv

    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("train/nonfinite_skips")]
    assert [float(r["train/nonfinite_skips"]) for r in rows] == [0.0, 1.0, 1.0, 1.0], rows
    assert all(float(r["train/loss"]) == float(r["train/loss"]) for r in rows[2:])  # finite after the skip
    from mmpretrain.io import read_state_dict

    weights = read_state_dict(run / "checkpoints" / "last.ckpt")
    assert any("running_mean" in k for k in weights)
    assert all(torch.isfinite(v).all() for v in weights.values())
