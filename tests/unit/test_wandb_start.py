"""Our WandbLogger starts an offline run in the background at Lightning's first call (log_hyperparams)
and every later use of the run waits for it; an online run and a failed start behave as before."""

import os
import threading
import time

import pytest

from mmpretrain.monitor import WandbLogger


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def test_an_offline_run_starts_in_a_thread_and_is_waited_for_at_first_use(tmp_path):
    import wandb  # noqa: F401  imported already, as the training command has by then

    logger = WandbLogger(save_dir=str(tmp_path), project="p", mode="offline")
    started = time.perf_counter()
    _ = logger.experiment  # Lightning's touch at setup: a stand-in, the run starts in a thread
    logger.log_hyperparams({"optim": {"lr": 0.001}})  # queued behind the start
    returned = time.perf_counter() - started
    assert logger._starting is not None and any(t.name == "wandb-start" for t in threading.enumerate())
    logger.log_metrics({"train/loss": 1.5}, step=1)  # waits for the run
    run = logger.experiment
    assert logger._starting is None and run is not None
    assert run.config["optim"] == {"lr": 0.001}
    assert returned < 0.3, f"log_hyperparams blocked for {returned:.2f} s"
    logger.finalize("success")
    assert logger._experiment is None
    assert any(d.name.startswith("offline-run-") for d in (tmp_path / "wandb").iterdir())


def test_a_run_still_starting_when_training_ends_is_waited_for_and_finished(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), project="p", mode="offline")
    _ = logger.experiment
    logger.log_hyperparams({"a": 1})
    logger.finalize("success")  # right away: the start is joined, then the run finished
    assert logger._starting is None and logger._experiment is None
    assert not any(t.name == "wandb-start" for t in threading.enumerate())


def test_a_failed_background_start_raises_at_first_use(tmp_path, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise RuntimeError("wandb could not start")

    monkeypatch.setattr(wandb, "init", refuse)
    logger = WandbLogger(save_dir=str(tmp_path), project="p", mode="offline")
    _ = logger.experiment
    logger.log_hyperparams({"a": 1})  # returns: the error is the thread's
    with pytest.raises(RuntimeError, match="could not start"):
        logger.log_metrics({"train/loss": 1.0}, step=1)


def test_an_online_run_is_not_started_in_the_background(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), project="p", mode="online")
    assert not logger.start_in_background
    os.environ.pop("WANDB_MODE", None)
