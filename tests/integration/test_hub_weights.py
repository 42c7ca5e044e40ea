"""`mmpretrain train` from weights named on the Hugging Face hub, offline, through the console script;
and a missing file stops the run before the data or the trainer."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from huggingface_hub import constants

from mmpretrain.commands import train as train_command
from mmpretrain.commands.train import train
from mmpretrain.pretrained import WeightsUnavailableError
from tests.conftest import compose_config
from tests.hub_cache import add_open_clip

CONSOLE_SCRIPT = Path(sys.executable).parent / "mmpretrain"


@pytest.mark.slow
def test_console_script_trains_from_a_cached_hub_model_and_validates_the_starting_point(
    digits_root, tmp_path
):
    cache = tmp_path / "hub"
    add_open_clip(cache, "org/tiny-clip")
    run = tmp_path / "run"
    cmd = [
        str(CONSOLE_SCRIPT),
        "train",
        "model=openclip",
        "model.config=hf-hub:org/tiny-clip",
        "debug=fast",
        f"data.root={digits_root}",
        f"hydra.run.dir={run}",
        "export_at_end=false",
    ]
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/zeroshot_top1/image_text")]
    # trainer.val_at_start (on: the towers are pretrained) validates at step 0, before training; then
    # debug=fast's one validation after its 4 steps (Lightning logs it at step index 3). Without it: [3].
    assert [int(r["step"]) for r in rows] == [0, 3]


def test_missing_weights_stop_train_before_data_and_trainer(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def built(*args, **kwargs):
        raise AssertionError("built before the weights were checked")

    monkeypatch.setattr(L, "Trainer", built)
    monkeypatch.setattr(train_command, "ensure_data", built)
    cfg = compose_config(
        "train",
        ["model=openclip", "model.config=ViT-B-32", "model.pretrained=laion2b_s34b_b79k"],
        run_dir=tmp_path / "run",
    )
    with pytest.raises(
        WeightsUnavailableError, match="huggingface-cli download laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    ):
        train(cfg)
