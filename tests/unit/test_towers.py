import json

import pytest
import torch
from PIL import Image

from mmpretrain.model import build_model
from mmpretrain.towers.open_clip import OpenClipTower
from mmpretrain.towers.timm import TimmTower

TINY_TEXT = {"embed_dim": 32, "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


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
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}} | TINY_TEXT
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
                "image": {"_target_": "mmpretrain.towers.timm.TimmTower", "model_name": "resnet10t", "img_size": 32},
                "text": {"_target_": "mmpretrain.towers.open_clip.OpenClipTower", "modality": "text", "config": TINY_TEXT},
            },
        }
    )
    out = model({"image": torch.randn(3, 3, 32, 32), "text": torch.randint(0, 100, (3, 12))})
    assert out["image_features"].shape == (3, 16) and out["text_features"].shape == (3, 16)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.isclose(out["logit_scale"], torch.tensor(1 / 0.07))
