"""Video: PyAV decoding, frame sampling (train jitter vs eval determinism), padding, one augmentation
per clip, corrupt clips as counted skips, and the temporal pooling of the video tower."""

import random

import numpy as np
import pytest
import torch
import webdataset as wds

from mmpretrain.data import ShardStream, Source
from mmpretrain.data.stream.decode import decode_sample
from mmpretrain.data.stream.video import (
    CorruptVideoError,
    EncodedVideo,
    decode_video,
    encode_video,
    read_frames,
)
from mmpretrain.towers.video import VideoClip, VideoTower, sample_indices, spatial_keypoints
from tests.videos import moving_square, tone

FRAME = {"_target_": "mmpretrain.towers.timm.TimmTower", "model_name": "resnet10t", "img_size": 32}


@pytest.mark.parametrize("ext", ["mp4", "webm", "avi"])
def test_each_container_decodes_to_its_frames(ext):
    clip = moving_square(10, 32)
    video = decode_video(encode_video(clip, 10, ext), ext)
    assert (video.num_frames, video.width, video.height) == (10, 32, 32)
    assert video.fps == pytest.approx(10.0)
    frames = read_frames(video, [7, 2, 7])
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
    for got, want in zip(frames, clip[[7, 2, 7]]):  # lossy codecs: close, and the square where it was
        assert np.abs(got.astype(int) - want).mean() < 6
        centre = [np.average(np.arange(32), weights=f[16, :, 0].astype(float) + 1e-3) for f in (got, want)]
        assert centre[0] == pytest.approx(centre[1], abs=1.0)


def test_the_audio_track_of_an_mp4_reads_as_a_waveform_for_the_audio_tower():
    wave = tone(1.0, 440.0)
    data = encode_video(moving_square(8), 8, "mp4", audio=wave)
    sample = {"__key__": "k", "mp4": data, "txt": b"x"}
    # Without data.modality_keys the audio tower does not look at the video key ...
    assert "audio" not in decode_sample(sample, ["audio", "video"], required=[])
    out = decode_sample(sample, ["audio", "video"], required=["audio"], modality_keys={"audio": ("mp4",)})
    got, rate = out["audio"]
    assert rate == 16000 and got.shape[1] == 1 and abs(len(got) - 16000) < 2048
    spectrum = np.abs(np.fft.rfft(got[:, 0]))
    assert np.fft.rfftfreq(len(got), 1 / rate)[spectrum.argmax()] == pytest.approx(440.0, abs=3.0)
    assert isinstance(out["video"], EncodedVideo)
    silent = {"__key__": "k", "mp4": encode_video(moving_square(8), 8, "mp4")}
    with pytest.raises(CorruptVideoError, match="no audio stream"):
        decode_sample(silent, ["audio"], required=["audio"], modality_keys={"audio": ("mp4",)})


def test_truncated_or_garbage_video_is_an_error_naming_it():
    data = encode_video(moving_square(12), 10, "mp4")
    for bad in (b"not a video" * 50, data[: len(data) // 2], data[:200]):
        with pytest.raises(CorruptVideoError):
            decode_video(bad)
    for ext in ("avi", "webm"):
        cut = encode_video(moving_square(12), 10, ext)
        with pytest.raises(CorruptVideoError):
            decode_video(cut[: int(len(cut) * 0.6)], ext)
    # A container that promises more frames than its data holds fails when the frame is read.
    with pytest.raises(CorruptVideoError, match="frame 15 is wanted but the video decodes to 12 frames"):
        read_frames(EncodedVideo(data, 20, 10.0, 32, 32), [3, 15])


def test_eval_sampling_is_centred_and_deterministic():
    assert sample_indices(20, 4, 2, train=False) == [6, 8, 10, 12]  # window of 7 centred in 20
    assert sample_indices(20, 4, None, train=False) == [2, 7, 12, 17]  # middle of each 5-frame segment
    assert all(sample_indices(20, 4, None, train=False) == [2, 7, 12, 17] for _ in range(5))


def test_train_sampling_jitters_within_its_window_and_segments():
    rng = random.Random(0)
    strided = {tuple(sample_indices(20, 4, 2, True, rng)) for _ in range(200)}
    assert len(strided) == 14  # every start 0..13
    assert all(np.all(np.diff(s) == 2) for s in strided)
    uniform = [sample_indices(20, 4, None, True, rng) for _ in range(200)]
    assert len({tuple(u) for u in uniform}) > 50
    for u in uniform:  # one frame in each segment [0,5) [5,10) [10,15) [15,20)
        assert [i // 5 for i in u] == [0, 1, 2, 3]


def test_short_clips_are_padded_by_repetition():
    assert sample_indices(3, 8, None, train=False, pad="loop") == [0, 1, 2, 0, 1, 2, 0, 1]
    assert sample_indices(3, 8, None, train=True, pad="last") == [0, 1, 2, 2, 2, 2, 2, 2]
    assert sample_indices(5, 4, 2, train=False, pad="loop") == [0, 2, 4, 0]
    assert sample_indices(1, 3, None, train=False) == [0, 0, 0]
    with pytest.raises(ValueError, match="loop, last"):
        sample_indices(3, 8, None, train=False, pad="zero")


def test_every_frame_of_a_clip_gets_the_same_crop_and_flip():
    tower = VideoTower(FRAME | {"transform": {"scale": [0.2, 0.5], "hflip": 0.5}}, num_frames=4)
    clip = np.repeat(np.random.default_rng(0).integers(0, 255, (1, 48, 48, 3), dtype=np.uint8), 6, axis=0)
    prep = tower.preprocess(train=True)
    outs = []
    for seed in range(4):
        random.seed(seed), torch.manual_seed(seed)
        out = prep(clip)
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
        assert all(torch.equal(out[0], f) for f in out[1:])  # identical frames in, identical frames out
        outs.append(out[0])
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # ... and the crop does change between clips
    frames = tower.preprocess(train=False)(decode_video(encode_video(moving_square(16), 8)))
    assert frames.shape == (4, 3, 32, 32)


def write(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def test_corrupt_and_truncated_clips_are_counted_skips(tmp_path):
    good = encode_video(moving_square(8), 8)
    samples = [{"__key__": f"s{i}", "mp4": good, "txt": f"clip {i}", "cls": "0"} for i in range(6)]
    samples[1]["mp4"] = good[: len(good) // 3]
    samples[4]["mp4"] = b"\x00" * 300
    url = write(tmp_path / "v.tar", samples)
    prep = {
        "video": VideoTower(FRAME, num_frames=4).preprocess(False),
        "text": lambda t: torch.tensor([len(t)]),
    }
    batches = list(ShardStream([Source("v", [url])], prep, batch_size=2, train=False))
    assert sum(int(b["__skipped__"]) for b in batches) == 2
    assert [k for b in batches for k in b["__key__"]] == ["s0", "s2", "s3", "s5"]
    assert batches[0]["video"].shape == (2, 4, 3, 32, 32) and batches[0]["video"].dtype == torch.uint8


def test_a_video_text_source_mixed_with_image_text_fills_blank_clips(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(buf, format="PNG")
    vids = write(
        tmp_path / "v.tar",
        [{"__key__": f"v{i}", "mp4": encode_video(moving_square(8), 8), "txt": "v"} for i in range(4)],
    )
    imgs = write(
        tmp_path / "i.tar", [{"__key__": f"i{i}", "png": buf.getvalue(), "txt": "i"} for i in range(4)]
    )
    from mmpretrain.towers.timm import TimmTower

    prep = {
        "video": VideoTower(FRAME, num_frames=2).preprocess(False),
        "image": TimmTower("resnet10t", img_size=32).preprocess(False),
        "text": lambda t: torch.tensor([len(t)]),
    }
    stream = ShardStream(
        [
            Source("v", [vids], modalities=["video", "text"]),
            Source("i", [imgs], modalities=["image", "text"]),
        ],
        prep,
        batch_size=8,
        train=False,
    )
    (batch,) = list(stream)
    assert batch["video"].shape == (8, 2, 3, 32, 32)
    assert batch["video_mask"].tolist() == [True] * 4 + [False] * 4
    assert batch["video"][4:].eq(0).all()


def test_transformer_pooling_sees_time_order_and_mean_pooling_does_not():
    torch.manual_seed(0)
    clip = torch.randint(0, 256, (3, 6, 3, 32, 32), dtype=torch.uint8)
    reverse = clip.flip(1)
    mean = VideoTower(FRAME, num_frames=6, pooling="mean").eval()
    seq = VideoTower(FRAME, num_frames=6, pooling="transformer", temporal={"layers": 1, "heads": 4}).eval()
    with torch.no_grad():
        torch.testing.assert_close(mean(clip), mean(reverse), rtol=1e-5, atol=1e-5)
        a, b = seq(clip), seq(reverse)
    assert a.shape == (3, 512)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


@pytest.mark.parametrize("frame_pool", ["avg", "grid", "spatial_softmax"])
def test_mean_pooling_stays_order_blind_whatever_the_frame_pool(frame_pool):
    """A clip and its reverse (the opposite direction): equal under mean pooling, not under the
    transformer."""
    torch.manual_seed(0)
    clip = torch.randint(0, 256, (2, 4, 3, 64, 64), dtype=torch.uint8)
    frame = FRAME | {"img_size": 64, "model_kwargs": {"output_stride": 16}}
    mean = VideoTower(frame, num_frames=4, pooling="mean", frame_pool=frame_pool).eval()
    seq = VideoTower(
        frame, num_frames=4, pooling="transformer", frame_pool=frame_pool, temporal={"layers": 1, "heads": 4}
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(mean(clip), mean(clip.flip(1)), rtol=1e-5, atol=1e-5)
        a, b = seq(clip), seq(clip.flip(1))
    assert a.shape == (2, 512)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


def test_spatial_keypoints_are_where_each_channel_fires():
    fmap = torch.zeros(1, 2, 4, 4)
    fmap[0, 0, 1, 3] = 50.0  # channel 0 fires at row 1, column 3; channel 1 nowhere: the centre
    got = spatial_keypoints(fmap)
    torch.testing.assert_close(got, torch.tensor([[[1.0, -1 / 3], [0.0, 0.0]]]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["spatial_softmax", "grid"])
def test_frame_pool_features_see_a_move_that_the_global_average_pool_cannot(kind):
    """The same pattern at two places of the map: equal global average, different pooled features."""
    from mmpretrain.towers.video import FramePool

    torch.manual_seed(0)
    pattern = torch.rand(1, 8, 2, 2) * 10
    left, right = torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 4, 4)
    left[..., 1:3, 0:2], right[..., 1:3, 2:4] = pattern, pattern
    torch.testing.assert_close(left.mean((2, 3)), right.mean((2, 3)))
    pool = FramePool(kind, 8)
    a, b = pool(left), pool(right)
    assert a.shape == (1, 8) and (a - b).abs().max() > 1e-2
    if kind == "spatial_softmax":  # every channel's keypoint moved right, none moved vertically
        moved = spatial_keypoints(right) - spatial_keypoints(left)
        assert (moved[..., 0] > 0.3).all() and moved[..., 1].abs().max() < 1e-5


def test_a_frame_pool_runs_on_the_frame_backbone_map():
    tower = VideoTower(
        FRAME | {"img_size": 64, "model_kwargs": {"output_stride": 16}},
        num_frames=2,
        frame_pool="spatial_softmax",
    ).eval()
    frames = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert tower.frame.feature_map(frames).shape == (3, 512, 4, 4)
        assert tower.frame_features(frames).shape == (3, 512)
    assert tower.data_config["frame_pool"] == "spatial_softmax"
    assert any(p is tower.frame_pool.log_temperature for g in tower.param_groups() for p in g)


@pytest.mark.parametrize("family", ["timm", "open_clip"])
def test_inflated_patch_embedding_sees_a_still_clip_as_its_image(family):
    """Two identical frames = one tubelet whose Conv3d equals the 2D conv: the image tower's features."""
    from mmpretrain.config import safe_instantiate

    if family == "timm":
        frame = {
            "_target_": "mmpretrain.towers.timm.TimmTower",
            "model_name": "vit_tiny_patch16_224",
            "img_size": 32,
            "model_kwargs": {"img_size": 32},
        }
    else:
        frame = {
            "_target_": "mmpretrain.towers.open_clip.OpenClipTower",
            "modality": "image",
            "config": {
                "embed_dim": 64,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
            },
        }
    torch.manual_seed(0)
    video = VideoTower(frame, num_frames=2, pooling="inflate").eval()
    torch.manual_seed(0)
    image = safe_instantiate(frame).eval()
    still = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(
            video(still[:, None].expand(-1, 2, -1, -1, -1)), image(still), rtol=1e-4, atol=1e-4
        )
        moving = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8)
        assert video(moving).shape == image(still).shape
    if (
        family == "timm"
    ):  # 5 frames: 3 tubelets (the last padded with its frame), each with its own time embedding
        five = VideoTower(frame, num_frames=5, pooling="inflate")
        assert five.temporal.time_embed.shape == (1, 3, 1, 192)
        assert five(torch.randint(0, 256, (1, 5, 3, 32, 32), dtype=torch.uint8)).shape == (1, 192)


def test_inflate_refuses_a_cnn_and_bad_options_are_named():
    with pytest.raises(ValueError, match="pooling=inflate needs a ViT"):
        VideoTower(FRAME, pooling="inflate")
    with pytest.raises(ValueError, match="mean, transformer, inflate"):
        VideoTower(FRAME, pooling="max")
    with pytest.raises(ValueError, match="avg, grid, spatial_softmax"):
        VideoTower(FRAME, frame_pool="max")
    with pytest.raises(ValueError, match="use frame_pool=avg with it"):
        VideoTower(FRAME, pooling="inflate", frame_pool="grid")
    with pytest.raises(ValueError, match="needs a timm frame tower"):
        VideoTower(
            {
                "_target_": "mmpretrain.towers.open_clip.OpenClipTower",
                "modality": "image",
                "config": {
                    "embed_dim": 64,
                    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
                },
            },
            frame_pool="spatial_softmax",
        )
    with pytest.raises(ValueError, match=r"clips \[B, T, C, H, W\]"):
        VideoTower(FRAME)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_video_clip_takes_decoded_frames_as_well_as_a_file():
    clip = moving_square(8)
    prep = VideoClip(lambda img: torch.from_numpy(np.array(img)).permute(2, 0, 1), 4, None, train=False)
    torch.testing.assert_close(prep(clip), torch.from_numpy(clip[[0, 2, 4, 6]]).permute(0, 3, 1, 2))


def test_a_pretrained_frame_tower_counts_as_a_pretrained_model():
    """check_available resolves the frame tower's weights, and val_at_start=null turns on for it."""
    from mmpretrain.commands.train import val_at_start as _val_at_start
    from mmpretrain.pretrained import tower_configs
    from tests.conftest import compose_config

    cfg = compose_config(
        "train", ["model=tiny_video_text", "model.towers.video.frame.pretrained_path=/w.safetensors"]
    )
    frames = [t for t in tower_configs(cfg.model) if t.get("modality") == "image"]
    assert [f.pretrained_path for f in frames] == ["/w.safetensors"]
    assert _val_at_start(cfg)
    assert not _val_at_start(compose_config("train", ["model=tiny_video_text"]))


def test_motion_feeds_the_frame_to_frame_change_to_the_temporal_transformer():
    """``temporal.motion``: a still clip is unchanged by the motion map (no change between frames), a moving
    one is;
    at initialisation it makes the pooled feature far more sensitive to the order of the frames than
    the transformer's own (near-uniform) attention does."""
    from mmpretrain.towers.video import TemporalTransformer

    torch.manual_seed(0)
    plain = TemporalTransformer(64, 4, layers=1, heads=4)
    motion = TemporalTransformer(64, 4, layers=1, heads=4, motion=True)
    blind = TemporalTransformer(64, 4, layers=1, heads=4, motion=True)
    blind.load_state_dict(motion.state_dict())
    torch.nn.init.zeros_(blind.motion.weight)  # the same module with the motion map off
    still = torch.randn(3, 1, 64).expand(-1, 4, -1)
    moving = torch.randn(3, 4, 64)
    with torch.no_grad():
        torch.testing.assert_close(motion(still), blind(still))
        assert (motion(moving) - blind(moving)).abs().max() > 1e-2

        def order_gap(m):
            return ((m(moving) - m(moving.flip(1))).norm(dim=1) / m(moving).norm(dim=1)).mean()

        assert order_gap(motion) > 5 * order_gap(plain)
    with pytest.raises(TypeError):
        TemporalTransformer(64, 4, moton=True)  # a misspelt option is not silently ignored
