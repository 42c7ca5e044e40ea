"""Mixed-modality batches: masked InfoNCE equals the loss over only the complete rows; sources
with different modality subsets; a missing modality skipped (counted) or kept as a partial pair."""

import io

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from mmpretrain.data import ShardStream, Source
from mmpretrain.data.stream.collate import collate
from mmpretrain.losses import InfoNCE, clip_loss


def feats(n, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_masked_loss_equals_loss_over_valid_rows_and_its_gradient():
    a, b = feats(9, seed=1).requires_grad_(), feats(9, seed=2).requires_grad_()
    valid = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    scale = torch.tensor(7.0)
    masked = clip_loss(a, b, scale, valid=valid)
    (ga, gb) = torch.autograd.grad(masked, (a, b))
    a2, b2 = a.detach()[valid].requires_grad_(), b.detach()[valid].requires_grad_()
    ref = clip_loss(a2, b2, scale)
    ra, rb = torch.autograd.grad(ref, (a2, b2))
    assert torch.allclose(masked, ref, atol=1e-6)
    assert torch.allclose(ga[valid], ra, atol=1e-6) and torch.allclose(gb[valid], rb, atol=1e-6)
    assert ga[~valid].abs().max() == 0 and gb[~valid].abs().max() == 0


def test_no_valid_rows_gives_zero_loss_with_finite_gradients():
    a, b = feats(4, seed=3).requires_grad_(), feats(4, seed=4).requires_grad_()
    loss = clip_loss(a, b, torch.tensor(5.0), valid=torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(a.grad).all() and a.grad.abs().max() == 0


def test_infonce_uses_each_pairs_rows_and_temperature():
    f = {m: feats(6, seed=i) for i, m in enumerate(("image", "text", "audio"))}
    out = {f"{m}_features": v for m, v in f.items()}
    out |= {
        "image_mask": torch.tensor([1, 1, 1, 0, 0, 0]).bool(),
        "audio_mask": torch.tensor([0, 0, 1, 1, 1, 1]).bool(),
    }
    out |= {"logit_scale_image_text": torch.tensor(3.0), "logit_scale_audio_text": torch.tensor(9.0)}
    terms = InfoNCE(pairs=[["image", "text"], ["audio", "text"]], weights=[1.0, 0.5])(out)
    assert torch.allclose(
        terms["image_text_loss"], clip_loss(f["image"][:3], f["text"][:3], torch.tensor(3.0))
    )
    assert torch.allclose(
        terms["audio_text_loss"], 0.5 * clip_loss(f["audio"][2:], f["text"][2:], torch.tensor(9.0))
    )


def test_collate_fills_modalities_no_sample_has():
    samples = [{"text": torch.ones(3), "cls": 1}, {"text": torch.ones(3), "cls": 2}]
    out = collate(samples, fill={"audio": torch.zeros(5), "text": torch.zeros(3)})
    assert out["audio"].shape == (2, 5) and out["audio_mask"].tolist() == [False, False]
    assert "text_mask" not in out


def test_model_encodes_only_present_rows():
    from mmpretrain.model import build_model

    model = build_model(
        {
            "embed_dim": 8,
            "towers": {
                "image": {
                    "_target_": "mmpretrain.towers.timm.TimmTower",
                    "model_name": "test_resnet",
                    "img_size": 32,
                },
                "audio": {
                    "_target_": "mmpretrain.towers.audio.AudioTower",
                    "model_name": "test_resnet",
                    "clip_seconds": 0.25,
                    "frontend": {"n_mels": 16, "hop_length": 256},
                },
            },
        }
    ).eval()
    x = torch.randn(4, 3, 32, 32)
    mask = torch.tensor([True, False, True, True])
    out = model({"image": x, "image_mask": mask, "audio": torch.randn(4, 4000)})
    assert torch.allclose(out["image_features"][mask], model.encode_image(x[mask]), atol=1e-5)
    assert out["image_features"][1].abs().max() == 0 and "audio_mask" not in out


# -- the stream -----------------------------------------------------------------------------------
def png(v):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (v, v, v)).save(buf, format="PNG")
    return buf.getvalue()


def wav(n=800):
    buf = io.BytesIO()
    sf.write(buf, np.full(n, 0.1, dtype=np.float32), 8000, format="WAV")
    return buf.getvalue()


PREPROCESS = {
    "image": lambda img: torch.tensor([float(img.getpixel((0, 0))[0])]),
    "text": lambda t: torch.tensor([float(len(t))]),
    "audio": lambda a: torch.tensor([float(len(a[0])), float(a[1])]),
}


def write(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def test_sources_with_different_modalities_mix_by_weight(tmp_path):
    it = write(
        tmp_path / "it.tar",
        [{"__key__": f"i{i}", "png": png(i), "txt": "a" * i, "cls": "1"} for i in range(200)],
    )
    at = write(
        tmp_path / "at.tar",
        [{"__key__": f"a{i}", "wav": wav(), "txt": "b", "png": png(9), "cls": "2"} for i in range(200)],
    )
    sources = [
        Source("it", [it], weight=3.0, modalities=["image", "text", "cls"]),
        Source("at", [at], weight=1.0, modalities=["audio", "text", "cls"]),
    ]
    stream = ShardStream(
        sources, PREPROCESS, batch_size=20, train=True, batches_per_worker=5, shuffle_buffer=1
    )
    batches = list(stream)
    for b in batches:  # every batch carries every modality; masks say which rows have it
        assert {"image", "text", "audio"} <= set(b)
        is_audio = torch.tensor([k.startswith("a") for k in b["__key__"]])
        assert torch.equal(b["audio_mask"], is_audio) and torch.equal(b["image_mask"], ~is_audio)
        assert (b["image"][is_audio] == 0).all()  # the png of the audio source is not used
        assert "text_mask" not in b
    frac_image = sum(int(b["image_mask"].sum()) for b in batches) / 100
    assert 0.6 < frac_image < 0.9  # weight 3 : 1


@pytest.mark.parametrize("on_missing", ["skip", "partial"])
def test_missing_modality_is_skipped_or_kept_as_partial(tmp_path, on_missing):
    samples = [{"__key__": f"s{i}", "png": png(i), "txt": "cap", "wav": wav(), "cls": "0"} for i in range(10)]
    del samples[2]["wav"], samples[5]["png"], samples[7]["wav"]
    del samples[8]["png"], samples[8]["txt"], samples[8]["wav"]  # nothing left: always skipped
    url = write(tmp_path / "m.tar", samples)
    stream = ShardStream([Source("s", [url])], PREPROCESS, batch_size=4, train=False, on_missing=on_missing)
    batches = list(stream)
    keys = [k for b in batches for k in b["__key__"]]
    skipped = sum(int(b["__skipped__"]) for b in batches)
    if on_missing == "skip":
        assert skipped == 4 and set(keys) == {f"s{i}" for i in (0, 1, 3, 4, 6, 9)}
    else:
        assert skipped == 1 and len(keys) == 9
        audio_mask = torch.cat(
            [b.get("audio_mask", torch.ones(len(b["__key__"]), dtype=torch.bool)) for b in batches]
        )
        assert [k for k, m in zip(keys, audio_mask) if not m] == ["s2", "s7"]
        # The loss over such a batch runs: rows without both modalities drop out of that pair only.
        out = {
            f"{m}_features": F.normalize(torch.randn(len(keys), 4), dim=-1)
            for m in ("image", "text", "audio")
        }
        out |= {"audio_mask": audio_mask, "logit_scale": torch.tensor(10.0)}
        terms = InfoNCE(pairs=[["image", "text"], ["audio", "text"]])(out)
        assert torch.isfinite(terms["audio_text_loss"]) and torch.isfinite(terms["image_text_loss"])


def test_on_missing_must_be_known():
    with pytest.raises(ValueError, match="on_missing must be 'skip' or 'partial'"):
        ShardStream([Source("s", ["x.tar"])], PREPROCESS, batch_size=1, train=False, on_missing="drop")
