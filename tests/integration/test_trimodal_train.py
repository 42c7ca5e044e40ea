"""Slow: a few steps of experiment=digits_trimodal and experiment=spoken_digits_clap through the CLI
function on a tiny spoken-digits build: every pair's metrics are reported and the export loads."""

import shutil

import numpy as np
import pytest
import torch

import mmpretrain
from mmpretrain.commands.train import train
from tests.conftest import compose_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng"),
]

FAST = [
    "trainer.max_steps=4",
    "trainer.max_epochs=1",
    "trainer.val_check_interval=4",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "logger=csv",
    "data.batch_size=8",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def tiny_spoken(tmp_path_factory):
    from sklearn import datasets

    from mmpretrain.data.synthetic.spoken_digits import build_spoken_digits

    real = datasets.load_digits()
    keep = np.concatenate([np.where(real.target == c)[0][:8] for c in range(10)])

    class Small:
        data, target = real.data[keep], real.target[keep]

    mp = pytest.MonkeyPatch()
    mp.setattr(datasets, "load_digits", lambda: Small)
    try:
        return build_spoken_digits(tmp_path_factory.mktemp("spoken"), train_shards=2, val_shards=2)
    finally:
        mp.undo()


def test_trimodal_reports_untrained_pairs_and_exports(tiny_spoken, digits_root, tmp_path):
    cfg = compose_config(
        "train",
        ["experiment=digits_trimodal", *FAST, f"data.root={tiny_spoken}", f"data.digits_root={digits_root}"],
        run_dir=tmp_path,
    )
    metrics = train(cfg)
    for key in (
        "val/zeroshot_top1/audio_image",
        "val/retrieval_class_R@1/audio_to_image",
        "val/zeroshot_top1/audio_text",
        "val/zeroshot_top1/image_text",
        "train/image_text_loss",
        "train/audio_text_loss",
        "train/logit_scale/audio_text",
    ):
        assert key in metrics, key
    assert "train/audio_image_loss" not in metrics
    model = mmpretrain.load_pretrained(tmp_path / "export")
    assert set(model.modalities) == {"image", "text", "audio"}
    wave = model.preprocess(False)["audio"]((np.zeros(8000, dtype=np.float32), 8000))
    assert model.encode_audio(wave[None]).shape == (1, 128)


def test_spoken_digits_clap_runs(tiny_spoken, tmp_path):
    cfg = compose_config(
        "train", ["experiment=spoken_digits_clap", *FAST, f"data.root={tiny_spoken}"], run_dir=tmp_path
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["val/zeroshot_top1/audio_text"] <= 1.0
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
