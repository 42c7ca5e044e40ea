"""A checkpoint or an export stands alone: evaluating, exporting or fine-tuning it never reads the
weights the run started from (a hub repo, a local file), so it works offline, after that file has
moved, and without contacting any hub a checkpoint from someone else names."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.hub_cache import add_open_clip, add_timm
from tests.integration.test_launch import run_cli

SMALL_TEXT = [
    "model.towers.text.config.text_cfg.width=32",
    "model.towers.text.config.text_cfg.heads=2",
    "model.towers.text.config.text_cfg.layers=1",
]


def test_a_checkpoint_whose_starting_weights_are_gone_rebuilds_without_them(tmp_path, monkeypatch):
    """The model config a checkpoint of c00ec82 holds names a local weights file and a hub model; both
    are gone (offline, empty hub cache): the model is rebuilt from the checkpoint's own tensors."""
    from huggingface_hub import constants

    from mmpretrain.export import model_from_checkpoint
    from mmpretrain.model import build_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    weights = tmp_path / "resnet10t.safetensors"
    from safetensors.torch import save_file

    cfg = {
        "embed_dim": 16,
        "towers": {
            "image": {
                "_target_": "mmpretrain.towers.timm.TimmTower",
                "model_name": "resnet10t",
                "img_size": 32,
                "pretrained_path": str(weights),
            },
            "text": {
                "_target_": "mmpretrain.towers.open_clip.OpenClipTower",
                "modality": "text",
                "config": {
                    "embed_dim": 16,
                    "text_cfg": {
                        "context_length": 8,
                        "vocab_size": 49408,
                        "width": 8,
                        "heads": 1,
                        "layers": 1,
                    },
                },
                "pretrained": "hf-hub:org/gone",
            },
        },
    }
    trained = build_model(
        {
            **cfg,
            "towers": {
                **cfg["towers"],
                "image": {k: v for k, v in cfg["towers"]["image"].items() if k != "pretrained_path"},
                "text": {k: v for k, v in cfg["towers"]["text"].items() if k != "pretrained"},
            },
        }
    )
    save_file(
        {k: v.contiguous() for k, v in trained.towers["image"].model.state_dict().items()}, str(weights)
    )
    ckpt = tmp_path / "old.ckpt"
    state = {f"model.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": cfg}}, ckpt)
    weights.unlink()
    model = model_from_checkpoint(ckpt)
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.slow
def test_train_from_hub_and_local_weights_then_delete_them_and_use_the_checkpoint_and_export(
    digits_root, tmp_path
):
    """Train with an image tower from the (offline) hub cache and a text tower from a local file;
    delete both; then eval, export and fine-tune both the .ckpt and the export, offline."""
    cache = tmp_path / "hub"
    add_timm(cache, "org/tiny-resnet", model_name="resnet10t")
    reference = add_open_clip(cache, "org/tiny-clip")
    text_file = tmp_path / "text-tower.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(text_file))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str(cache)
    try:
        run = tmp_path / "run"
        data = [f"data.root={digits_root}", "data.num_workers=0"]
        run_cli(
            [
                "train",
                "debug=fast",
                *data,
                "model.towers.image.model_name=hf-hub:org/tiny-resnet",
                "model.towers.text.config=hf-hub:org/tiny-clip",
                f"model.towers.text.pretrained_path={text_file}",
                "model.embed_dim=32",
                f"hydra.run.dir={run}",
            ],
            cwd=tmp_path,
        )
        shutil.rmtree(cache)
        text_file.unlink()
        os.environ["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
        ckpt = run / "checkpoints" / "last.ckpt"
        for source in (ckpt, run / "export"):
            tag = source.name.replace(".", "_")
            run_cli(
                ["eval", f"ckpt={source}", *data, f"hydra.run.dir={tmp_path / ('eval_' + tag)}"], cwd=tmp_path
            )
            run_cli(["export", f"ckpt={source}", f"out={tmp_path / ('exported_' + tag)}"], cwd=tmp_path)
            run_cli(
                [
                    "finetune",
                    "task=linear_probe",
                    "task.epochs=1",
                    f"pretrained={source}",
                    *data,
                    f"hydra.run.dir={tmp_path / ('probe_' + tag)}",
                ],
                cwd=tmp_path,
            )
    finally:
        os.environ.pop("HF_HUB_OFFLINE", None)
        os.environ.pop("HF_HUB_CACHE", None)
    assert Path(tmp_path / "exported_last_ckpt" / "model.safetensors").exists()
