"""Patch dropout (FLIP): in training only the kept patches go through the blocks; evaluation sees all,
and gives the features of the same weights without patch dropout."""

import pytest
import torch

from mmpretrain.model import apply_training_options, build_model
from tests.conftest import compose_config

OPEN_CLIP_VIT = [
    "experiment=clip_vit-tiny_digits",
    "model.config.vision_cfg.layers=1",
    "model.config.vision_cfg.width=32",
    "model.config.vision_cfg.head_width=16",
    "model.config.vision_cfg.image_size=32",
    "model.config.text_cfg.width=32",
    "model.config.text_cfg.heads=2",
    "model.config.text_cfg.layers=1",
]
TIMM_VIT = [
    "model.towers.image.model_name=vit_tiny_patch16_224",
    "+model.towers.image.model_kwargs.depth=1",
    "+model.towers.image.model_kwargs.img_size=32",
    "+model.towers.image.model_kwargs.patch_size=8",
    "model.towers.text.config.text_cfg.layers=1",
]


def build(overrides):
    torch.manual_seed(0)
    cfg = compose_config("train", overrides)
    return apply_training_options(build_model(cfg.model), cfg.model)


def tokens_into_blocks(model, images):
    """The token count the image tower's first block receives (open_clip's LND or timm's NLD layout)."""
    tower = model.towers["image"]
    blocks = getattr(getattr(tower, "encoder", None), "transformer", None)
    first = blocks.resblocks[0] if blocks is not None else tower.model.blocks[0]
    seen = []
    handle = first.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        model.encode_image(images)
    finally:
        handle.remove()
    (shape,) = seen
    return shape[1] if shape[0] == images.shape[0] else shape[0]


@pytest.mark.parametrize("layout", [OPEN_CLIP_VIT, TIMM_VIT], ids=["open_clip", "timm"])
def test_training_drops_patches_and_evaluation_sees_them_all(layout):
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    plain = build(layout)
    dropped = build([*layout, "model.towers.image.patch_dropout=0.5"])
    dropped.load_state_dict(plain.state_dict())
    all_tokens = 16 + 1  # 4x4 patches of 8 px, plus the class token
    plain.train(), dropped.train()
    assert tokens_into_blocks(plain, images) == all_tokens
    assert tokens_into_blocks(dropped, images) == 8 + 1  # half the patches; the class token always kept
    plain.eval(), dropped.eval()
    assert tokens_into_blocks(dropped, images) == all_tokens
    with torch.no_grad():
        torch.testing.assert_close(dropped.encode_image(images), plain.encode_image(images))


def test_patch_dropout_is_refused_for_a_cnn_and_out_of_range():
    with pytest.raises(ValueError, match="patch_dropout is for ViT"):
        build(["model.towers.image.patch_dropout=0.5"])  # model=tiny: a timm ResNet
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        build([*OPEN_CLIP_VIT, "model.towers.image.patch_dropout=1.0"])


def test_patch_dropout_is_no_part_of_the_exported_tower():
    model = build([*OPEN_CLIP_VIT, "model.towers.image.patch_dropout=0.5"])
    assert "patch_dropout" not in model.towers["image"].config
    assert model.towers["image"].config["config"]["vision_cfg"].get("patch_dropout", 0) == 0
