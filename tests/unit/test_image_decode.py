"""data.image_decode: the fast crop draws the library's boxes and decodes at least the crop's size; the
gpu mode's byte path (worker -> EncodedImage -> decode_images) on the CPU; the fallback without CUDA."""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from mmpretrain.data import ShardStream, Source
from mmpretrain.data.stream import image as image_mod
from mmpretrain.data.stream.decode import decode_image
from mmpretrain.data.stream.image import (
    DeviceResizedCrop,
    EncodedImage,
    FastResizedCrop,
    decode_images,
    decode_on_device,
    resolve_mode,
    training_image_transform,
)
from mmpretrain.data.stream.seeds import seeded


def library_transform(size=224):
    """open_clip's training transform as our towers use it (uint8 out, normalised by the tower)."""
    import open_clip

    from mmpretrain.towers.base import uint8_transform

    return uint8_transform(open_clip.image_transform(size, is_train=True))


def photo(side_w: int, side_h: int, seed: int = 0, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A smooth image with detail at every scale (gradients + blobs + noise), encoded."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side_h, 0:side_w] / max(side_w, side_h)
    chans = [np.sin(2 * np.pi * (f * x + g * y)) for f, g in rng.uniform(0.5, 6, size=(3, 2))]
    arr = (
        (np.stack(chans, -1) * 90 + 128 + rng.normal(0, 6, (side_h, side_w, 3))).clip(0, 255).astype(np.uint8)
    )
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def boxes(crop, monkeypatch, fn, inputs, seeds):
    """The boxes ``crop.get_params`` draws while ``fn`` runs on each input under each seed, relative
    to the image: (scale = area fraction, log aspect)."""
    drawn = []
    real = type(crop).get_params

    def spy(img, scale, ratio):
        from torchvision.transforms import functional as F

        _, height, width = F.get_dimensions(img)
        top, left, h, w = real(img, scale, ratio)
        drawn.append((top, left, h, w, height, width))
        return top, left, h, w

    monkeypatch.setattr(crop, "get_params", spy)
    for data, seed in zip(inputs, seeds):
        with seeded(seed):
            fn(data)
    monkeypatch.undo()
    return drawn


def test_fast_draws_the_library_boxes_draw_for_draw(monkeypatch):
    exact = library_transform()
    fast = training_image_transform(exact, "fast")
    assert isinstance(fast, FastResizedCrop) and fast.crop is exact.transforms[0]
    jpgs = [photo(256 + 37 * k, 300 + 23 * k, seed=k) for k in range(6)] * 16
    seeds = list(range(len(jpgs)))
    ours = boxes(fast.crop, monkeypatch, fast, jpgs, seeds)
    ref = boxes(exact.transforms[0], monkeypatch, lambda d: exact(decode_image(d)), jpgs, seeds)
    assert ours == ref  # same draws on the same sizes: the scale/aspect distribution is the library's
    scale = np.array([h * w / (H * W) for _, _, h, w, H, W in ours])
    aspect = np.log([w / h for _, _, h, w, _, _ in ours])
    assert scale.min() >= 0.9 - 1e-3 and scale.max() <= 1.0
    assert aspect.min() >= math.log(3 / 4) - 0.02 and aspect.max() <= math.log(4 / 3) + 0.02
    assert scale.std() > 0.01 and aspect.std() > 0.01  # a real distribution, not one box


def test_fast_pixels_match_exact_for_the_same_draw():
    exact = library_transform()
    fast = training_image_transform(exact, "fast")
    for k, (w, h) in enumerate([(512, 512), (384, 288), (256, 400)]):
        data = photo(w, h, seed=k)
        with seeded(k):
            a = exact(decode_image(data)).float()
        with seeded(k):
            b = fast(data)
        with seeded(k):
            c = fast(photo(w, h, seed=k + 10)).float()  # another image: the bound below means something
        assert b.dtype == torch.uint8 and b.shape == (3, 224, 224)
        assert (a - b.float()).abs().mean() < 2.5, (w, h)  # grey levels of 255
        assert (a - c).abs().mean() > 10 * (a - b.float()).abs().mean()


def test_the_reduced_decode_keeps_the_box_at_least_the_output_size(monkeypatch):
    import simplejpeg

    decoded = []
    real = simplejpeg.decode_jpeg

    def spy(data, **kw):
        out = real(data, **kw)
        decoded.append(out.shape[:2])
        return out

    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
    fast = training_image_transform(library_transform(), "fast")
    for side, seed in [(512, 0), (480, 1), (300, 2), (230, 3)]:
        data = photo(side, side, seed=seed)
        monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
        got = boxes(fast.crop, monkeypatch, fast, [data], [seed])[0]
        top, left, h, w, height, width = got
        dh, dw = decoded[-1]
        if min(h, w) < 224:  # the box is smaller than the output (an upscale): decoded at full size
            assert (dh, dw) == (height, width)
        else:
            assert h * dh / height >= 224 - 1e-6 and w * dw / width >= 224 - 1e-6
        if side == 512:
            assert dh < 512  # a 512 px image decodes reduced for a 224 px crop
    assert any(d[0] < 480 for d in decoded)


def test_the_decode_uses_the_simd_scales_and_rounds_the_box_onto_their_grid(monkeypatch):
    """Decodes at 1, 1/2, 1/4 or 1/8 only (libjpeg-turbo's other n/8 scales are slower than a full
    decode); the box's edges land on the nearest pixel of that grid and still cover the output."""
    import simplejpeg

    crop = library_transform().transforms[0]
    seen = set()
    for side, seed in [(230, 0), (300, 1), (448, 2), (512, 3), (700, 4), (900, 5), (1800, 6), (3600, 7)]:
        data = photo(side, side - 17, seed=seed)
        height, width = side - 17, side
        with seeded(seed):
            box = image_mod._crop_box(crop, height, width)
        pixels, (top, left, h, w) = image_mod.decoded_box(data, crop, box)
        d = round(height / pixels.shape[0])
        assert d in (1, 2, 4, 8) and pixels.shape[:2] == (-(-height // d), -(-width // d)), side
        seen.add(d)
        assert min(h, w) >= 224 or d == 1  # the reduced box still covers the output
        assert abs(top * d - box[0]) <= d / 2 and abs((top + h) * d - (box[0] + box[2])) <= d / 2
        assert abs(left * d - box[1]) <= d / 2 and abs((left + w) * d - (box[1] + box[3])) <= d / 2
        assert top + h <= pixels.shape[0] and left + w <= pixels.shape[1]
        if d == 1:
            assert (top, left, h, w) == box and pixels.shape[:2] == simplejpeg.decode_jpeg_header(data)[:2]
    assert seen == {1, 2, 4, 8}


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_the_tensor_resample_matches_pils_on_the_same_box(interpolation):
    """fast's tensor path (torch's uint8 kernels) against one PIL resample of the same decoded box."""
    from timm.data.transforms import MaybePILToTensor
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    lib = T.Compose([T.RandomResizedCrop(160, scale=(0.3, 1.0), interpolation=mode), MaybePILToTensor()])
    fast = training_image_transform(lib, "fast")
    assert fast.to_tensor
    for k, (w, h) in enumerate([(512, 384), (333, 250), (200, 260)]):
        data = photo(w, h, seed=k)
        with seeded(k):
            a = fast(data)
        with seeded(k):
            b = T.functional.pil_to_tensor(image_mod.fast_crop(data, fast.crop))
        with seeded(k):
            c = lib(decode_image(data)).float()
        with seeded(k):
            other = lib(decode_image(photo(w, h, seed=k + 10))).float()  # gives the bounds a meaning
        assert a.dtype == torch.uint8 and a.shape == (3, 160, 160)
        diff = (a.float() - b.float()).abs()
        assert diff.max() <= 3 and diff.mean() < 0.5, (interpolation, w, h, diff.max(), diff.mean())
        # against the exact crop: the reduced decode of this noisy photo (1/2 for the 512 px one) costs most
        assert (a.float() - c).abs().mean() < min(5.0, (other - c).abs().mean() / 10), (interpolation, w, h)


def test_later_steps_that_need_pil_run_on_the_pil_crop():
    from timm.data.transforms import MaybePILToTensor
    from torchvision import transforms as T

    jitter = T.Compose([T.RandomResizedCrop(64), T.ColorJitter(0.4), MaybePILToTensor()])
    fast = training_image_transform(jitter, "fast")
    assert not fast.to_tensor
    with seeded(0):
        out = fast(photo(120, 100))
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    crop_only = training_image_transform(T.Compose([T.RandomResizedCrop(64)]), "fast")
    assert not crop_only.to_tensor and isinstance(crop_only(photo(120, 100)), Image.Image)


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("WEBP", "RGB")])
def test_other_files_take_the_same_single_resample(fmt, mode):
    exact = library_transform(64)
    fast = training_image_transform(exact, "fast")
    data = photo(120, 96, fmt=fmt, mode=mode)
    with seeded(3):
        a = exact(decode_image(data)).float()
    with seeded(3):
        b = fast(data)
    assert b.shape == (3, 64, 64) and b.dtype == torch.uint8
    assert (a - b.float()).abs().mean() < 3


def test_a_truncated_jpeg_raises_inside_the_transform():
    fast = training_image_transform(library_transform(64), "fast")
    data = photo(200, 200)
    with pytest.raises((ValueError, OSError)):  # inside the stream's try: a counted skip
        fast(data[: len(data) // 3])


def test_transforms_that_do_not_start_with_a_random_resized_crop_are_left_alone():
    import open_clip

    val = open_clip.image_transform(224, is_train=False)
    assert training_image_transform(val, "fast") is val
    exact = library_transform()
    assert training_image_transform(exact, "exact") is exact


def test_gpu_refuses_steps_it_cannot_run_on_the_device():
    from timm.data.transforms import MaybePILToTensor
    from torchvision import transforms as T

    jitter = T.Compose([T.RandomResizedCrop(64), T.ColorJitter(0.4), MaybePILToTensor()])
    assert isinstance(training_image_transform(jitter, "fast"), FastResizedCrop)  # fast runs the jitter after
    with pytest.raises(ValueError, match="image_decode=fast"):
        training_image_transform(jitter, "gpu")


def test_gpu_without_cuda_falls_back_to_fast_with_a_message():
    with pytest.warns(UserWarning, match="CUDA is not available.*image_decode=fast"):
        assert resolve_mode("gpu", cuda=False) == "fast"
    assert resolve_mode("gpu", cuda=True) == "gpu"
    assert resolve_mode(None) == "fast"
    with pytest.raises(ValueError, match="exact, fast, gpu"):
        resolve_mode("turbo")


def test_the_datamodule_refuses_an_unknown_mode_when_built(tmp_path):
    from omegaconf import OmegaConf

    from mmpretrain.training.datamodule import ContrastiveDataModule

    shard = _jpeg_shard(tmp_path / "a.tar", n=2)
    cfg = OmegaConf.create({"sources": {"a": {"shards": shard}}, "batch_size": 2, "image_decode": "turbo"})
    with pytest.raises(ValueError, match="data.image_decode must be one of exact, fast, gpu, not 'turbo'"):
        ContrastiveDataModule(cfg, lambda train: {})


def test_gpu_byte_path_on_the_cpu_matches_the_exact_crop():
    exact = library_transform(96)
    dev = training_image_transform(exact, "gpu")
    assert isinstance(dev, DeviceResizedCrop)
    datas = [photo(160 + 8 * k, 140, seed=k) for k in range(4)] + [photo(120, 100, fmt="PNG")]
    rows, ref = [], []
    for k, data in enumerate(datas):
        with seeded(k):
            rows.append(pickle.loads(pickle.dumps(dev(data))))  # as a worker sends it
        with seeded(k):
            ref.append(exact(decode_image(data)))
    assert all(r.data is not None for r in rows[:4]) and rows[4].pixels is not None
    out = decode_images([*rows, None], "cpu")
    assert out.dtype == torch.uint8 and out.shape == (6, 3, 96, 96)
    assert out[5].eq(0).all()  # an absent image is zeros (its row is masked)
    for k in range(5):
        assert (out[k].float() - ref[k].float()).abs().mean() < 2.5, k


def _jpeg_shard(path, n=12):
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write({"__key__": f"s{i:03d}", "jpg": photo(140, 120, seed=i), "txt": f"caption {i}"})
    return str(path)


@pytest.mark.parametrize("workers", [0, 1])
def test_gpu_batches_carry_bytes_and_decode_on_the_device(tmp_path, workers):
    exact = library_transform(64)
    preprocess = {"image": training_image_transform(exact, "gpu"), "text": lambda t: torch.tensor([len(t)])}
    stream = ShardStream(
        [Source("a", [_jpeg_shard(tmp_path / "a.tar")])],
        preprocess,
        batch_size=4,
        train=True,
        batches_per_worker=2,
    )
    batch = next(iter(DataLoader(stream, batch_size=None, num_workers=workers)))
    assert isinstance(batch["image"], list) and all(isinstance(r, EncodedImage) for r in batch["image"])
    assert sum(len(r.data) for r in batch["image"]) < 4 * 3 * 64 * 64  # bytes, not pixels
    decode_on_device(batch, "cpu")
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.uint8
    # the same stream under exact gives the same crops (same seeds), to within resampling
    ref = ShardStream(
        [Source("a", [str(tmp_path / "a.tar")])],
        {"image": exact, "text": preprocess["text"]},
        batch_size=4,
        train=True,
        batches_per_worker=2,
    )
    ref_batch = next(iter(DataLoader(ref, batch_size=None, num_workers=workers)))
    assert (batch["image"].float() - ref_batch["image"].float()).abs().mean() < 2.5


def test_fast_mode_streams_bytes_to_the_transform(tmp_path):
    seen = []

    class Spy(FastResizedCrop):
        def __call__(self, data):
            seen.append(type(data))
            return super().__call__(data)

    fast = training_image_transform(library_transform(64), "fast")
    spy = Spy(fast.crop, fast.rest)
    stream = ShardStream(
        [Source("a", [_jpeg_shard(tmp_path / "a.tar")])],
        {"image": spy, "text": lambda t: torch.tensor([len(t)])},
        batch_size=4,
        train=True,
        batches_per_worker=1,
    )
    batch = next(iter(stream))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert bytes in seen  # the stream left the JPEG encoded: the transform decodes it reduced
    assert image_mod.FastResizedCrop.takes_bytes


def test_gpu_mode_trains_through_lightning_with_the_device_decode_on_the_cpu(tmp_path, monkeypatch):
    """The byte path end to end in a real `train` (CUDA's resolution patched so the mode stays gpu on
    this CPU): workers send EncodedImage rows, the datamodule's on_after_batch_transfer decodes them."""
    import math

    from mmpretrain.commands.train import train
    from mmpretrain.data.synthetic.scenes import build_scenes
    from mmpretrain.training import datamodule as dm_mod
    from tests.conftest import compose_config

    root = build_scenes(
        tmp_path / "scenes",
        workers=1,
        train=16,
        val=8,
        test=8,
        shard_size=8,
        image_size_min=80,
        image_size_max=112,
    )
    decoded = []

    def spy(batch, device):
        had = any(isinstance(v, list) and any(isinstance(r, EncodedImage) for r in v) for v in batch.values())
        out = decode_on_device(batch, device)
        decoded.append((had, tuple(out["image"].shape) if had else None))
        return out

    monkeypatch.setattr(dm_mod, "resolve_mode", lambda mode, cuda=None: resolve_mode(mode, cuda=True))
    monkeypatch.setattr(dm_mod, "decode_on_device", spy)
    cfg = compose_config(
        "train",
        [
            "experiment=scenes_clip",
            f"data.root={root}",
            "data.build=null",
            "data.image_decode=gpu",
            "data.batch_size=4",
            "data.num_workers=1",
            "model.config.vision_cfg.layers=1",
            "model.config.text_cfg.layers=1",
            "trainer.max_steps=2",
            "trainer.max_epochs=1",
            "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false",
            "callbacks.progress_bar=null",
            "callbacks.plots=null",
            "logger=csv",
            "export_at_end=false",
        ],
        run_dir=tmp_path / "run",
    )
    metrics = train(cfg)
    assert [d for d in decoded if d[0]] == [(True, (4, 3, 64, 64))] * 2
    assert math.isfinite(metrics["train/loss"])


def test_fast_crops_resume_exactly(tmp_path):
    """A stream of fast crops (reduced decodes included) resumed after k batches gives the very same
    crops as the run that never stopped: the box is drawn from the sample's seed, the decode is pure."""
    from tests.unit.test_fault_tolerance import epochs, loader, positions_after

    urls = []
    for s in range(4):
        with wds.TarWriter(str(tmp_path / f"j-{s}.tar")) as sink:
            for i in range(7 + s):
                data = photo(130 + 60 * ((s + i) % 3), 150, seed=10 * s + i)  # 1/2 decodes for the bigger
                sink.write({"__key__": f"j{s}{i:02d}", "jpg": data, "txt": f"caption {s} {i}"})
        urls.append(str(tmp_path / f"j-{s}.tar"))
    fast = training_image_transform(library_transform(64), "fast")
    full = epochs(loader(urls, 1, transform=fast), 2)
    k = 3
    dl = loader(urls, 1, start_batch=k, transform=fast, positions=positions_after(full, k))
    resumed = ([b for b in dl] + epochs(dl, 1))[: len(full) - k]
    assert len(resumed) == len(full) - k > 0
    assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[k:]]
    for a, b in zip(resumed, full[k:]):
        assert a["image"].dtype == torch.uint8 and torch.equal(a["image"], b["image"])
