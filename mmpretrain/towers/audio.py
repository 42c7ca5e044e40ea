"""Audio tower: a log-mel front end (a module, so it runs batched on the accelerator) + a timm backbone.

``forward`` takes waveforms ``[B, samples]`` at ``sample_rate``; the front end turns them into
``[B, 1, n_mels, frames]`` log-mel spectrograms (optionally SpecAugment-masked in training), and
any ``timm.create_model`` name with ``in_chans=1`` encodes them. CNNs take any size; ViTs get
``model_kwargs.img_size: auto`` replaced by ``(n_mels, frames)``.

``preprocess(train)`` maps one decoded clip ``(waveform [T] or [T, C], sample_rate)`` to the
fixed-length mono waveform ``forward`` expects: channels averaged, resampled (polyphase, scipy),
then cropped or padded to ``clip_seconds`` — a random crop / random placement in training,
the centre in evaluation.

The mel filterbank is implemented here (Slaney or HTK mel scale, Slaney area normalisation or
none), checked against librosa in the tests; torchaudio is not used (it pins an older torch).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from mmpretrain.towers.base import Tower
from mmpretrain.towers.timm import load_local_weights, record_hub_architecture, timm_weights_wanted


# -- mel scale ------------------------------------------------------------------------------
def hz_to_mel(f: torch.Tensor, htk: bool = False) -> torch.Tensor:
    f = torch.as_tensor(f, dtype=torch.float64)
    if htk:
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    # Slaney (Auditory Toolbox): linear below 1 kHz, logarithmic above.
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    linear = f / f_sp
    log = min_log_mel + torch.log(torch.clamp(f, min=min_log_hz) / min_log_hz) / logstep
    return torch.where(f >= min_log_hz, log, linear)


def mel_to_hz(m: torch.Tensor, htk: bool = False) -> torch.Tensor:
    m = torch.as_tensor(m, dtype=torch.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    htk: bool = False,
    norm: str | None = "slaney",
) -> torch.Tensor:
    """``[n_mels, n_fft // 2 + 1]`` triangular filters, centres evenly spaced on the mel scale."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(
            f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={f_min} f_max={f_max} sr={sample_rate}"
        )
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    # n_mels + 2 edges: filter i rises from edge i to edge i+1 and falls to edge i+2.
    mels = torch.linspace(
        hz_to_mel(f_min, htk).item(), hz_to_mel(f_max, htk).item(), n_mels + 2, dtype=torch.float64
    )
    edges = mel_to_hz(mels, htk)
    width = edges.diff()
    rising = (fft_hz[None, :] - edges[:-2, None]) / width[:-1, None]
    falling = (edges[2:, None] - fft_hz[None, :]) / width[1:, None]
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)
    if norm == "slaney":  # constant energy per filter: divide by the width of its band in Hz
        fb = fb * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    elif norm not in (None, "none"):
        raise ValueError(f"mel norm must be 'slaney' or null, not '{norm}'")
    return fb.float()


class LogMel(nn.Module):
    """Waveform ``[B, T]`` -> log-mel ``[B, 1, n_mels, frames]`` (power spectrogram, dB or ln).

    ``normalize``: ``instance`` (each spectrogram to zero mean, unit std), ``fixed`` (subtract
    ``mean``, divide by ``std``, e.g. dataset statistics) or ``none``.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 512,
        win_length: int | None = None,
        hop_length: int = 160,
        n_mels: int = 64,
        f_min: float = 0.0,
        f_max: float | None = None,
        mel_scale: str = "slaney",
        mel_norm: str | None = "slaney",
        power: float = 2.0,
        log: str = "db",
        amin: float = 1e-10,
        top_db: float | None = None,
        normalize: str = "instance",
        mean: float = 0.0,
        std: float = 1.0,
        center: bool = True,
    ):
        super().__init__()
        if mel_scale not in ("slaney", "htk"):
            raise ValueError(f"mel_scale must be 'slaney' or 'htk', not '{mel_scale}'")
        if log not in ("db", "ln", "none"):
            raise ValueError(f"log must be 'db', 'ln' or 'none', not '{log}'")
        if normalize not in ("instance", "fixed", "none"):
            raise ValueError(f"normalize must be 'instance', 'fixed' or 'none', not '{normalize}'")
        self.n_fft, self.hop_length = n_fft, hop_length
        self.win_length = win_length or n_fft
        self.n_mels, self.power, self.center = n_mels, power, center
        self.log, self.amin, self.top_db = log, amin, top_db
        self.normalize, self.mean, self.std = normalize, mean, std
        # Buffers, not parameters: they move with the module but are not trained or exported.
        self.register_buffer("window", torch.hann_window(self.win_length), persistent=False)
        fb = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, htk=mel_scale == "htk", norm=mel_norm)
        self.register_buffer("filterbank", fb, persistent=False)

    def frames(self, num_samples: int) -> int:
        if self.center:
            return 1 + num_samples // self.hop_length
        return 1 + (num_samples - self.n_fft) // self.hop_length

    def mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Mel power spectrogram ``[B, n_mels, frames]`` (before the log)."""
        spec = torch.stft(
            wave.float(),
            self.n_fft,
            self.hop_length,
            self.win_length,
            self.window,
            center=self.center,
            pad_mode="constant",
            return_complex=True,
        )
        return self.filterbank @ spec.abs().pow(self.power)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        mel = self.mel(wave)
        if self.log == "db":
            mel = 10.0 * torch.log10(torch.clamp(mel, min=self.amin))
        elif self.log == "ln":
            mel = torch.log(torch.clamp(mel, min=self.amin))
        if self.top_db is not None and self.log != "none":
            floor = mel.amax(dim=(-2, -1), keepdim=True) - self.top_db * (
                1.0 if self.log == "db" else math.log(10) / 10
            )
            mel = torch.maximum(mel, floor)
        if self.normalize == "instance":
            mean = mel.mean(dim=(-2, -1), keepdim=True)
            std = mel.std(dim=(-2, -1), keepdim=True)
            mel = (mel - mean) / (std + 1e-5)
        elif self.normalize == "fixed":
            mel = (mel - self.mean) / self.std
        return mel.unsqueeze(1)


class SpecAugment(nn.Module):
    """Time and frequency masking (Park et al. 2019) of ``[B, 1, F, T]``, per example, train only.

    Each of ``freq_masks`` masks zeroes ``[f0, f0 + f)`` mel bins with ``f ~ U[0, freq_width]``;
    likewise ``time_masks`` over frames. Zero is the mean after instance normalisation.
    """

    def __init__(self, freq_masks: int = 2, freq_width: int = 8, time_masks: int = 2, time_width: int = 10):
        super().__init__()
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width

    def _mask(self, x: torch.Tensor, dim: int, count: int, width: int) -> torch.Tensor:
        size = x.shape[dim]
        if count == 0 or width == 0:
            return x
        b = x.shape[0]
        w = torch.randint(0, width + 1, (b, count, 1), device=x.device)
        start = (torch.rand(b, count, 1, device=x.device) * (size - w + 1).clamp(min=1)).long()
        pos = torch.arange(size, device=x.device)
        masked = ((pos >= start) & (pos < start + w)).any(dim=1)  # [B, size]
        shape = [b, 1, 1, 1]
        shape[dim] = size
        return x.masked_fill(masked.view(shape), 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        x = self._mask(x, 2, self.freq_masks, self.freq_width)
        return self._mask(x, 3, self.time_masks, self.time_width)


# -- per-sample preprocessing (runs in data-loader workers) ------------------------------------
def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling of ``[T]`` (scipy's resample_poly, anti-aliased)."""
    if orig_sr == target_sr:
        return wave
    from scipy.signal import resample_poly

    ratio = Fraction(int(target_sr), int(orig_sr))
    return resample_poly(wave, ratio.numerator, ratio.denominator).astype(np.float32)


class AudioClip:
    """Picklable: ``(waveform, sample_rate)`` -> mono float32 tensor of exactly ``num_samples``.

    Longer clips: random crop (train) or centre crop (eval). Shorter clips: ``pad`` = ``zero``
    (train: placed at a random offset; eval: centred) or ``repeat`` (tiled, then cropped).
    """

    def __init__(self, sample_rate: int, num_samples: int, train: bool, pad: str = "zero"):
        if pad not in ("zero", "repeat"):
            raise ValueError(f"audio pad must be 'zero' or 'repeat', not '{pad}'")
        self.sample_rate, self.num_samples, self.train, self.pad = sample_rate, num_samples, train, pad

    def __call__(self, decoded: Any) -> torch.Tensor:
        if isinstance(decoded, torch.Tensor):  # already a waveform at the tower's rate
            wave, sr = decoded.numpy(), self.sample_rate
        else:
            wave, sr = decoded
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim == 2:  # [T, C] as soundfile returns it
            wave = wave.mean(axis=1)
        wave = resample(wave, int(sr), self.sample_rate)
        n = self.num_samples
        if len(wave) == 0:
            return torch.zeros(n)
        if len(wave) < n and self.pad == "repeat":
            wave = np.tile(wave, math.ceil(n / len(wave)))
        if len(wave) >= n:
            start = random.randint(0, len(wave) - n) if self.train else (len(wave) - n) // 2
            return torch.from_numpy(np.ascontiguousarray(wave[start : start + n]))
        out = np.zeros(n, dtype=np.float32)
        start = random.randint(0, n - len(wave)) if self.train else (n - len(wave)) // 2
        out[start : start + len(wave)] = wave
        return torch.from_numpy(out)


class AudioTower(Tower):
    """Log-mel front end + any timm backbone over the 1-channel spectrogram."""

    def __init__(
        self,
        model_name: str,
        modality: str = "audio",
        sample_rate: int = 16000,
        clip_seconds: float = 1.0,
        pad: str = "zero",
        frontend: dict[str, Any] | None = None,
        spec_augment: dict[str, Any] | None = None,
        pretrained_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool | None = None,
        pretrained_cfg: dict[str, Any] | None = None,
    ):
        """``pretrained=True`` or ``model_name=hf-hub:ORG/REPO``: timm's weights, first conv summed to 1
        channel (``pretrained_cfg``: what the hub said of them, recorded for a rebuild)."""
        super().__init__(
            {
                "_target_": f"{__name__}.AudioTower",
                "model_name": model_name,
                "modality": modality,
                "sample_rate": sample_rate,
                "clip_seconds": clip_seconds,
                "pad": pad,
                "frontend": dict(frontend or {}),
                "spec_augment": dict(spec_augment) if spec_augment else None,
                "model_kwargs": dict(model_kwargs or {}),
            }
        )
        pretrained = timm_weights_wanted(self.config, model_name, pretrained, pretrained_path)
        self.modality = modality
        self.sample_rate, self.pad = int(sample_rate), pad
        self.num_samples = round(clip_seconds * sample_rate)
        self.frontend = LogMel(sample_rate=self.sample_rate, **dict(frontend or {}))
        self.spec_augment = SpecAugment(**spec_augment) if spec_augment else nn.Identity()
        kwargs = dict(model_kwargs or {})
        if kwargs.get("img_size") == "auto":  # ViT-style models: the spectrogram's exact size
            kwargs["img_size"] = self.input_shape
        self.model = timm.create_model(
            model_name,
            pretrained=pretrained and not pretrained_path,
            num_classes=0,
            in_chans=1,
            pretrained_cfg=pretrained_cfg,
            **kwargs,
        )
        if pretrained_cfg:
            self.config["pretrained_cfg"] = dict(pretrained_cfg)
        record_hub_architecture(self.config, model_name, kwargs)
        if pretrained_path:
            load_local_weights(self.model, pretrained_path)
        self.output_dim = self.model.num_features

    @property
    def input_shape(self) -> tuple[int, int]:
        """``(n_mels, frames)`` of one clip's spectrogram."""
        return (self.frontend.n_mels, self.frontend.frames(self.num_samples))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.model(self.spec_augment(self.frontend(wave)))

    def preprocess(self, train: bool) -> Callable[[Any], torch.Tensor]:
        return AudioClip(self.sample_rate, self.num_samples, train, self.pad)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def param_groups(self):
        from timm.models import group_parameters

        matcher = self.model.group_matcher(coarse=True)
        named = dict(self.model.named_parameters())
        grouped = group_parameters(self.model, matcher, reverse=False)
        return [[named[n] for n in names] for _, names in sorted(grouped.items())]
