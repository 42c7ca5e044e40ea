"""LiT's pretrained image tower: a supervised digits classifier saved as a local weights file."""

from __future__ import annotations

import json

import torch

from mmpretrain.data.builders import build, is_built
from mmpretrain.model import apply_training_options, build_model
from tests.conftest import compose_config


def test_the_classifier_backbone_loads_as_the_locked_lit_image_tower(digits_root, tmp_path):
    out = tmp_path / "digits_resnet10t"
    assert not is_built(out, "digits-classifier")
    build("digits-classifier", out, digits_root=digits_root, epochs=1, image_size=32)
    assert is_built(out, "digits-classifier")
    info = json.loads((out / "info.json").read_text())
    assert info["epochs"] == 1 and 0.0 <= info["val_accuracy"] <= 1.0

    cfg = compose_config(
        "train", ["experiment=lit_digits", f"paths.data_dir={tmp_path}"], run_dir=tmp_path / "run"
    )
    assert cfg.model.towers.image.pretrained_path == str(out / "model.safetensors")
    assert dict(cfg.data.build) == {"digits": str(tmp_path / "digits"), "digits-classifier": str(out)}
    model = apply_training_options(build_model(cfg.model), cfg.model)
    image = model.towers["image"]
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert saved and all(torch.equal(image.model.state_dict()[k], v) for k, v in saved.items())
    assert not any(p.requires_grad for p in image.parameters())  # locked: LiT trains text + projections
    assert any(p.requires_grad for p in model.towers["text"].parameters())
    image.train()
    assert not any(m.training for m in image.modules() if isinstance(m, torch.nn.BatchNorm2d))
