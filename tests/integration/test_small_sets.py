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
