"""A clip's speech as FLAC; ``mmpretrain.data.stream.video.encode_video`` writes the frames as H.264 mp4
(yuv420p) with that speech muxed in as AAC, byte-identical for the same input."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import soundfile as sf


def speech_flac(wav: bytes, sample_rate: int) -> tuple[bytes, np.ndarray]:
    """espeak-ng's wav (22.05 kHz) -> (FLAC bytes, int16 samples) at ``sample_rate``. Resampled
    with scipy here rather than ``towers.audio.resample``, whose package imports torch and timm
    (seconds in every worker process)."""
    wave, rate = sf.read(io.BytesIO(wav), dtype="float32")
    if rate != sample_rate:
        from scipy.signal import resample_poly

        ratio = Fraction(int(sample_rate), int(rate))
        wave = resample_poly(wave, ratio.numerator, ratio.denominator)
    samples = (np.clip(wave, -1.0, 1.0) * 32767.0).round().astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue(), samples
