"""A data set with fewer shards than readers trains with default options (data.shard_policy=auto):
every reader draws shards with replacement, and the run says so."""

from __future__ import annotations

import shutil

from tests.integration.test_launch import run_cli


def test_a_source_with_fewer_shards_than_readers_trains_with_default_options(digits_root, tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    for shard in sorted((root / "train").glob("*.tar"))[1:]:
        shard.unlink()
    (root / "train" / "sizes.json").unlink()
    proc = run_cli(
        [
            "train",
            "debug=fast",
            f"data.root={root}",
            "data.num_workers=2",
            "logger=csv",
            "callbacks.plots=null",
            "model.towers.text.config.text_cfg.width=32",
            "model.towers.text.config.text_cfg.heads=2",
            "model.towers.text.config.text_cfg.layers=1",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    assert "data.shard_policy=auto: fewer shards than the 2 readers" in proc.stdout, proc.stdout[-2000:]
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_partial_download_stops_the_run_unless_allowed(digits_root, tmp_path):
    """A brace pattern naming shards that are missing: the run stops at the start saying how many are
    missing; data.missing_shards=warn trains on the ones present."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    (root / "train" / "train-0007.tar").unlink()
    common = [
        "train",
        "debug=fast",
        f"data.root={root}",
        "data.num_workers=0",
        "logger=csv",
        "callbacks.plots=null",
        f'data.sources.digits.shards="{root}/train/train-{{0000..0007}}.tar"',
        "model.towers.text.config.text_cfg.width=32",
        "model.towers.text.config.text_cfg.heads=2",
        "model.towers.text.config.text_cfg.layers=1",
    ]
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mmpretrain"), *common, f"hydra.run.dir={tmp_path / 'a'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"WANDB_MODE": "offline"},
    )
    assert proc.returncode != 0 and "1 of" in proc.stderr and "data.missing_shards=warn" in proc.stderr, (
        proc.stderr[-2000:]
    )
    run_cli([*common, "data.missing_shards=warn", f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path)


def test_limit_train_batches_that_cuts_epochs_is_refused_naming_train_samples(digits_root, tmp_path):
    """trainer.limit_train_batches=3 over two epochs used to die at the second epoch with "no saved
    position of stream 0 at its batch 12"; now the run stops before training, naming
    data.train_samples, and with one epoch the limit trains."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    common = [
        "train",
        f"data.root={digits_root}",
        "data.num_workers=0",
        "logger=csv",
        "callbacks.plots=null",
        "export_at_end=false",
        "model.towers.text.config.text_cfg.width=32",
        "model.towers.text.config.text_cfg.heads=2",
        "model.towers.text.config.text_cfg.layers=1",
        "data.batch_size=32",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
    ]
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mmpretrain"), *common, "trainer.max_epochs=2"]
        + [f"hydra.run.dir={tmp_path / 'a'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"WANDB_MODE": "offline"},
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "trainer.limit_train_batches=3 cuts each epoch at 3 of its" in proc.stderr, proc.stderr[-2000:]
    assert "data.train_samples=96 (epochs of 3 batches)" in proc.stderr  # 3 batches of 32
    run_cli([*common, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path)
    assert (tmp_path / "b" / "metrics.json").exists()
