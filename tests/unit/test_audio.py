"""Audio tower: mel filterbank and log-mel vs librosa, clip preprocessing, SpecAugment, decoding."""

import io

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from mmpretrain.data.stream.decode import decode_sample
from mmpretrain.towers.audio import AudioClip, AudioTower, LogMel, SpecAugment, mel_filterbank


@pytest.mark.parametrize("htk", [False, True])
@pytest.mark.parametrize("norm", ["slaney", None])
@pytest.mark.parametrize(
    "sr,n_fft,n_mels,f_min,f_max",
    [(16000, 512, 64, 0.0, None), (22050, 2048, 128, 50.0, 8000.0), (16000, 400, 40, 20.0, 7600.0)],
)
def test_mel_filterbank_matches_librosa(htk, norm, sr, n_fft, n_mels, f_min, f_max):
    ours = mel_filterbank(sr, n_fft, n_mels, f_min, f_max, htk=htk, norm=norm).double().numpy()
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max, htk=htk, norm=norm)
    assert ours.shape == ref.shape
    # measured <= 5e-8 of the peak (float32 output rounding); mel points in float32 already gave 1e-5
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def sine(freq=440.0, sr=16000, seconds=1.0):
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_log_mel_matches_librosa_on_a_sine():
    x = sine(440.0) + sine(3000.0) * 0.3
    ref = librosa.feature.melspectrogram(y=x, sr=16000, n_fft=512, hop_length=160, n_mels=64)
    frontend = LogMel(16000, n_fft=512, hop_length=160, n_mels=64, log="none", normalize="none")
    power = frontend(torch.from_numpy(x)[None])[0, 0].double().numpy()
    assert power.shape == ref.shape == (64, frontend.frames(len(x)))
    np.testing.assert_allclose(power, ref, rtol=0, atol=1e-5 * ref.max())
    db = LogMel(16000, n_fft=512, hop_length=160, n_mels=64, log="db", normalize="none", top_db=80.0)
    ref_db = librosa.power_to_db(ref, ref=1.0, amin=1e-10, top_db=80.0)
    np.testing.assert_allclose(db(torch.from_numpy(x)[None])[0, 0].numpy(), ref_db, atol=0.05)
    # The loudest band is the one holding 440 Hz.
    centres = librosa.mel_frequencies(66, fmin=0, fmax=8000)[1:-1]
    assert abs(centres[power.mean(1).argmax()] - 440) < 60


def test_instance_normalisation_and_bad_options():
    mel = LogMel(16000, n_mels=32)(torch.randn(3, 8000))
    assert torch.allclose(mel.mean(dim=(-2, -1)), torch.zeros(3, 1), atol=1e-4)
    assert torch.allclose(mel.std(dim=(-2, -1)), torch.ones(3, 1), atol=1e-3)
    with pytest.raises(ValueError, match="normalize must be"):
        LogMel(normalize="batch")
    with pytest.raises(ValueError, match="f_max <= sample_rate/2"):
        mel_filterbank(16000, 512, 64, 0, 9000)


def test_clip_crop_pad_and_resample():
    long = np.arange(30000, dtype=np.float32)
    centre = AudioClip(16000, 16000, train=False)((long, 16000))
    assert centre.shape == (16000,) and centre[0] == 7000  # (30000 - 16000) // 2
    crops = {int(AudioClip(16000, 16000, train=True)((long, 16000))[0]) for _ in range(20)}
    assert len(crops) > 1 and all(0 <= c <= 14000 for c in crops)
    short = np.ones(4000, dtype=np.float32)
    padded = AudioClip(16000, 16000, train=False)((short, 16000))
    assert padded.sum() == 4000 and padded[6000:10000].eq(1).all()  # centred
    repeated = AudioClip(16000, 16000, train=False, pad="repeat")((short, 16000))
    assert repeated.eq(1).all()
    stereo = np.stack([np.ones(22050), -np.ones(22050) * 0.5], axis=1).astype(np.float32)  # [T, C]
    mono = AudioClip(16000, 16000, train=False)((stereo, 22050))
    assert mono.shape == (16000,) and torch.allclose(mono[100:-100], torch.full((15800,), 0.25), atol=1e-3)
    # Resampling keeps the frequency: a 1 kHz tone at 44.1 kHz peaks at 1 kHz at 16 kHz.
    tone = AudioClip(16000, 16000, train=False)((sine(1000.0, 44100), 44100)).numpy()
    assert abs(np.fft.rfftfreq(16000, 1 / 16000)[np.abs(np.fft.rfft(tone)).argmax()] - 1000) <= 1


def test_spec_augment_masks_only_in_training():
    aug = SpecAugment(freq_masks=2, freq_width=8, time_masks=2, time_width=10)
    x = torch.ones(16, 1, 64, 100)
    assert torch.equal(aug.eval()(x), x)
    y = aug.train()(x)
    zero_rows = (y == 0).all(dim=3).sum(dim=(1, 2))  # masked mel bins per example
    assert 0 < (y == 0).float().mean() < 0.5
    assert zero_rows.max() <= 16 and (y == 0).any(dim=(1, 2, 3)).sum() > 8


def test_audio_tower_cnn_and_vit():
    tower = AudioTower(
        "resnet10t", frontend={"n_mels": 32, "hop_length": 256}, spec_augment={"freq_masks": 1}
    )
    wave = tower.preprocess(train=True)((np.random.randn(20000).astype(np.float32), 16000))
    assert wave.shape == (16000,)
    assert tower(torch.stack([wave, wave])).shape == (2, tower.output_dim)
    assert tower.input_shape == (32, 63)
    vit = AudioTower(
        "vit_tiny_patch16_224",
        clip_seconds=0.96,
        frontend={"n_mels": 32, "hop_length": 160},
        model_kwargs={"img_size": "auto", "depth": 1},
    )
    assert vit.model.patch_embed.img_size == (32, 97)
    assert vit(torch.randn(2, vit.num_samples)).shape == (2, 192)
    assert len(vit.param_groups()) > 1


@pytest.mark.parametrize("fmt,ext", [("WAV", "wav"), ("FLAC", "flac"), ("MP3", "mp3")])
def test_decode_audio_formats(fmt, ext):
    x = sine(440.0, 22050, 0.5)
    buf = io.BytesIO()
    sf.write(buf, np.stack([x, x], 1), 22050, format=fmt)
    sample = decode_sample({"__key__": "k", ext: buf.getvalue()}, ["audio"], ["audio"])
    wave, sr = sample["audio"]
    assert sr == 22050 and wave.shape[1] == 2
    n = min(len(wave), len(x))
    if fmt != "MP3":  # lossless: exact up to 16-bit quantisation
        np.testing.assert_allclose(wave[:n, 0], x[:n], atol=1e-4)
    else:  # mp3 has encoder delay: compare the spectrum peak
        assert abs(np.fft.rfftfreq(len(wave), 1 / sr)[np.abs(np.fft.rfft(wave[:, 0])).argmax()] - 440) < 5
