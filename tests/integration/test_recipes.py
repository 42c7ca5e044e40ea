"""The training recipes from the installed console script: weight EMA (validation on the average and on the
raw weights, both in the checkpoint, export of either) and patch dropout on a timm ViT, in one tiny run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.test_launch import run_cli

VIT = [
    "model.towers.image.model_name=test_vit",
    "model.towers.image.img_size=16",
    "+model.towers.image.model_kwargs.img_size=16",
    "model.towers.text.config.text_cfg.width=32",
    "model.towers.text.config.text_cfg.heads=2",
    "model.towers.text.config.text_cfg.layers=1",
    "model.towers.text.config.text_cfg.context_length=16",
    "model.embed_dim=32",
]


def test_ema_and_patch_dropout_from_the_console_script(digits_root, tmp_path):
    run = tmp_path / "run"
    run_cli(
        [
            "train",
            "debug=fast",
            f"data.root={digits_root}",
            *VIT,
            "model.towers.image.patch_dropout=0.5",
            "model.ema.enabled=true",
            "model.ema.decay=0.5",
            "model.ema.warmup=false",
            "model.ema.eval_both=true",
            "callbacks.model_summary=null",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    ema, raw = metrics["val/retrieval_mean_R@1/image_text"], metrics["val_raw/retrieval_mean_R@1/image_text"]
    assert 0 <= ema <= 1 and 0 <= raw <= 1
    assert (run / "plots" / "ema_vs_raw.png").stat().st_size > 0
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val_raw/zeroshot_top1/image_text" in header

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    average = ckpt["ema_state_dict"]
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert average.keys() == trained.keys()
    assert ckpt["callbacks"]["WeightEMA"] == {"updates": 4, "last_step": 4}
    key = "towers.image.model.patch_embed.proj.weight"
    assert not torch.equal(average[key], trained[key])  # four updates at decay 0.5 lag the weights

    exported = load_file(run / "export" / "model.safetensors")  # export_at_end: the average by default
    assert all(torch.equal(exported[k], average[k]) for k in average)
    out = tmp_path / "raw"
    run_cli(["export", f"ckpt={run}/checkpoints/last.ckpt", f"out={out}", "export.weights=raw"], cwd=tmp_path)
    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


def _records(run):
    out = {}
    for path in sorted((run / "rec").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out[(rec["rank"], rec["step"])] = rec
    return out


@pytest.mark.slow
def test_distillation_online_under_ddp_then_cached_with_exact_resume(digits_root, tmp_path):
    """From the console script: online distillation (logit + feature terms, grad caching, 2 DDP ranks, the
    weight EMA too), `mmpretrain data teacher-embeddings`, then distill.cached=true, resumed from a step
    checkpoint onto the same batches and losses."""
    from mmpretrain.export import export
    from mmpretrain.model import build_model
    from tests.conftest import compose_config

    torch.manual_seed(0)
    teacher_cfg = compose_config(
        "train", ["model.towers.text.config.text_cfg.layers=1", "model.embed_dim=64"]
    )
    teacher = export(build_model(teacher_cfg.model), tmp_path / "teacher")
    common = [
        "debug=fast",
        *VIT,
        "callbacks.model_summary=null",
        "callbacks.plots=null",
        f"distill.teacher={teacher}",
        "distill.feature_weight=0.5",
    ]
    online = tmp_path / "online"
    run_cli(
        [
            "train",
            *common,
            f"data.root={digits_root}",
            "trainer=ddp",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            "optim.grad_cache_chunks=2",
            "model.ema.enabled=true",  # and the weight average under DDP, validated beside the raw weights
            "model.ema.eval_both=true",
            f"hydra.run.dir={online}",
        ],
        cwd=tmp_path,
    )
    header = (online / "metrics.csv").read_text().splitlines()[0]
    assert "train/distill_logit_loss" in header and "train/distill_feature_loss" in header
    assert "val_raw/zeroshot_top1/image_text" in header
    ckpt = torch.load(online / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (
        ckpt["callbacks"]["WeightEMA"]["updates"] == 4 and "distill.heads.image.weight" in ckpt["state_dict"]
    )

    shards = sorted(str(p) for p in (digits_root / "train").glob("*.tar"))[:2]
    cached = tmp_path / "cached"
    run_cli(
        [
            "data",
            "teacher-embeddings",
            f"teacher={teacher}",
            f"in=[{','.join(shards)}]",
            f"out={cached}",
            "augmentations=2",
            "model=tiny",
            *VIT,
            "data=digits",
            f"data.root={digits_root}",
        ],
        cwd=tmp_path,
    )
    resume = [
        *common,
        "distill.cached=true",
        f"data.root={digits_root}",
        f"data.sources.digits.shards={cached}/*.tar",
        "data.train_samples=64",
        "trainer.max_steps=6",
        "trainer.max_epochs=2",  # epochs of 4 steps: the second pass trains on stored augmentation 1
        "trainer.val_check_interval=6",
        "callbacks.step_checkpoint.every_n_train_steps=3",
        "callbacks.step_checkpoint.save_top_k=-1",
        "+callbacks.record._target_=mmpretrain.training.callbacks.RecordBatches",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_cli(
        ["train", *resume, f"+callbacks.record.dirpath={full}/rec", f"hydra.run.dir={full}"], cwd=tmp_path
    )
    run_cli(
        [
            "train",
            *resume,
            f"+callbacks.record.dirpath={resumed}/rec",
            f"hydra.run.dir={resumed}",
            f"resume={full}/checkpoints/step0000003.ckpt",
        ],
        cwd=tmp_path,
    )
    a, b = _records(full), _records(resumed)
    assert sorted(b) == [(0, s) for s in range(4, 7)]
    for key in b:
        assert a[key]["keys"] == b[key]["keys"], key
        assert abs(a[key]["loss"] - b[key]["loss"]) <= 1e-6, key
    assert "train/distill_logit_loss" in (full / "metrics.csv").read_text().splitlines()[0]


def test_distillation_from_a_hub_teacher_with_the_mse_term_and_a_sparse_host_ema(digits_root, tmp_path):
    """From the console script: `distill.teacher=hf-hub:ORG/REPO` (an open_clip model in an offline hub
    cache, 32 px images: the student's 16 px crops are resized to it), `distill.feature_loss=mse` and
    `distill.logit_weight`, with the weight average updated every 2nd step (``on_cpu``: accepted; on this
    CPU-only machine the host is where the model is)."""
    import csv
    import os
    import subprocess

    from tests.hub_cache import add_open_clip
    from tests.integration.test_launch import console_script

    cache = tmp_path / "hub"
    add_open_clip(cache, "org/tiny-clip")
    run = tmp_path / "run"
    cmd = [
        str(console_script()),
        "train",
        "debug=fast",
        f"data.root={digits_root}",
        *VIT,
        "distill.teacher=hf-hub:org/tiny-clip",
        "distill.logit_weight=0.5",
        "distill.feature_weight=2.0",
        "distill.feature_loss=mse",
        "model.ema.enabled=true",
        "model.ema.every_n_steps=2",
        "model.ema.on_cpu=true",
        "callbacks.model_summary=null",
        "callbacks.plots=null",
        "export_at_end=false",
        f"hydra.run.dir={run}",
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    last = rows[-1]
    terms = ("train/image_text_loss", "train/distill_logit_loss", "train/distill_feature_loss")
    assert all(float(last[t]) > 0 for t in terms)
    # the terms are what train/loss sums (each already weighted)
    assert float(last["train/loss"]) == pytest.approx(sum(float(last[t]) for t in terms), rel=1e-5)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["callbacks"]["WeightEMA"] == {"updates": 2, "last_step": 4}  # steps 2 and 4 of 4
    assert not any(k.startswith("distill.heads") for k in ckpt["state_dict"])  # 32 = 32: no head to learn
