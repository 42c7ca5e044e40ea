import json

import pytest
import torch
from PIL import Image

from mmpretrain.model import build_model
from mmpretrain.towers.open_clip import OpenClipTower
from mmpretrain.towers.timm import TimmTower

TINY_TEXT = {
    "embed_dim": 32,
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_timm_tower_features_and_transforms():
    tower = TimmTower("resnet10t", img_size=32).eval()
    x = tower.preprocess(train=False)(Image.new("RGB", (40, 40)))
    assert x.shape == (3, 32, 32)
    assert tower(x[None]).shape == (1, tower.output_dim)


def test_unknown_timm_name_lists_close_names():
    with pytest.raises(ValueError, match="timm has no model named 'resnet1O'. Closest names: resnet18"):
        TimmTower("resnet1O")


def test_unknown_open_clip_name_is_a_clear_error():
    with pytest.raises(ValueError, match="open_clip has no model named 'ViT-B-3'"):
        OpenClipTower("image", "ViT-B-3")


def test_timm_pretrained_path_loads_a_local_file(tmp_path):
    source = TimmTower("resnet10t", img_size=32)
    torch.save(source.model.state_dict(), tmp_path / "w.pt")
    loaded = TimmTower("resnet10t", img_size=32, pretrained_path=str(tmp_path / "w.pt"))
    fresh = TimmTower("resnet10t", img_size=32)
    x = torch.randn(2, 3, 32, 32)
    source.eval(), loaded.eval(), fresh.eval()
    assert torch.equal(source(x), loaded(x))
    assert not torch.allclose(source(x), fresh(x))


def test_open_clip_tower_from_json_config(tmp_path):
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    } | TINY_TEXT
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    image, text = OpenClipTower("image", str(path)), OpenClipTower("text", str(path))
    tokens = text.preprocess(False)("a photo of a seven")
    assert tokens.shape == (12,) and tokens.dtype == torch.long
    assert text(tokens[None]).shape == (1, 32)
    assert image(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_model_encodes_normalised_features():
    model = build_model(
        {
            "embed_dim": 16,
            "towers": {
                "image": {
                    "_target_": "mmpretrain.towers.timm.TimmTower",
                    "model_name": "resnet10t",
                    "img_size": 32,
                },
                "text": {
                    "_target_": "mmpretrain.towers.open_clip.OpenClipTower",
                    "modality": "text",
                    "config": TINY_TEXT,
                },
            },
        }
    )
    out = model({"image": torch.randn(3, 3, 32, 32), "text": torch.randint(0, 100, (3, 12))})
    assert out["image_features"].shape == (3, 16) and out["text_features"].shape == (3, 16)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.isclose(out["logit_scale"], torch.tensor(1 / 0.07))


# -- images travel as uint8; the tower normalises on the device ------------------------------------
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
}


def photo(seed=0, size=(45, 38)):
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(
        torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
    )


def library_transform(tower, train):
    """Today's float transform of the tower's library (ToTensor + Normalize included)."""
    import open_clip
    from timm.data import create_transform

    from mmpretrain.towers.open_clip import preprocess_cfg

    if isinstance(tower, TimmTower):
        return create_transform(**tower.data_config, is_training=train)
    pp = preprocess_cfg(tower.model_cfg)
    return open_clip.image_transform(
        pp["size"],
        is_train=train,
        mean=pp["mean"],
        std=pp["std"],
        resize_mode=pp["resize_mode"],
        interpolation=pp["interpolation"],
    )


@pytest.mark.parametrize(
    "make",
    [lambda: TimmTower("resnet10t", img_size=32), lambda: OpenClipTower("image", TINY_VIT)],
    ids=["timm", "open_clip"],
)
@pytest.mark.parametrize("train", [False, True])
def test_uint8_images_normalised_in_the_tower_match_the_float_transform(make, train):
    import random

    torch.manual_seed(0)
    tower = make().eval()
    new, old = tower.preprocess(train), library_transform(tower, train)
    images = [photo(i) for i in range(3)]

    def run(transform):  # the same random crop/flip draws for both transforms
        random.seed(1), torch.manual_seed(1)
        return torch.stack([transform(img) for img in images])

    pixels, floats = run(new), run(old)
    assert pixels.dtype == torch.uint8 and floats.dtype == torch.float32 and pixels.shape == floats.shape
    assert pixels.nbytes * 4 == floats.nbytes
    with torch.no_grad():
        assert torch.equal(tower.normalize_input(pixels), floats)
        assert (tower(pixels) - tower(floats)).abs().max() <= 1e-6  # float input: taken as normalised
    assert not any("input_norm" in k for k in tower.state_dict())  # exports and interop unchanged


def test_a_transform_ending_after_normalize_stays_float_and_is_not_normalised_twice():
    tower = TimmTower("resnet10t", img_size=32, transform={"re_prob": 1.0}).eval()
    x = tower.preprocess(train=True)(photo())
    assert x.dtype == torch.float32  # RandomErasing works on normalised floats: kept as timm builds it
    assert torch.equal(tower.normalize_input(x[None]), x[None])
