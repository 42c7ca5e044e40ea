"""Sweeps from the command line: a 3-run grid and a 4-trial Optuna search on the digits, the
sweep-summary table, per-run wandb groups, metrics.csv scalars and the plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "trainer.max_steps=2",
    "trainer.max_epochs=1",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.towers.text.config.text_cfg.width=32",
    "model.towers.text.config.text_cfg.heads=2",
    "model.towers.text.config.text_cfg.layers=1",
    "export_at_end=false",
    "callbacks.model_checkpoint.save_top_k=0",
    "callbacks.model_checkpoint.save_last=false",
]


def mmpretrain(*args: str, timeout: int = 300, ok: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mmpretrain.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def summary_json(sweep: Path) -> dict:
    return json.loads(mmpretrain("sweep-summary", str(sweep), "--json").stdout)


@pytest.fixture(scope="module")
def grid(digits_root, tmp_path_factory):
    sweep = tmp_path_factory.mktemp("sweeps") / "grid_sweep"
    proc = mmpretrain(
        "train",
        "-m",
        f"data.root={digits_root}",
        *TINY,
        "optim.lr=0.0001,0.001,0.003",
        f"hydra.sweep.dir={sweep}",
    )
    return sweep, proc.stdout


def test_grid_sweep_runs_each_job_in_its_own_directory(grid):
    sweep, _ = grid
    runs = sorted(p for p in sweep.iterdir() if (p / ".hydra" / "overrides.yaml").exists())
    assert [p.name for p in runs] == ["0", "1", "2"]
    lrs = set()
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["paths"]["output_dir"] == str(run)
        lrs.add(config["optim"]["lr"])
        assert "val/zeroshot_top1/image_text" in json.loads((run / "metrics.json").read_text())
    assert lrs == {1e-4, 1e-3, 3e-3}


def test_each_run_has_its_own_wandb_run_in_the_sweep_group(grid):
    from wandb.proto import wandb_internal_pb2 as pb

    sweep, _ = grid
    tag = pb.RunRecord.DESCRIPTOR.fields_by_name["run_group"].number << 3 | 2
    names = set()
    for run in ("0", "1", "2"):
        wandb_cfg = yaml.safe_load((sweep / run / "config.yaml").read_text())["logger"]["wandb"]
        assert wandb_cfg["group"] == "grid_sweep" and wandb_cfg["mode"] == "offline"
        names.add(wandb_cfg["name"])
        (record,) = (sweep / run / "wandb").glob("offline-run-*/run-*.wandb")  # one run per job
        assert bytes([tag, len("grid_sweep")]) + b"grid_sweep" in record.read_bytes()
    assert names == {"0: optim.lr=0.0001", "1: optim.lr=0.001", "2: optim.lr=0.003"}


def test_metrics_csv_has_the_run_statistics(grid):
    sweep, _ = grid
    header = (sweep / "0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in (
        "train/loss",
        "train/samples_per_s",
        "train/data_wait_frac",
        "train/temperature/shared",
        "train/skipped_samples",
        "val/zeroshot_top1/image_text",
    ):
        assert key in header, key
    assert any(k.startswith("lr-") for k in header)


def _assert_png(path: Path) -> None:
    assert path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    colours = pixels.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    assert len(np.unique(colours)) > 10, f"{path} is (almost) uniform"


def test_plots_are_written_as_non_empty_images(grid):
    sweep, _ = grid
    plots = sweep / "0" / "plots"
    for name in (
        "loss",
        "zeroshot",
        "retrieval",
        "temperature",
        "learning_rate",
        "similarity_image_text",
        "projection_image",
    ):
        _assert_png(plots / f"{name}.png")
    logged = {
        p.name.split("_")[0]
        for p in (sweep / "0" / "wandb").glob("offline-run-*/files/media/images/plots/*.png")
    }
    assert {"loss", "zeroshot", "similarity", "projection"} <= logged  # also logged to wandb as images


def test_sweep_summary_lists_every_run_best_first(grid):
    sweep, train_stdout = grid
    key = "val/zeroshot_top1/image_text"
    summary = summary_json(sweep)
    values = [r["metrics"][key] for r in summary["runs"]]
    assert len(values) == 3 and values == sorted(values, reverse=True)
    lrs = [next(o for o in r["overrides"] if o.startswith("optim.lr=")) for r in summary["runs"]]
    assert sorted(lrs) == ["optim.lr=0.0001", "optim.lr=0.001", "optim.lr=0.003"]
    table = mmpretrain("sweep-summary", str(sweep)).stdout
    rows = [line for line in table.splitlines() if "optim.lr=" in line and "common" not in line]
    assert [f"optim.lr={r.split('optim.lr=')[1].split()[0]}" for r in rows] == lrs
    assert f"{values[0]:.4f}" in rows[0] and f"{values[2]:.4f}" in rows[2]
    assert "3 runs, best first" in train_stdout  # printed at the end of the multirun too


@pytest.mark.slow  # ~25 s alone, ~50 s on the shared 2-core machine; the grid above covers the CLI sweep path
def test_optuna_search_runs_trials_and_stores_the_study_in_the_sweep_dir(digits_root, tmp_path):
    import optuna

    sweep = tmp_path / "search"
    mmpretrain(
        "train",
        "hparams_search=digits_optuna",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "logger=csv",
        "callbacks.plots=null",
        f"data.root={digits_root}",
        *TINY,
        f"hydra.sweep.dir={sweep}",
    )
    study = optuna.load_study(study_name="digits_clip", storage=f"sqlite:///{sweep}/optuna.sqlite")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 4
    summary = summary_json(sweep)
    assert len(summary["runs"]) == 4
    by_lr = {}
    for run in summary["runs"]:
        lr = [o for o in run["overrides"] if o.startswith("optim.lr=")]
        by_lr[float(lr[0].split("=")[1])] = run["metrics"]["val/zeroshot_top1/image_text"]
    # the value each trial reported to Optuna is the run's final val zero-shot top-1
    assert sorted(by_lr.items()) == sorted((t.params["optim.lr"], t.value) for t in trials)
    values = [r["metrics"]["val/zeroshot_top1/image_text"] for r in summary["runs"]]
    assert values == sorted(values, reverse=True)
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] == pytest.approx(
        values[0]
    )


@pytest.mark.slow
def test_a_search_trial_that_never_validated_says_how_to_fix_it(digits_root, tmp_path):
    no_val = [a for a in TINY if not a.startswith("trainer.val_check_interval")]
    args = [f"data.root={digits_root}", *no_val, "logger=csv", "callbacks.plots=null"]
    # a grid does not need the metric: it completes
    mmpretrain("train", "-m", *args, "optim.lr=0.001", f"hydra.sweep.dir={tmp_path / 'grid'}")
    proc = mmpretrain(
        "train",
        "hparams_search=digits_optuna",
        "hydra.sweeper.n_trials=1",
        *args,
        f"hydra.sweep.dir={tmp_path / 'search'}",
        ok=False,
    )
    out = proc.stdout + proc.stderr
    assert "logged no 'val/zeroshot_top1/image_text' (the sweep's optimized_metric)" in out
    assert "trainer.val_check_interval=N" in out
