"""data.image_decode as users set it: `mmpretrain train ... data.image_decode=gpu` on a machine (or a
trainer) without CUDA trains with the workers' fast path and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_launch import run_cli

SMALL = [
    "debug=fast",
    "data.batch_size=8",
    "model.config.vision_cfg.layers=1",
    "model.config.text_cfg.layers=1",
]


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory) -> Path:
    from mmpretrain.data.synthetic.scenes import build_scenes

    return build_scenes(
        tmp_path_factory.mktemp("scenes") / "s",
        workers=1,
        train=32,
        val=16,
        test=8,
        shard_size=8,
        image_size_min=80,
        image_size_max=128,
    )


@pytest.mark.slow  # ~20 s of CPU; the byte path itself runs in tests/unit/test_image_decode.py
def test_gpu_decode_without_cuda_falls_back_with_a_message(scenes_root, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        ["train", "experiment=scenes_clip", *SMALL, "data.image_decode=gpu", f"data.root={scenes_root}"]
        + [f"paths.output_dir={run}"],
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert "data.image_decode=gpu: CUDA is not available" in out and "data.image_decode=fast" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert any(k.startswith("val/") for k in metrics)
