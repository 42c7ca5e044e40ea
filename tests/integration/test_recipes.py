"""The training recipes from the installed console script: weight EMA (validation on the average and on the
raw weights, both in the checkpoint, export of either) and patch dropout on a timm ViT, in one tiny run."""

from __future__ import annotations

import json

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
