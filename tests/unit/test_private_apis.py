"""Every private API of a library that mmpretrain still uses, and why no public one serves (the code
says it where it uses each): these fail loudly, naming the API, when the library changes it."""

from __future__ import annotations

import inspect

import lightning.pytorch.loops.training_epoch_loop as epoch_loop
import open_clip.model
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from open_clip.transformer import TextTransformer, VisionTransformer


def test_hydra_run_hydra_takes_the_arguments_the_cli_passes():
    from hydra._internal.utils import _run_hydra, get_args_parser

    assert {"args", "args_parser", "task_function", "config_path", "config_name"} <= set(
        inspect.signature(_run_hydra).parameters
    )
    args = get_args_parser().parse_args(["-m", "a=1", "--cfg", "job"])
    assert args.multirun and args.overrides == ["a=1"] and args.cfg == "job"


def test_lightning_sigterm_broadcast_that_preemption_skips_is_a_method_of_the_epoch_loop():
    assert callable(getattr(epoch_loop._TrainingEpochLoop, "_broadcast_sigterm_tensor", None))


def test_lightning_logger_internals_our_loggers_extend():
    assert callable(getattr(ExperimentWriter, "_check_log_dir_exists", None))
    assert "_check_log_dir_exists()" in inspect.getsource(ExperimentWriter.__mro__[1].__init__)
    assert "_wandb_init" in inspect.getsource(WandbLogger.__init__)


def test_open_clip_tower_builders_and_the_steps_our_towers_call():
    for fn in (open_clip.model._build_vision_tower, open_clip.model._build_text_tower):
        assert list(inspect.signature(fn).parameters)[:4] == [
            "embed_dim",
            f"{fn.__name__.split('_')[2]}_cfg",
            "quick_gelu",
            "cast_dtype",
        ]
    assert callable(getattr(TextTransformer, "_embeds", None)) and callable(
        getattr(VisionTransformer, "_pool", None)
    )


def test_open_clip_coca_decoder_builder_and_the_block_internals_our_cached_step_reads():
    """towers/decoder.py builds open_clip's CoCa text decoder with its private builder (no public one
    builds the decoder alone) and steps open_clip's ResidualAttentionBlock itself with a KV cache."""
    import open_clip.coca_model
    from open_clip.transformer import MultimodalTransformer, ResidualAttentionBlock

    assert list(inspect.signature(open_clip.coca_model._build_text_decoder_tower).parameters)[:3] == [
        "embed_dim",
        "multimodal_cfg",
        "quick_gelu",
    ]
    dec = MultimodalTransformer(width=8, layers=1, heads=2, context_length=4, output_dim=5)
    assert isinstance(dec.resblocks[0], ResidualAttentionBlock) and isinstance(
        dec.cross_attn[0], ResidualAttentionBlock
    )
    for block in (dec.resblocks[0], dec.cross_attn[0]):
        for name in ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"):
            assert hasattr(block, name), name
        assert block.attn.batch_first and block.attn._qkv_same_embed_dim
    assert hasattr(dec.cross_attn[0], "ln_1_kv") and dec.text_projection.shape == (8, 5)


def test_timm_model_ema_v3_internals_the_sharded_ema_calls():
    """training/ema.py's ShardedModelEma (trainer=fsdp) hands timm's lerp (``_foreach_lerp_``, with its
    bf16 stochastic rounding) the local shards, since torch's foreach lerp refuses DTensors mixed with
    plain tensors, and remakes its rounding generator (``_sr_generator``) on the device sharding moved the
    module to: on plain tensors it must give timm's own update."""
    import torch
    from timm.utils import ModelEmaV3

    from mmpretrain.training.ema import ShardedModelEma

    assert "self.apply_update_(model, decay)" in inspect.getsource(ModelEmaV3.update)
    assert "self._sr_generator" in inspect.getsource(ModelEmaV3.__init__)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ours, timms = ShardedModelEma(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    ours.on_device()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(5, 4))  # the BatchNorm's running statistics and its integer counter move
    for step in (1, 2, 3):
        ours.update(model, step=step)
        timms.update(model, step=step)
    for (k, a), b in zip(ours.module.state_dict().items(), timms.module.state_dict().values()):
        assert torch.equal(a, b), k
