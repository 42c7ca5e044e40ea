"""Tower locking (LiT), per-tower learning rates, layer-wise decay; grad checkpointing and
channels_last leave the numbers unchanged."""

import pytest
import torch

from mmpretrain.model import apply_training_options, build_model
from mmpretrain.training.optim import build_optimizer
from tests.conftest import compose_config

SMALL = [
    "model.towers.image.model_name=resnet10t",
    "model.towers.text.config.text_cfg.width=32",
    "model.towers.text.config.text_cfg.heads=2",
    "model.towers.text.config.text_cfg.layers=2",
    "model.towers.text.config.text_cfg.context_length=8",
]


def tiny(overrides=()):
    cfg = compose_config("train", SMALL + list(overrides))
    torch.manual_seed(0)
    return apply_training_options(build_model(cfg.model), cfg.model), cfg


def batch(n=4):
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "text": torch.randint(1, 400, (n, 8), generator=g),
    }


def train_steps(model, cfg, steps=2):
    opt = build_optimizer(model, cfg.optim, cfg.model.towers)
    model.train()
    from mmpretrain.losses import InfoNCE

    for _ in range(steps):
        opt.zero_grad()
        sum(InfoNCE()(model(batch())).values()).backward()
        opt.step()
    return opt


def test_locked_tower_with_frozen_norm_stats_does_not_change():
    model, cfg = tiny(["model.towers.image.lock={unlocked_groups: 0, freeze_norm_stats: true}"])
    before = {k: v.clone() for k, v in model.towers.image.state_dict().items()}  # params and BN buffers
    text_before = [p.clone() for p in model.towers.text.parameters()]
    train_steps(model, cfg)
    for k, v in model.towers.image.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in model.towers.image.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.towers.text.parameters(), text_before))
    assert all(p.requires_grad for p in model.projections.image.parameters())  # the new head trains


def test_unlocked_groups_leave_exactly_the_last_groups_trainable():
    model, _ = tiny(
        ["model.towers.image.lock={unlocked_groups: 2}", "model.towers.text.lock={unlocked_groups: 1}"]
    )
    for tower, n in ((model.towers.image, 2), (model.towers.text, 1)):
        groups = tower.param_groups()
        assert len(groups) > n + 1
        assert [all(p.requires_grad for p in g) for g in groups] == [False] * (len(groups) - n) + [True] * n
    # without freeze_norm_stats, BN layers of the tower keep training mode
    model.train()
    assert model.towers.image.model.conv1[1].training


def test_lock_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unlocked_groups"):
        tiny(["model.towers.image.lock={unlocked: 1}"])


def test_learning_rates_per_tower_and_layer_decay():
    model, cfg = tiny(["model.towers.text.lr_scale=0.1", "optim.layer_decay=0.5", "optim.lr=1.0"])
    opt = build_optimizer(model, cfg.optim, cfg.model.towers)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for tower, scale in ((model.towers.image, 1.0), (model.towers.text, 0.1)):
        groups = tower.param_groups()
        for i, group in enumerate(groups):
            for p in group:
                assert lr_of[id(p)] == pytest.approx(scale * 0.5 ** (len(groups) - 1 - i))
    assert lr_of[id(model.logit_scales["shared"])] == 1.0
    assert all(lr_of[id(p)] == 1.0 for p in model.projections.image.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def grads(model):
    model.zero_grad()
    out = model(batch())
    (out["image_features"].square().sum() + (out["image_features"] @ out["text_features"].T).sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_gives_identical_gradients_for_timm_and_open_clip():
    ref, _ = tiny()
    ckpt, _ = tiny(
        ["model.towers.image.grad_checkpointing=true", "model.towers.text.grad_checkpointing=true"]
    )
    ref.train(), ckpt.train()
    assert (
        ckpt.towers.text.encoder.transformer.grad_checkpointing and ckpt.towers.image.model.grad_checkpointing
    )
    want, got = grads(ref), grads(ckpt)
    assert set(want) == set(got)
    for name, g in want.items():
        assert torch.allclose(got[name], g, atol=1e-5, rtol=1e-4), name


def test_channels_last_gives_the_same_features_and_gradients():
    ref, _ = tiny()
    cl, _ = tiny(["model.towers.image.channels_last=true"])
    assert cl.towers.image.model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    ref.train(), cl.train()
    want, got = grads(ref), grads(cl)
    for name, g in want.items():
        assert torch.allclose(got[name], g, atol=1e-4, rtol=1e-4), name
    with pytest.raises(NotImplementedError, match="channels_last"):
        tiny(["+model.towers.text.channels_last=true"])
