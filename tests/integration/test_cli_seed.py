"""A user's seed through the installed console script, from another directory, as a user runs it."""

import json

import pytest

from tests.integration.test_launch import run_cli

# The text tower shrunk as in TINY_RUN: the run is about the seed, not the model.
SMALL_TEXT = [
    "model.towers.text.config.text_cfg.width=32",
    "model.towers.text.config.text_cfg.heads=2",
    "model.towers.text.config.text_cfg.layers=1",
]


@pytest.mark.parametrize("seed", [31337, 2**63 - 1])
def test_train_with_a_large_seed_runs_without_skipping_samples(digits_root, tmp_path, seed):
    """``seed=31337`` used to skip every sample (its augmentation seeds overflowed int64) and stop
    with '1000 samples in a row failed ... Overflow when unpacking long long'; ``2**63-1`` also made
    ``lightning.seed_everything`` raise (it takes 32-bit seeds only)."""
    run = tmp_path / "run"
    proc = run_cli(
        [
            "train",
            "debug=fast",
            f"seed={seed}",
            f"data.root={digits_root}",
            f"hydra.run.dir={run}",
            "export_at_end=false",
            *SMALL_TEXT,
        ],
        cwd=tmp_path / "elsewhere",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped_samples"] == 0
    assert metrics["train/loss"] > 0
    assert "skipped samples: 0" in proc.stdout
