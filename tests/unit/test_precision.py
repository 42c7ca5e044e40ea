"""bf16-mixed clips gradients with torch's fused AdamW (Lightning refuses that combination itself);
``trainer.precision=auto`` and ``attention_kernel`` pick what the CPU computes fastest."""

from __future__ import annotations

import pytest
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


# -- trainer.precision=auto and attention_kernel (runtime.kernels) ------------------------------------
# A ViT + text transformer small enough for a unit test: 17 image tokens, 24 text tokens.
TINY_VIT = [
    "model=openclip",
    "model.config={embed_dim: 32, vision_cfg: {image_size: 32, layers: 1, width: 32, head_width: 16,"
    " patch_size: 8}, text_cfg: {context_length: 24, vocab_size: 49408, width: 32, heads: 2, layers: 1}}",
]


def backward_ops(loss: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``loss`` (the kernels its backward will run)."""
    names, stack, visited = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def train_recording(digits_root, tmp_path, monkeypatch, *overrides):
    """Train 2 steps of the tiny ViT; the backward ops of each step's loss, as the module saw them."""
    from mmpretrain.training.module import ContrastiveModule

    seen = []
    monkeypatch.setattr(
        ContrastiveModule,
        "on_before_backward",
        lambda self, loss: seen.append(backward_ops(loss)),
        raising=False,
    )
    cfg = compose_config(
        "train",
        [
            *TINY_RUN[:6],
            *TINY_VIT,
            f"data.root={digits_root}",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=0",
            "export_at_end=false",
            "callbacks.plots=null",
            *overrides,
        ],
        run_dir=tmp_path,
    )
    train(cfg)
    assert len(seen) == 2
    return set().union(*seen)


def test_auto_precision_under_cpu_bf16_trains_short_attention_with_the_math_kernel(
    digits_root, tmp_path, monkeypatch, capsys
):
    """torch's flash kernel under CPU bf16 has a slow backward for short sequences (README, "Precision and
    kernels"): trainer.precision=auto on a bf16 CPU trains in bf16-mixed, its attention by the math kernel
    (softmax(q k^T) v), and says so; attention_kernel=torch keeps torch's flash kernel."""
    monkeypatch.setattr("mmpretrain.runtime.kernels.cpu_has_bf16", lambda: True)
    ops = train_recording(digits_root, tmp_path / "auto", monkeypatch, "trainer.precision=auto")
    said = capsys.readouterr().out
    assert "trainer.precision=auto: bf16-mixed; attention in training: math" in said
    assert not any("Flash" in op for op in ops), " ".join(sorted(ops))
    assert "BmmBackward0" in ops and {"SoftmaxBackward0", "SafeSoftmaxBackward0"} & ops, " ".join(sorted(ops))
    assert any("Bf16" in op or "ToCopyBackward0" in op for op in ops)  # autocast did cast

    ops = train_recording(
        digits_root, tmp_path / "torch", monkeypatch, "trainer.precision=auto", "attention_kernel=torch"
    )
    assert any("FlashAttention" in op for op in ops), " ".join(sorted(ops))


def test_auto_precision_without_cpu_bf16_stays_fp32_with_torchs_attention(
    digits_root, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr("mmpretrain.runtime.kernels.cpu_has_bf16", lambda: False)
    ops = train_recording(digits_root, tmp_path, monkeypatch, "trainer.precision=auto")
    said = capsys.readouterr().out
    assert "trainer.precision=auto: 32-true" in said and "attention in training" not in said
    assert "ToCopyBackward0" not in ops
    assert any("FlashAttention" in op for op in ops), " ".join(sorted(ops))


def test_attention_kernel_choices():
    from torch import nn
    from torch.nn.attention import SDPBackend

    from mmpretrain.runtime.kernels import attention_backends, longest_attention, resolve_precision

    class Table(nn.Module):
        def __init__(self, tokens, name="positional_embedding"):
            super().__init__()
            self.register_parameter(name, nn.Parameter(torch.zeros(1, tokens, 8)))

    short, long_ = [Table(65), Table(32, "pos_embed")], [Table(65), Table(197, "pos_embed")]
    assert longest_attention(short) == 65 and longest_attention(long_) == 197
    assert longest_attention([Table(65), nn.Linear(2, 2)]) is None  # a tower whose length is unknown
    assert attention_backends("auto", "bf16-mixed", False, short) == [SDPBackend.MATH]
    assert attention_backends("auto", "bf16-mixed", False, long_) is None  # flash wins from ~200 tokens
    assert attention_backends("auto", "32-true", False, short) is None
    assert attention_backends("auto", "bf16-mixed", True, short) is None  # a GPU: torch's choice
    assert attention_backends("math", "32-true", True, long_) == [SDPBackend.MATH]
    assert attention_backends("flash", "32-true", False, short) == [SDPBackend.FLASH_ATTENTION]
    assert attention_backends("torch", "bf16-mixed", False, short) is None
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        attention_backends("fast", "bf16-mixed", False, short)
    assert resolve_precision({"precision": "16-mixed"}) == {"precision": "16-mixed"}
