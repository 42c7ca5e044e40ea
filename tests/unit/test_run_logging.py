"""Logging and sweep configs compose; StepStats measures the data-wait fraction and temperature
over the steps since the last log and hands them to the step log at the steps that log."""

import math
import os
import time
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from mmpretrain.cli import CONF_DIR
from mmpretrain.training.monitor import StepStats
from mmpretrain.training.steplog import StepLog
from tests.conftest import compose_config


def test_wandb_is_offline_by_default_and_online_with_one_override(tmp_path):
    assert compose_config("train", [], run_dir=tmp_path).logger.wandb.mode == "offline"
    assert (
        compose_config("train", ["logger.wandb.mode=online"], run_dir=tmp_path).logger.wandb.mode == "online"
    )
    callbacks = compose_config("train", [], run_dir=tmp_path).callbacks
    assert callbacks.step_stats._target_ == "mmpretrain.training.monitor.StepStats"
    assert callbacks.plots._target_ == "mmpretrain.training.monitor.RunPlots"


def _hydra_cfg(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides, return_hydra_config=True)


def test_optuna_search_config_states_trials_space_and_storage_in_the_sweep_dir():
    cfg = _hydra_cfg(["hparams_search=digits_optuna", "hydra.sweep.dir=/sweeps/s1"])
    sweeper = cfg.hydra.sweeper
    assert get_class(sweeper._target_).__name__ == "OptunaSweeper"
    assert sweeper.direction == "maximize" and sweeper.n_trials >= 4
    assert sweeper.storage == "sqlite:////sweeps/s1/optuna.sqlite"
    assert set(sweeper.params) >= {"optim.lr", "model.embed_dim"}
    assert cfg.optimized_metric == "val/zeroshot_top1/image_text"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


def test_slurm_launcher_config_composes():
    cfg = _hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.sweep.dir=/sweeps/s2"])
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.submitit_folder == "/sweeps/s2/.submitit/%j"
    OmegaConf.to_container(launcher, resolve=True)


class _Module:
    def __init__(self):
        self.steplog = StepLog()
        self.model = SimpleNamespace(logit_scales={"shared": torch.tensor(math.log(20.0))})


def _step(stats, module, i, compute, wait, due):
    """One training step as the loop runs it: batch start, (due: set by the module's training step),
    the optimizer step's hook, batch end, then the wait for the next batch."""
    stats.on_train_batch_start(None, module, {}, i)
    module.steplog.due = due
    time.sleep(compute)
    stats.on_before_optimizer_step(None, module, None)
    stats.on_train_batch_end(None, module, None, {}, i)
    time.sleep(wait)


def test_step_stats_data_wait_fraction_over_the_steps_since_the_last_log_and_temperature():
    stats, module = StepStats(), _Module()
    _step(stats, module, 0, 0.03, 0.03, due=False)
    _step(stats, module, 1, 0.03, 0.01, due=False)
    assert module.steplog.flush(torch.device("cpu")) == {}  # nothing handed over at steps that do not log
    _step(stats, module, 2, 0.03, 0.0, due=True)
    logged = module.steplog.flush(torch.device("cpu"))
    # the intervals before steps 1 and 2: waits 0.03 + 0.01 of 0.06 + 0.04 start-to-start
    assert logged["train/data_wait_frac"] == pytest.approx(0.04 / 0.10, abs=0.08)
    assert logged["train/temperature/shared"] == pytest.approx(0.05)
    stats.on_validation_start(None, module)  # the interval spanning validation is not counted
    _step(stats, module, 3, 0.01, 0.0, due=True)
    assert "train/data_wait_frac" not in module.steplog.flush(torch.device("cpu"))


def _csv_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("resuming", [False, True])
def test_csv_logger_keeps_the_history_only_when_the_run_resumes(tmp_path, resuming, recwarn):
    from mmpretrain.training.monitor import CSVLogger

    (tmp_path / "config.yaml").write_text("a: 1\n")  # the run directory is never empty
    first = CSVLogger(save_dir=str(tmp_path), name="", version="")
    first.log_metrics({"train/loss": 2.0}, step=1)
    first.save()
    again = CSVLogger(save_dir=str(tmp_path), name="", version="")
    again.resuming = resuming
    again.log_metrics({"train/loss": 1.0, "val/top1": 0.5}, step=2)
    again.save()
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == (["1", "2"] if resuming else ["2"])
    assert rows[-1]["val/top1"] == "0.5"
    assert not [w for w in recwarn if "will be deleted" in str(w.message)]


def test_validation_before_training_stays_in_the_same_wandb_run(digits_root, tmp_path):
    """trainer.val_at_start runs trainer.validate before fit; its end used to finish the wandb run,
    so the training went to a second one."""
    from mmpretrain.commands.train import train
    from tests.conftest import TINY_RUN

    run = tmp_path / "run"
    cfg = compose_config(
        "train",
        [
            *TINY_RUN,
            "logger=default",
            f"data.root={digits_root}",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
            "trainer.val_at_start=true",
            "export_at_end=false",
            "callbacks.plots=null",
        ],
        run_dir=run,
    )
    train(cfg)
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs


def test_an_offline_wandb_logger_is_offline_process_wide_and_sets_no_anonymous(tmp_path, monkeypatch):
    """wandb's process-wide settings decide whether its telemetry exporters start: an offline run
    must not start them (they send usage data, and without a network held the exit ~2.5 s)."""
    import wandb

    from mmpretrain.training.monitor import WandbLogger

    seen = {}
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(wandb, "run", None)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # restored after the test: the logger sets it
    logger = WandbLogger(save_dir=str(tmp_path), project="p", mode="offline")
    assert os.environ["WANDB_MODE"] == "offline"
    _ = logger.experiment
    assert seen["mode"] == "offline" and "anonymous" not in seen  # wandb warns about the unset setting
