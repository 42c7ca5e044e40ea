"""One loader for every open_clip checkpoint layout: towers' ``pretrained_path`` reads CLIP-layout
files (OpenAI, LAION, open_clip's trainer) as well as CustomTextCLIP ones, and a SigLIP model (logit
bias) goes out to open_clip's ``local-dir:`` format and back with the same logits."""

import json

import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mmpretrain.commands.export import export_cmd
from mmpretrain.export import model_from_checkpoint
from mmpretrain.interop.open_clip import open_clip_model_config
from mmpretrain.model import build_model
from tests.conftest import compose_config
from tests.integration.test_export_interop import CAPTIONS, OC_CFG, _images, _open_clip_trainer_checkpoint


def _write_clip_layout(tmp_path, kind: str):
    """An open_clip ``CLIP`` (text tower at the top level: token_embedding, transformer.*, ...) saved
    as LAION's hub file (plain state dict), open_clip's trainer does (module. prefixes) or safetensors."""
    if kind == "trainer":
        return _open_clip_trainer_checkpoint(tmp_path / "epoch_3.pt", seed=4), tmp_path / "epoch_3.pt"
    torch.manual_seed(4)
    oc = open_clip.CLIP(**OC_CFG).eval()
    assert "token_embedding.weight" in oc.state_dict() and not any(
        k.startswith("text.") for k in oc.state_dict()
    )
    if kind == "laion_bin":
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(oc.state_dict(), path)
    else:
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    return oc, path


@pytest.mark.parametrize("kind", ["laion_bin", "trainer", "safetensors"])
def test_towers_load_a_clip_layout_checkpoint_through_pretrained_path(tmp_path, kind):
    oc, path = _write_clip_layout(tmp_path, kind)
    (tmp_path / "cfg.json").write_text(json.dumps(OC_CFG))
    cfg = compose_config(
        "train",
        [
            "model=openclip",
            f"model.config={tmp_path}/cfg.json",
            f"model.towers.text.pretrained_path={path}",
            f"model.towers.image.pretrained_path={path}",
        ],
    )
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True)).eval()
    prep = model.preprocess(train=False)
    tokens = torch.stack([prep["text"](c) for c in CAPTIONS])
    pixels = torch.stack([prep["image"](im) for im in _images()])  # uint8: the tower normalises
    text, image = model.towers["text"], model.towers["image"]
    with torch.no_grad():
        torch.testing.assert_close(text(tokens), oc.encode_text(tokens), atol=1e-6, rtol=0)
        torch.testing.assert_close(
            image(pixels), oc.encode_image(image.normalize_input(pixels)), atol=1e-6, rtol=0
        )
        # and through the model: normalised, same as open_clip's normalize=True
        torch.testing.assert_close(
            model.encode_text(tokens), oc.encode_text(tokens, normalize=True), atol=1e-6, rtol=0
        )


def test_tower_pretrained_path_without_open_clip_tensors_says_so(tmp_path):
    from mmpretrain.towers.open_clip import OpenClipTower

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="holds no open_clip tensors"):
        OpenClipTower("text", OC_CFG, pretrained_path=str(tmp_path / "other.pt"))


def _siglip_checkpoint(tmp_path):
    """A Lightning-style mmpretrain checkpoint of model=openclip trained with loss=siglip."""
    (tmp_path / "cfg.json").write_text(json.dumps(OC_CFG))
    cfg = compose_config("train", ["model=openclip", f"model.config={tmp_path}/cfg.json", "loss=siglip"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(5)
    model = build_model(model_cfg).eval()
    with torch.no_grad():  # away from the inits, so that a value lost on the way shows
        model.logit_scales["shared"].fill_(2.75)
        model.logit_bias.fill_(-6.5)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": model_cfg}}, tmp_path / "last.ckpt")
    return model


def _logits(img, txt, scale, bias):
    return scale.exp() * img @ txt.T + bias


def test_siglip_model_round_trips_through_open_clip_local_dir(tmp_path):
    ours = _siglip_checkpoint(tmp_path)
    out = export_cmd(
        compose_config("export", [f"ckpt={tmp_path}/last.ckpt", f"out={tmp_path}/oc", "format=open_clip"])
    )
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["init_logit_bias"] == -6.5
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    theirs.eval()
    assert theirs.logit_bias is not None
    prep = ours.preprocess(train=False)
    with torch.no_grad():
        expected = _logits(
            ours.encode_image(torch.stack([prep["image"](im) for im in _images()])),
            ours.encode_text(torch.stack([prep["text"](c) for c in CAPTIONS])),
            ours.logit_scales["shared"],
            ours.logit_bias,
        )
        img = theirs.encode_image(torch.stack([preprocess(im) for im in _images()]), normalize=True)
        txt = theirs.encode_text(tokenizer(CAPTIONS), normalize=True)
        got = _logits(img, txt, theirs.logit_scale, theirs.logit_bias)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # open_clip's own forward agrees on scale and bias
        assert theirs.logit_scale.item() == pytest.approx(2.75) and theirs.logit_bias.item() == pytest.approx(
            -6.5
        )
    # ... and back in: the directory is an eval ckpt= / finetune pretrained= source with its bias
    back = model_from_checkpoint(out)
    assert back.logit_bias is not None and back.logit_bias.item() == pytest.approx(-6.5)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_open_clip_checkpoint_with_logit_bias_builds_a_model_with_one(tmp_path):
    torch.manual_seed(6)
    oc = open_clip.CLIP(**OC_CFG, init_logit_bias=-3.25)  # a SigLIP in the CLIP layout
    torch.save({"state_dict": {f"module.{k}": v for k, v in oc.state_dict().items()}}, tmp_path / "siglip.pt")
    model = model_from_checkpoint(tmp_path / "siglip.pt", open_clip_model_config(OC_CFG))
    assert model.logit_bias.item() == pytest.approx(-3.25)
