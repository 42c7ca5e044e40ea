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
