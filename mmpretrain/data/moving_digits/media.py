"""A clip's files: the frames as H.264 mp4 (yuv420p) with the spoken caption muxed in as AAC, and
the same speech as FLAC.

PyAV (FFmpeg) writes the mp4. Every encoder and the muxer run with FFmpeg's ``bitexact`` flags
and one thread, and no creation time is written, so the same frames and speech give the same
bytes (with the same PyAV/FFmpeg build).
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import soundfile as sf

VIDEO_CODEC = "libx264"
AUDIO_CODEC = "aac"


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


def encode_mp4(frames: np.ndarray, fps: int, speech: np.ndarray | None = None, sample_rate: int = 16000) -> bytes:
    """``frames`` [T, H, W, 3] uint8 (H and W even) and optional mono int16 ``speech`` -> mp4 bytes."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames must be [T, H, W, 3] with even H and W (yuv420p), got {frames.shape}")
    bitexact = av.codec.context.Flags.bitexact
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        video = container.add_stream(VIDEO_CODEC, rate=fps, options={"threads": "1", "crf": "20"})
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.codec_context.flags |= bitexact
        audio = None
        if speech is not None:
            audio = container.add_stream(AUDIO_CODEC, rate=sample_rate, options={"aac_coder": "fast"})
            audio.layout = "mono"
            audio.codec_context.flags |= bitexact
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(video.encode())
        if audio is not None:
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(speech.reshape(1, -1)), format="s16", layout="mono")
            chunk.sample_rate = sample_rate
            container.mux(audio.encode(chunk))
            container.mux(audio.encode())
    return buf.getvalue()
