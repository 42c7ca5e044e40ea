import pytest
import torch
from torch import nn

from mmpretrain.training.optim import build_optimizer, can_fuse

CFG = {"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-6}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _train(model, cfg, steps=5):
    opt = build_optimizer(model, cfg)
    torch.manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(32, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def test_fused_adamw_is_chosen_on_cpu_and_matches_the_per_tensor_update():
    fused_model, plain_model = _model(), _model()
    fused = _train(fused_model, CFG)  # fused: auto
    plain = _train(plain_model, CFG | {"fused": False})
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Weight decay still only on >=2-D weights: the LayerNorm weight moved by Adam alone.
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]


def test_fused_auto_only_for_float_tensors_on_cpu_or_cuda():
    assert can_fuse([torch.zeros(2), torch.zeros(3, dtype=torch.bfloat16)])
    assert not can_fuse([torch.zeros(2), torch.zeros(2, device="meta")])
    assert not can_fuse([torch.zeros(2, dtype=torch.int64)])
    assert not can_fuse([])


def test_warmup_steps_takes_a_fraction_of_the_run_or_a_step_count():
    from mmpretrain.training.optim import warmup_steps

    assert warmup_steps(0.05, 400) == 20
    assert warmup_steps(30, 400) == 30
    assert warmup_steps(None, 400) == 0
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_steps(-1, 400)


def test_the_default_fractional_warmup_reaches_the_pretraining_schedule():
    """optim.warmup_steps=0.05 (the default) was truncated to 0 steps: every run started at full lr."""
    from types import SimpleNamespace

    from mmpretrain.losses import InfoNCE
    from mmpretrain.training.module import ContrastiveModule
    from tests.unit.test_gradcache import make_model

    module = ContrastiveModule(
        make_model(), InfoNCE(), {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 0.05}
    )
    module.__dict__["_trainer_stub"] = SimpleNamespace(estimated_stepping_batches=400, gradient_clip_val=None)
    type(module).trainer = property(lambda self: self.__dict__["_trainer_stub"])
    try:
        scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    finally:
        del type(module).trainer
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 / 20)
