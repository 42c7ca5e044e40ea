"""optim.grad_cache_chunks in the Lightning module: the optimiser sees the full batch's gradient."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmpretrain.losses import InfoNCE
from tests.unit.test_gradcache import batch, make_model


class CaptureGrads(L.Callback):
    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {
                n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None
            }


def first_step_grads(chunks, precision="32-true", clip=None, plugins=(), capture=None):
    """The first step's gradients (``capture``: at on_before_optimizer_step by default) and the module."""
    from mmpretrain.training.module import ContrastiveModule

    model = make_model()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # deterministic, so the reference is one forward of the whole batch
    optim = {
        "lr": 1e-3,
        "weight_decay": 0.1,
        "grad_cache_chunks": chunks,
        "gradient_clip_val": clip,
        "fused": False,
    }
    module = ContrastiveModule(model, InfoNCE(), optim)
    capture = capture or CaptureGrads()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        precision=None if plugins else precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[capture],
        limit_val_batches=0,
        plugins=list(plugins),
    )
    data = [batch(12)]
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    return capture.grads, module


def test_module_grad_cache_step_gives_the_full_batch_gradient():
    plain, _ = first_step_grads(1)
    cached, module = first_step_grads(3)
    assert not module.automatic_optimization
    assert set(plain) == set(cached)
    for name, g in plain.items():
        assert torch.allclose(cached[name], g, atol=1e-5), name


def test_accumulate_grad_batches_with_contrastive_loss_is_refused(tmp_path):
    from mmpretrain.commands.train import trainer_and_optim as _trainer_and_optim
    from tests.conftest import compose_config

    with pytest.raises(ValueError, match="grad_cache_chunks"):
        _trainer_and_optim(compose_config("train", ["trainer.accumulate_grad_batches=4"]))
    trainer, optim = _trainer_and_optim(compose_config("train", ["optim.grad_cache_chunks=4"]))
    assert "gradient_clip_val" not in trainer and optim["gradient_clip_val"] == 1.0


def test_bf16_mixed_precision_gives_the_fp32_gradient_to_bf16_accuracy():
    fp32, _ = first_step_grads(1)
    bf16, _ = first_step_grads(1, "bf16-mixed")
    bf16_cached, _ = first_step_grads(3, "bf16-mixed")
    for name, g in fp32.items():
        assert bf16[name].dtype == torch.float32  # master weights stay fp32
        assert not torch.equal(bf16[name], g) or g.abs().max() == 0  # autocast really ran in bf16
        for other in (bf16, bf16_cached):
            cos = torch.nn.functional.cosine_similarity(other[name].flatten(), g.flatten(), dim=0)
            assert cos > 0.98, (name, cos)


class CaptureStepGrads(L.Callback):
    """The gradients the optimiser really applied (clipped, unscaled): read in its step post-hook."""

    def __init__(self):
        self.grads = None

    def on_train_start(self, trainer, pl_module):
        def capture(optimizer, args, kwargs):
            if self.grads is None:
                self.grads = {
                    n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None
                }

        trainer.optimizers[0].register_step_post_hook(capture)


def clipped_step_grads(chunks, fp16_scaler):
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugins = []
    if fp16_scaler:  # Lightning gives CPU runs no scaler; CUDA's fp16 path is the same code with one
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))]
    return first_step_grads(chunks, clip=0.05, plugins=plugins, capture=CaptureStepGrads())[0]


def test_fp16_loss_scaling_with_grad_cache_clips_the_unscaled_gradients():
    """16-mixed + grad_cache_chunks>1 + clipping: the gradient the optimiser applies is the fp32 run's,
    clipped to the same norm (it was clipped while still multiplied by the loss scale: 1/256 of it here)."""
    fp32 = clipped_step_grads(3, fp16_scaler=False)
    fp16 = clipped_step_grads(3, fp16_scaler=True)
    norm = lambda grads: torch.cat([g.flatten() for g in grads.values()]).norm()  # noqa: E731
    assert norm(fp32) == pytest.approx(0.05, rel=1e-3)
    assert norm(fp16) == pytest.approx(0.05, rel=2e-2)
    for name, g in fp32.items():
        if g.abs().max() > 0:
            cos = torch.nn.functional.cosine_similarity(fp16[name].flatten(), g.flatten(), dim=0)
            assert cos > 0.95, (name, cos)
