"""bf16-mixed clips gradients with torch's fused AdamW (Lightning refuses that combination itself)."""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from mmpretrain.commands.train import train
from tests.conftest import TINY_RUN, compose_config


def test_bf16_mixed_clips_the_gradients_of_the_fused_optimizer(digits_root, tmp_path):
    norms, fused = [], []  # read after the step (Lightning computes the gradients inside it, in the closure)

    def after_step(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        )
        fused.append(bool(optimizer.defaults.get("fused")))

    cfg = compose_config(
        "train",
        [
            *TINY_RUN,
            f"data.root={digits_root}",
            "trainer.max_steps=3",
            "trainer.precision=bf16-mixed",
            "trainer.gradient_clip_val=0.01",
            "trainer.limit_val_batches=0",
            "export_at_end=false",
            "callbacks.plots=null",
        ],
        run_dir=tmp_path,
    )
    handle = register_optimizer_step_post_hook(after_step)
    try:
        metrics = train(cfg)
    finally:
        handle.remove()
    assert len(norms) == 3 and all(fused)
    assert max(norms) <= 0.01 * 1.001, norms  # the unclipped norm of a fresh model is ~1-10
    assert metrics["train/loss"] > 0
