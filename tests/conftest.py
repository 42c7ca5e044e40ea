"""Shared fixtures: the bundled digits shards (built once per session) and config composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, open_dict

from mmpretrain.cli import CONF_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


# A tiny, quiet run of the real configs: one epoch, CSV logger, a 1-layer text tower.
TINY_RUN = [
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "logger=csv",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.towers.text.config.text_cfg.width=32",
    "model.towers.text.config.text_cfg.heads=2",
    "model.towers.text.config.text_cfg.layers=1",
]


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from mmpretrain.data.synthetic.digits import build_digits

    return build_digits(tmp_path_factory.mktemp("digits"), image_size=32)


def compose_config(
    config_name: str = "train", overrides: list[str] | None = None, run_dir: Path | None = None
) -> DictConfig:
    """Compose the real configs as the CLI would, with the run directory made explicit."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    return cfg


def digits_datamodule(digits_root, **extra):
    """The datamodule over the ``digits_root`` fixture's train shards (batches of 8 from 2 workers, 64
    samples an epoch, seed 0, no transforms); ``extra``: more data options."""
    from omegaconf import OmegaConf

    from mmpretrain.training.datamodule import ContrastiveDataModule

    cfg = OmegaConf.create(
        {
            "sources": {"d": {"shards": f"{digits_root}/train/*.tar"}},
            "batch_size": 8,
            "num_workers": 2,
            "train_samples": 64,
            **extra,
        }
    )
    return ContrastiveDataModule(cfg, preprocess=lambda train: {}, seed=0)


def validate_batches(module, batches):
    """``module``'s validation metrics over ``batches``, as one rank's validation epoch computes them."""
    import torch

    with torch.no_grad():
        for i, b in enumerate(batches):
            module.validation_step(b, i)
        cols = module.val.take()
    return module.validation_metrics(cols)
