"""The errors a user hits first: each a paragraph naming the problem and the fix."""

import pytest
import torch

from mmpretrain.commands.train import train
from mmpretrain.export import CheckpointMismatchError, check_checkpoint_matches, load_into
from mmpretrain.losses import InfoNCE, check_modalities
from mmpretrain.model import build_model
from tests.conftest import compose_config

SMALL_TEXT = [
    "model.towers.text.config.text_cfg.width=32",
    "model.towers.text.config.text_cfg.heads=2",
    "model.towers.text.config.text_cfg.layers=1",
]


def test_no_shards_names_the_pattern_and_the_fix(tmp_path):
    from mmpretrain.data import NoShardsError
    from mmpretrain.training.datamodule import ContrastiveDataModule

    cfg = compose_config("train", ["data=shards", f"data.root={tmp_path}/mine"], run_dir=tmp_path / "run")
    with pytest.raises(NoShardsError) as err:
        ContrastiveDataModule(cfg.data, lambda train: {}, seed=0)
    msg = str(err.value)
    assert f"'{tmp_path}/mine/train/*.tar' matches no file" in msg
    assert "mmpretrain data digits out=DIR" in msg and "data.root=DIR" in msg


def test_unknown_tower_names_list_the_closest_known_names():
    from mmpretrain.towers.open_clip import OpenClipTower
    from mmpretrain.towers.timm import TimmTower

    with pytest.raises(ValueError) as err:
        TimmTower("resnet10", img_size=32)
    assert "timm has no model named 'resnet10'. Closest names: resnet10t" in str(err.value)
    assert "model.towers.<modality>.model_name=NAME" in str(err.value)
    with pytest.raises(ValueError) as err:
        OpenClipTower("text", "ViT-B-33")
    msg = str(err.value)
    assert "open_clip has no model named 'ViT-B-33'. Closest names: ViT-B-32" in msg
    assert "open_clip.list_models()" in msg and "model-config JSON" in msg


def test_loss_modality_without_a_tower_fails_before_training(digits_root, tmp_path):
    with pytest.raises(ValueError) as err:
        check_modalities(InfoNCE([["image", "audio"], ["image", "text"]]), ["image", "text"])
    msg = str(err.value)
    assert "no tower of the model encodes [audio]" in msg and "loss.pairs=[[image,text]]" in msg
    cfg = compose_config(
        "train",
        [f"data.root={digits_root}", "logger=csv", "loss.pairs=[[image,audio]]", *SMALL_TEXT],
        run_dir=tmp_path,
    )
    with pytest.raises(ValueError, match=r"encodes \[audio\].*towers: \[image, text\]"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


def _model(embed_dim, image="resnet10t"):
    cfg = compose_config(
        "train", [f"model.embed_dim={embed_dim}", f"model.towers.image.model_name={image}", *SMALL_TEXT]
    )
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    return build_model(model_cfg), model_cfg


def test_checkpoint_from_another_model_config_says_what_differs_and_what_it_was_trained_with(
    digits_root, tmp_path
):
    old, old_cfg = _model(64, "resnet14t")
    ckpt = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in old.state_dict().items()},
            "hyper_parameters": {"model": old_cfg},
        },
        ckpt,
    )
    new, _ = _model(128)
    with pytest.raises(CheckpointMismatchError) as err:
        check_checkpoint_matches(new, ckpt)
    msg = str(err.value)
    n_missing = len(set(new.state_dict()) - set(old.state_dict()))
    n_unexpected = len(set(old.state_dict()) - set(new.state_dict()))
    assert n_missing + n_unexpected > 0
    assert f"{n_missing} tensors of the model are missing from it" in msg
    assert f"{n_unexpected} of its tensors are not in the model" in msg
    o, n = old.state_dict(), new.state_dict()
    n_shapes = sum(o[k].shape != n[k].shape for k in set(o) & set(n))
    assert n_shapes > 0 and f"{n_shapes} have another shape" in msg
    assert "It was trained with model config embed_dim=64, towers {image: TimmTower(resnet14t)" in msg
    assert "use the model config it was trained with" in msg
    # resuming a run with it fails the same way before any training
    cfg = compose_config(
        "train",
        [f"data.root={digits_root}", "logger=csv", f"ckpt_path={ckpt}", *SMALL_TEXT],
        run_dir=tmp_path / "run",
    )
    with pytest.raises(CheckpointMismatchError, match="resnet14t"):
        train(cfg)
    # and a matching state dict loads exactly
    again, _ = _model(64, "resnet14t")
    load_into(again, old.state_dict(), "same")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), old.state_dict().values()))
