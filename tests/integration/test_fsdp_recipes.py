"""The recipes under ``trainer=fsdp`` on 2 CPU processes (gloo), from the console script: the weight EMA
sharded like the model (validated on the average and the raw weights, saved into and restored from the
sharded checkpoint, exported gathered) and distillation (logit and feature terms, a projection head to a
wider teacher) give what ``trainer=ddp`` gives on the same batches; SIGKILL + ``resume=auto`` continues
onto the same losses and the same average.

The runs are test_fault_tolerance's tiny recipe (test_vit 16 px, 1-layer text tower, batch 8 per rank).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration import test_fault_tolerance as ft
from tests.integration.test_launch import run_cli

pytestmark = pytest.mark.slow

STEPS = 6
RECIPES = [
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    "data.train_samples=64",  # 4 steps an epoch
    f"trainer.max_steps={STEPS}",
    "trainer.limit_val_batches=1",
    "callbacks.plots=null",
    "callbacks.step_checkpoint.every_n_train_steps=3",
    "model.ema.enabled=true",
    "model.ema.decay=0.5",  # a short memory: six updates leave the average well apart from the weights
    "model.ema.warmup=false",
    "model.ema.eval_both=true",
    "distill.feature_weight=0.5",  # the student's 32-d embeddings through a head to the teacher's 64
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from mmpretrain.export import export
    from mmpretrain.model import build_model
    from tests.conftest import compose_config

    torch.manual_seed(0)
    cfg = compose_config("train", ["model.towers.text.config.text_cfg.layers=1", "model.embed_dim=64"])
    return export(build_model(cfg.model), tmp_path_factory.mktemp("teacher") / "export")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "export" / "model.safetensors")


def test_fsdp_weight_ema_and_distillation_equal_ddp(digits_root, teacher, tmp_path):
    runs = {}
    for trainer in ("ddp", "fsdp"):
        run = runs[trainer] = tmp_path / trainer
        run_cli(
            [
                "train",
                *ft.TINY,
                f"data.root={digits_root}",
                f"trainer={trainer}",
                *RECIPES,
                f"distill.teacher={teacher}",
                "export_at_end=true",
                *ft.record(run),
                f"hydra.run.dir={run}",
            ],
            cwd=tmp_path,
        )
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    a, b = ft.records(ddp), ft.records(fsdp)
    assert sorted(a) == sorted(b) == [(r, s) for r in (0, 1) for s in range(1, STEPS + 1)]
    for key in a:  # the same samples, the same loss (contrastive + both distillation terms)
        assert a[key]["keys"] == b[key]["keys"], key
        assert abs(a[key]["loss"] - b[key]["loss"]) <= 1e-5, (key, a[key]["loss"], b[key]["loss"])
    header = (fsdp / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/distill_logit_loss", "train/distill_feature_loss", "val_raw/image_text_loss"} <= set(
        header
    )
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (ddp, fsdp))
    for k in ma:  # the EMA's validation (val/) and the raw weights' (val_raw/), as under DDP
        if k.startswith(("val/", "val_raw/", "train/distill")):
            assert mb[k] == pytest.approx(ma[k], abs=1e-5), k
    assert mb["val/image_text_loss"] != mb["val_raw/image_text_loss"]

    # the end-of-run export: the average, gathered from both ranks' shards = DDP's average
    ema = _weights(fsdp)
    for k, v in _weights(ddp).items():
        torch.testing.assert_close(ema[k], v, atol=1e-5, rtol=0)

    # `mmpretrain export` of the sharded step-6 checkpoint: the average by default, the weights on request
    sharded = fsdp / "checkpoints" / "step0000006.ckpt"
    assert sharded.is_dir() and (sharded / ".metadata").is_file()
    out_ema, out_raw = tmp_path / "export-ema", tmp_path / "export-raw"
    run_cli(["export", f"ckpt={sharded}", f"out={out_ema}"], cwd=tmp_path)
    run_cli(["export", f"ckpt={sharded}", f"out={out_raw}", "export.weights=raw"], cwd=tmp_path)
    exported = load_file(out_ema / "model.safetensors")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    raw = load_file(out_raw / "model.safetensors")
    ckpt = torch.load(ddp / "checkpoints" / "step0000006.ckpt", map_location="cpu", weights_only=True)
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert "distill.heads.image.weight" in ckpt["state_dict"]
    for k, v in trained.items():
        torch.testing.assert_close(raw[k], v, atol=1e-5, rtol=0)
    key = "towers.image.model.patch_embed.proj.weight"
    assert (raw[key] - ema[key]).abs().max() > 1e-4  # the average lags the weights


def test_fsdp_sigkill_then_resume_restores_the_sharded_ema_exactly(digits_root, teacher, tmp_path):
    common = [f"data.root={digits_root}", "trainer=fsdp", *RECIPES, f"distill.teacher={teacher}"]
    full = tmp_path / "full"
    ft.run_cli(full, *common, "export_at_end=true", *ft.record(full), timeout=420)

    killed = tmp_path / "killed"
    marker = ft.kill_at_checkpoint(
        killed, *common, "export_at_end=true", *ft.record(killed), "resume=auto", timeout=300
    )
    assert marker.is_dir()  # a sharded checkpoint
    from mmpretrain.io import read_checkpoint

    saved = read_checkpoint(marker)  # the average's shards went into the sharded checkpoint
    assert saved["callbacks"]["WeightEMA"] == {"updates": 3, "last_step": 3}
    assert saved["ema_state_dict"].keys() == {
        k.removeprefix("model.") for k in saved["state_dict"] if k.startswith("model.")
    }
    out = ft.run_cli(killed, *common, "export_at_end=true", *ft.record(killed), "resume=auto", timeout=420)
    assert "resuming from" in next(line for line in out.stdout.splitlines() if "resume=auto" in line)

    a, b = ft.records(full), ft.records(killed)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key]["keys"] == b[key]["keys"], key
        assert abs(a[key]["loss"] - b[key]["loss"]) <= 1e-6, (key, a[key]["loss"], b[key]["loss"])
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (full, killed))
    assert mb["val/image_text_loss"] == ma["val/image_text_loss"]  # the step-4 validation, on the average
    resumed, uninterrupted = _weights(killed), _weights(full)  # the average after step 6
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_fsdp_whole_file_checkpoint_gathers_the_ema_and_resume_shards_it_again(digits_root, tmp_path):
    """``trainer.strategy.save_distributed_checkpoint=false``: rank 0 writes one whole file, the average
    gathered into it; a run resumed from it (and stopped at once) exports exactly that average."""
    common = [f"data.root={digits_root}", "trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu"]
    common += ["data.train_samples=64", "trainer.limit_val_batches=1", "callbacks.plots=null"]
    common += ["model.ema.enabled=true", "model.ema.decay=0.5", "model.ema.warmup=false"]
    common += ["trainer.strategy.save_distributed_checkpoint=false", "export_at_end=true"]
    first = tmp_path / "first"
    ft.run_cli(first, *common, "trainer.max_steps=3", timeout=420)
    ckpt = first / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    average = saved["ema_state_dict"]
    assert saved["callbacks"]["WeightEMA"] == {"updates": 3, "last_step": 3}
    assert all(average[k].shape == _weights(first)[k].shape for k in average)  # whole, not one rank's shard
    again = tmp_path / "again"
    ft.run_cli(again, *common, "trainer.max_steps=3", f"resume={ckpt}", timeout=420)
    exported = _weights(again)
    assert exported.keys() == average.keys() and all(torch.equal(exported[k], average[k]) for k in average)
    trained = saved["state_dict"]["model.towers.image.model.patch_embed.proj.weight"]
    assert not torch.equal(exported["towers.image.model.patch_embed.proj.weight"], trained)
