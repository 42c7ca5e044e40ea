"""Weights by name through huggingface_hub's cache, offline: open_clip hf-hub models and tags, timm
names (pretrained=true, hf-hub:timm/NAME), the audio tower's 1-channel stem, and the message when a
file is missing."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import constants

from mmpretrain.model import build_model
from mmpretrain.pretrained import WeightsUnavailableError, check_available, open_clip_weights
from tests.conftest import compose_config
from tests.hub_cache import TINY_PREPROCESS, add_open_clip, add_timm


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline: only what a test writes there can be found."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )


def test_open_clip_hf_hub_config_brings_both_towers_and_the_logit_scale(hub_cache):
    ref = add_open_clip(hub_cache, "org/tiny-clip")
    cfg = compose_config("train", ["model=openclip", "model.config=hf-hub:org/tiny-clip"])
    check_available(cfg.model)
    model = build_model(cfg.model).eval()
    image, text = model.towers["image"], model.towers["text"]
    assert image.model_cfg["preprocess_cfg"]["mean"] == TINY_PREPROCESS["mean"]  # the repo's preprocess_cfg
    x = _images()
    tokens = torch.stack([text.preprocess(False)(s) for s in ["a cat", "the digit seven", "x"]])
    with torch.no_grad():
        torch.testing.assert_close(image(x), ref.encode_image(image.normalize_input(x)), atol=1e-6, rtol=0)
        torch.testing.assert_close(text(tokens), ref.encode_text(tokens), atol=1e-6, rtol=0)
    assert model.logit_scale_outputs()["logit_scale"].log().item() == pytest.approx(3.25)


def test_open_clip_pretrained_hub_id_and_siglip_bias(hub_cache):
    """model.pretrained=hf-hub:... over a config given inline; a SigLIP model's bias comes along."""
    ref = add_open_clip(hub_cache, "org/tiny-siglip", logit_bias=-7.5)
    cfg = compose_config(
        "train",
        [
            "model=openclip",
            "model.config=hf-hub:org/tiny-siglip",
            "loss=siglip",
            "model.pretrained=hf-hub:org/tiny-siglip",
        ],
    )
    model = build_model(cfg.model)
    assert model.logit_bias.item() == pytest.approx(-7.5)
    torch.testing.assert_close(model.towers["image"].visual.conv1.weight, ref.visual.conv1.weight)


def test_registry_tag_names_open_clips_repo_and_fails_offline_with_both_ways_out(hub_cache):
    cfg = compose_config(
        "train", ["model=openclip", "model.config=ViT-B-32", "model.pretrained=laion2b_s34b_b79k"]
    )
    with pytest.raises(WeightsUnavailableError) as err:
        check_available(cfg.model)
    message = str(err.value)
    for part in (
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        "open_clip_pytorch_model.bin",
        "huggingface-cli download",
        "pretrained_path=",
    ):
        assert part in message
    assert err.value.__cause__ is None and err.value.__context__ is None  # no huggingface_hub traceback


def test_registry_tag_resolves_to_the_cached_file_open_clip_names(hub_cache):
    # open_clip's registry: laion2b_s34b_b79k -> hf_hub 'laion/CLIP-ViT-B-32-laion2B-s34B-b79K/' (default
    # file)
    add_open_clip(hub_cache, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    path, _ = open_clip_weights("ViT-B-32", "laion2b_s34b_b79k")
    assert path.endswith("open_clip_model.safetensors") and str(hub_cache) in path


def test_unknown_tag_lists_the_models_tags(hub_cache):
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):
        open_clip_weights("ViT-B-32", "no_such_tag")


def test_timm_pretrained_true_loads_timms_default_weights(hub_cache):
    # timm's default pretrained cfg for resnet10t names hf_hub_id timm/resnet10t.c3_in1k
    ref = add_timm(hub_cache, "timm/resnet10t.c3_in1k")
    ref.reset_classifier(0)
    cfg = compose_config(
        "train",
        [
            "model.towers.image.model_name=resnet10t",
            "model.towers.image.pretrained=true",
            "model.towers.image.img_size=32",
        ],
    )
    tower = build_model(cfg.model).towers["image"].eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(tower(x), ref(tower.normalize_input(x)), atol=1e-6, rtol=0)


def test_timm_hf_hub_name_loads_that_repo(hub_cache):
    ref = add_timm(hub_cache, "someone/tiny-resnet", seed=3)
    ref.reset_classifier(0)
    cfg = compose_config(
        "train",
        ["model.towers.image.model_name=hf-hub:someone/tiny-resnet", "model.towers.image.img_size=32"],
    )
    tower = build_model(cfg.model).towers["image"].eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(tower(x), ref(tower.normalize_input(x)), atol=1e-6, rtol=0)


def test_timm_hf_hub_tower_rebuilt_from_its_config_does_not_fetch_weights_again(hub_cache):
    """An exported tower's config names the hub model but not its weights (they are in the export)."""
    from mmpretrain.config import safe_instantiate

    add_timm(hub_cache, "someone/tiny-resnet")
    cfg = compose_config("train", ["model.towers.image.model_name=hf-hub:someone/tiny-resnet"])
    tower = build_model(cfg.model).towers
    config = tower["image"].config
    assert config["pretrained"] is False
    next((hub_cache / "models--someone--tiny-resnet" / "snapshots").glob("*/model.safetensors")).unlink()
    safe_instantiate(config, allowed=("mmpretrain.towers.",))  # config.json only: no weights needed


def test_audio_tower_pretrained_sums_the_first_conv_to_one_channel(hub_cache):
    from mmpretrain.towers.audio import AudioTower

    ref = add_timm(hub_cache, "timm/resnet10t.c3_in1k")
    tower = AudioTower("resnet10t", pretrained=True)
    stem = ref.conv1[0].weight
    torch.testing.assert_close(tower.model.conv1[0].weight, stem.sum(dim=1, keepdim=True))


def test_timm_weights_missing_offline(hub_cache):
    cfg = compose_config(
        "train", ["model.towers.image.model_name=resnet10t", "model.towers.image.pretrained=true"]
    )
    with pytest.raises(WeightsUnavailableError, match=r"timm/resnet10t\.c3_in1k.*model\.safetensors"):
        check_available(cfg.model)
