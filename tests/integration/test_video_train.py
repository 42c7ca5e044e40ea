"""Video end to end: export -> load_pretrained round trip of every pooling, an image tower's export
starting the frame tower, and `mmpretrain train` from the console script on tiny mp4 shards written
here with PyAV (video-text, and mp4s whose audio track feeds the audio tower too), then fine-tuning."""

import json

import numpy as np
import pytest
import torch

import mmpretrain
from mmpretrain.data.stream.video import decode_video, encode_video
from mmpretrain.export import export
from mmpretrain.model import build_model
from tests.integration.test_launch import SMALL_TEXT, run_cli
from tests.videos import moving_square, write_video_shards

TEXT = {
    "embed_dim": 32,
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FRAME = {"_target_": "mmpretrain.towers.timm.TimmTower", "model_name": "test_resnet", "img_size": 32}
VIT = {
    "_target_": "mmpretrain.towers.timm.TimmTower",
    "model_name": "vit_tiny_patch16_224",
    "img_size": 32,
    "model_kwargs": {"img_size": 32, "depth": 2},
}


def video_model(pooling: str, frame=FRAME):
    return {
        "embed_dim": 16,
        "towers": {
            "video": {
                "_target_": "mmpretrain.towers.video.VideoTower",
                "_recursive_": False,
                "frame": frame,
                "num_frames": 4,
                "pooling": pooling,
                "temporal": {"layers": 1, "heads": 2} if pooling == "transformer" else {},
            },
            "text": {
                "_target_": "mmpretrain.towers.open_clip.OpenClipTower",
                "modality": "text",
                "config": TEXT,
            },
        },
    }


@pytest.mark.parametrize("pooling,frame", [("mean", FRAME), ("transformer", FRAME), ("inflate", VIT)])
def test_video_model_export_round_trip(tmp_path, pooling, frame):
    torch.manual_seed(0)
    model = build_model(video_model(pooling, frame)).eval()
    export(model, tmp_path / "export")
    loaded = mmpretrain.load_pretrained(tmp_path / "export")
    clip = loaded.transforms["video"](decode_video(encode_video(moving_square(12), 8)))
    assert clip.shape == (4, 3, 32, 32) and clip.dtype == torch.uint8
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_video(clip[None]), model.encode_video(clip[None]), rtol=0, atol=0
        )
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"{pooling} pooling over 4 frames" in card
    assert json.loads((tmp_path / "export" / "preprocess.json").read_text())["video"]["num_frames"] == 4


def test_an_exported_image_tower_starts_the_frame_tower(tmp_path):
    torch.manual_seed(1)
    image_model = build_model(
        {"embed_dim": 16, "towers": {"image": FRAME, "text": video_model("mean")["towers"]["text"]}}
    )
    export(image_model.eval(), tmp_path / "image")
    cfg = video_model("mean")
    cfg["towers"]["video"]["image_tower_path"] = str(tmp_path / "image")
    video = build_model(cfg).eval()
    frames = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(video.towers["video"].frame(frames), image_model.towers["image"](frames))
    cfg["towers"]["video"]["image_tower_path"] = str(tmp_path / "nothing.safetensors")
    with pytest.raises(Exception, match="nothing.safetensors does not exist"):
        build_model(cfg)


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_shards")
    write_video_shards(root, n_train=32, n_val=8, shards=2, audio=False)
    return root


@pytest.fixture(scope="module")
def av_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("av_shards")
    write_video_shards(root, n_train=32, n_val=8, shards=2, audio=True)
    return root


VIDEO = [
    "data=shards",
    "model=tiny_video_text",
    "loss.pairs=[[video,text]]",
    "debug=fast",
    "data.batch_size=8",
    "model.towers.video.num_frames=4",
    "model.towers.video.frame.model_name=test_resnet",
    "optimized_metric=val/zeroshot_top1/video_text",
    *SMALL_TEXT,
]


def test_cli_trains_video_text_on_mp4_shards_and_finetunes(video_shards, tmp_path):
    run = tmp_path / "run"
    run_cli(
        [
            "train",
            *VIDEO,
            f"data.root={video_shards}",
            "model.towers.video.pooling=transformer",
            "model.towers.video.temporal.heads=1",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path / "elsewhere",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "val/zeroshot_top1/video_text",
        "val/retrieval_R@1/video_to_text",
        "val/retrieval_R@1/text_to_video",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["train/loss"] > 0
    model = mmpretrain.load_pretrained(run / "export")
    assert model.towers["video"].pooling == "transformer"
    probe = tmp_path / "probe"
    run_cli(
        [
            "finetune",
            "task=linear_probe",
            "task.modality=video",
            "task.epochs=2",
            f"pretrained={run / 'export'}",
            "data=shards",
            f"data.root={video_shards}",
            "data.num_workers=0",
            f"hydra.run.dir={probe}",
        ],
        cwd=tmp_path / "elsewhere",
    )
    assert 0.0 <= json.loads((probe / "metrics.json").read_text())["val/accuracy"] <= 1.0
    fusion = tmp_path / "fusion"
    run_cli(
        [
            "finetune",
            "task=fusion",
            "task.modalities=[video,text]",
            "task.epochs=1",
            "task.width=32",
            "task.heads=2",
            "task.layers=1",
            f"pretrained={run / 'export'}",
            "data=shards",
            f"data.root={video_shards}",
            "data.num_workers=0",
            "data.batch_size=8",
            f"hydra.run.dir={fusion}",
        ],
        cwd=tmp_path / "elsewhere",
    )
    assert 0.0 <= json.loads((fusion / "metrics.json").read_text())["val/accuracy"] <= 1.0


def test_cli_one_mp4_feeds_the_video_and_the_audio_tower(av_shards, tmp_path):
    run = tmp_path / "run"
    run_cli(
        [
            "train",
            *VIDEO,
            f"data.root={av_shards}",
            "+model/tower@model.towers.audio=timm_audio",
            "model.towers.audio.model_name=test_resnet",
            "model.towers.audio.clip_seconds=0.5",
            "loss.pairs=[[video,text],[audio,text]]",
            "data.modality_keys={audio:[mp4]}",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path / "elsewhere",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "train/video_text_loss",
        "train/audio_text_loss",
        "val/zeroshot_top1/audio_text",
        "val/retrieval_R@1/video_to_audio",
        "val/zeroshot_top1/video_audio",
    ):
        assert key in metrics, sorted(metrics)
    assert metrics.get("train/skipped_samples", 0) == 0
    model = mmpretrain.load_pretrained(run / "export")
    assert set(model.modalities) == {"video", "audio", "text"}
    wave = model.transforms["audio"]((np.zeros(4000, dtype=np.float32), 8000))
    assert model.encode_audio(wave[None]).shape == (1, 128)


def test_torchscript_export_of_a_video_tower_matches_the_model(tmp_path):
    from mmpretrain.interop.torchscript import export_torchscript

    torch.manual_seed(0)
    model = build_model(video_model("transformer")).eval()
    export_torchscript(model, tmp_path / "ts")
    traced = torch.jit.load(str(tmp_path / "ts" / "encode_video.pt"))
    clips = torch.randint(0, 256, (3, 4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(traced(clips), model.encode_video(clips), rtol=1e-5, atol=1e-5)


def test_ddp_with_a_batchnorm_frame_tower_and_unequal_val_batches_finishes(tmp_path):
    """One val shard, two ranks: rank 1 has no val batch. Through the DDP wrapper each val forward of a
    BatchNorm tower broadcast rank 0's buffers, so rank 0 waited there for ever while rank 1 waited in the
    epoch-end gather (`experiment=moving_digits_clip trainer=ddp` on a small build hung)."""
    root = tmp_path / "shards"
    write_video_shards(root, n_train=32, n_val=8, shards=1, audio=False)
    run = tmp_path / "run"
    run_cli(
        [
            "train",
            *VIDEO,
            f"data.root={root}",
            "data.shard_policy=resample",
            "data.num_workers=1",
            "model.towers.video.pooling=transformer",
            "model.towers.video.temporal.heads=1",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=bf16-mixed",
            "trainer.max_epochs=2",
            "trainer.check_val_every_n_epoch=1",
            "trainer.val_check_interval=1.0",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path / "elsewhere",
        timeout=300,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics.get("val/zeroshot_top1/video_text", -1) <= 1.0, sorted(metrics)
    assert (run / "export").is_dir()
