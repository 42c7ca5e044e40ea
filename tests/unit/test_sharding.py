"""trainer=fsdp without processes: the sharding units every tower offers, the strategy the config
builds, and which checkpoint directories count as complete. (The 2-process runs are in
tests/integration/test_fsdp.py, marked slow.)"""

from __future__ import annotations

import pytest
import torch

from mmpretrain.runs import is_complete_checkpoint, newest_complete_checkpoint
from mmpretrain.towers.audio import AudioTower
from mmpretrain.towers.open_clip import OpenClipTower
from mmpretrain.towers.timm import TimmTower
from tests.conftest import compose_config

OC = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def block_names(tower) -> list[str]:
    names = {id(m): n for n, m in tower.named_modules()}
    return [names[id(b)] for b in tower.blocks()]


@pytest.mark.parametrize(
    "make, expected",
    [
        (
            lambda: TimmTower("test_vit", img_size=16, model_kwargs={"img_size": 16}),
            [f"model.blocks.{i}" for i in range(5)],
        ),
        (lambda: OpenClipTower("image", OC), [f"visual.transformer.resblocks.{i}" for i in range(3)]),
        (lambda: OpenClipTower("text", OC), [f"text.transformer.resblocks.{i}" for i in range(2)]),
        (lambda: AudioTower("resnet10t"), ["model.layer1.0", "model.layer2.0", "model.layer3.0"]),
    ],
)
def test_every_tower_names_its_blocks_and_they_hold_their_groups_parameters(make, expected):
    tower = make()
    assert block_names(tower) == expected
    in_blocks = {id(p) for b in tower.blocks() for p in b.parameters()}
    middle = [p for g in tower.param_groups()[1:-1] for p in g]
    assert middle and all(id(p) in in_blocks for p in middle)  # each block is one lock / layer-decay group


def test_trainer_fsdp_builds_lightnings_fsdp2_strategy_with_the_configured_plan():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from mmpretrain.commands.train import trainer_and_optim as _trainer_and_optim
    from mmpretrain.runtime.fsdp import FSDP2Strategy

    cfg = compose_config(
        "train",
        [
            "trainer=fsdp",
            "trainer.devices=4",
            "trainer.strategy.activation_checkpointing=true",
            "trainer.strategy.mixed_precision={param_dtype: bfloat16, reduce_dtype: float32}",
        ],
    )
    trainer, _ = _trainer_and_optim(cfg)
    strategy = trainer["strategy"]
    assert isinstance(strategy, FSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
    assert strategy.activation_checkpointing and strategy.mixed_precision == {
        "param_dtype": "bfloat16",
        "reduce_dtype": "float32",
    }
    assert trainer["devices"] == 4 and trainer["use_distributed_sampler"] is False
    multi = compose_config("train", ["trainer=fsdp_multinode"])
    assert multi.trainer.num_nodes == 2 and multi.trainer.strategy._target_.endswith("FSDP2Strategy")


def test_only_a_published_sharded_directory_is_a_checkpoint_to_resume(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    old = ckpts / "step0000003.ckpt"
    old.mkdir()
    for name in (".metadata", "meta.pt", "__0_0.distcp"):
        (old / name).write_bytes(b"x")
    half = ckpts / "step0000006.ckpt"  # a rank died before the metadata was written
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"x")
    tmp = ckpts / ".step0000009.ckpt.tmp"  # being written
    tmp.mkdir()
    for name in (".metadata", "meta.pt"):
        (tmp / name).write_bytes(b"x")
    assert is_complete_checkpoint(old) and not is_complete_checkpoint(half)
    assert newest_complete_checkpoint(ckpts) == old


def test_clipping_across_shards_equals_torchs_clip_in_one_process():
    from mmpretrain.runtime.distributed import clip_grad_norm_

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(3)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, c in zip(params, copies):
        p.grad = torch.randn(p.shape, generator=g)
        c.grad = p.grad.clone()
    ours = clip_grad_norm_(params, 0.5)
    theirs = torch.nn.utils.clip_grad_norm_(copies, 0.5)
    assert torch.allclose(ours, theirs)
    for p, c in zip(params, copies):
        assert torch.allclose(p.grad, c.grad, atol=1e-7)
