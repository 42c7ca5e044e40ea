"""Video decoding with PyAV (FFmpeg bundled in its wheels): the ``mp4``/``webm``/``avi`` key of a sample.

Decoding runs in the data-loader workers in two steps, so only the frames a clip uses are converted:

1. :func:`decode_video` (the decoder registered for the ``video`` modality) opens the container and
   counts the video stream's packets (demuxing only, no decoding): a file that is not a video, or
   whose container is cut short before its index, fails here and is a counted skip.
2. :func:`read_frames` (called by the video tower's :class:`~mmpretrain.towers.video.VideoClip`
   once it has chosen the frame indices) decodes in order up to the last wanted frame and converts
   the wanted ones to ``uint8 [H, W, 3]`` RGB; a stream that stops before a wanted frame (a file
   truncated inside its frame data) raises :class:`CorruptVideoError`, also a counted skip.

:func:`decode_video_audio` reads the file's audio stream as ``(waveform [T, C] float32, rate)``,
what soundfile gives for a wav, so one ``mp4`` can feed the audio tower too (``data.modality_keys:
{audio: [mp4]}``); the audio tower's preprocessing resamples it as for any clip.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

VIDEO_EXTENSIONS = ("mp4", "webm", "avi")


class CorruptVideoError(ValueError):
    pass


@dataclass
class EncodedVideo:
    """A video's bytes and what the container says about them (no frame decoded yet)."""

    data: bytes
    num_frames: int
    fps: float
    width: int
    height: int

    def frames(self, indices: list[int]) -> np.ndarray:
        """:func:`read_frames` of this video."""
        return read_frames(self, indices)


def _open(data: bytes):
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as e:
        raise CorruptVideoError(f"not a readable video container ({e})") from e


def decode_video(data: bytes, ext: str = "mp4") -> EncodedVideo:
    """Open and index a video (demux only). Raises :class:`CorruptVideoError` for a bad file."""
    import av

    with _open(data) as container:
        if not container.streams.video:
            raise CorruptVideoError(f"the .{ext} file has no video stream")
        stream = container.streams.video[0]
        try:
            packets = [(p.pts, p.duration) for p in container.demux(stream) if p.size > 0]
        except av.error.FFmpegError as e:
            raise CorruptVideoError(f"the .{ext} file is corrupt ({e})") from e
        if not packets:
            raise CorruptVideoError(f"the .{ext} file has no video frames")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        _check_complete(container, stream, packets, fps, ext)
        return EncodedVideo(data, len(packets), fps, stream.width, stream.height)


def _check_complete(container, stream, packets: list, fps: float, ext: str) -> None:
    """A file cut short inside its frame data (a streaming container like webm opens fine): fewer
    frames than its header counts, or frames ending well before its header's duration."""
    if stream.frames and len(packets) < stream.frames:
        raise CorruptVideoError(f"the .{ext} file is truncated: {len(packets)} of its {stream.frames} frames")
    pts = [p for p, _ in packets if p is not None]
    if not pts or stream.time_base is None:
        return
    duration = stream.duration * stream.time_base if stream.duration else None
    if duration is None and container.duration and len(container.streams) == 1:
        duration = (
            container.duration / 1_000_000
        )  # the container's, in microseconds: only when it is the video's
    step = 1 / fps if fps else 0.0
    end = float(max(pts) * stream.time_base) + step
    if duration is not None and end < float(duration) - 1.5 * step:
        raise CorruptVideoError(
            f"the .{ext} file is truncated: its frames end at {end:.2f} s of its {float(duration):.2f} s"
        )


def read_frames(video: EncodedVideo, indices: list[int]) -> np.ndarray:
    """Frames ``indices`` (decode order, any order and repeats) as ``uint8 [len(indices), H, W, 3]``."""
    import av

    wanted = sorted(set(indices))
    last = wanted[-1]
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    from av.video.reformatter import VideoReformatter

    rgb = VideoReformatter()  # one conversion context for every frame (a frame's own is rebuilt each time)
    with _open(video.data) as container:
        stream = container.streams.video[0]
        if video.width * video.height >= 320 * 240:  # frame threads pay off only on larger frames
            stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in wanted:
                    frames[i] = rgb.reformat(frame, format="rgb24").to_ndarray()
                if i >= last:
                    break
        except av.error.FFmpegError as e:
            raise CorruptVideoError(f"video frame data is corrupt ({e})") from e
    if len(frames) < len(wanted):
        raise CorruptVideoError(
            f"frame {last} is wanted but the video decodes to {decoded} frames (its container lists "
            f"{video.num_frames}): it is truncated or corrupt"
        )
    return np.stack([frames[i] for i in indices])


def decode_video_audio(data: bytes, ext: str = "mp4") -> tuple[np.ndarray, int]:
    """The first audio stream as ``(waveform [T, C] float32 in [-1, 1], sample_rate)``."""
    import av

    with _open(data) as container:
        if not container.streams.audio:
            raise CorruptVideoError(
                f"the .{ext} file has no audio stream (data.modality_keys reads audio from it): give this "
                f"source modalities without audio, or shards whose videos carry sound"
            )
        stream = container.streams.audio[0]
        rate = stream.rate
        # One layout for every frame: float32, interleaved, the stream's own rate and channels.
        resampler = av.AudioResampler(format="flt", layout=stream.layout.name, rate=rate)
        chunks = []
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1, stream.channels))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1, stream.channels))
        except av.error.FFmpegError as e:
            raise CorruptVideoError(f"the .{ext} audio track is corrupt ({e})") from e
    if not chunks:
        raise CorruptVideoError(f"the .{ext} audio track has no samples")
    return np.concatenate(chunks).astype(np.float32), int(rate)


def encode_video(
    frames: np.ndarray,
    fps: int = 10,
    ext: str = "mp4",
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
) -> bytes:
    """``uint8 [T, H, W, 3]`` frames (H, W even) as an ``mp4`` (H.264), ``webm`` (VP8) or ``avi`` (MPEG-4)
    file, with an optional mono ``float32 [N]`` audio track (AAC / Opus / PCM): for tests and data builders.
    Every encoder and the muxer run with FFmpeg's ``bitexact`` flags and one thread, and no creation
    time is written, so the same input gives the same bytes (with the same PyAV/FFmpeg build)."""
    import av

    codecs = {"mp4": ("libx264", "aac"), "webm": ("libvpx", "libopus"), "avi": ("mpeg4", "pcm_s16le")}
    if ext not in codecs:
        raise ValueError(f"cannot write .{ext}; use one of {', '.join(codecs)}")
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames must be [T, H, W, 3] with even H and W (yuv420p), got {frames.shape}")
    video_codec, audio_codec = codecs[ext]
    bitexact = av.codec.context.Flags.bitexact
    buf = io.BytesIO()
    with av.open(
        buf,
        mode="w",
        format={"mp4": "mp4", "webm": "webm", "avi": "avi"}[ext],
        options={"fflags": "+bitexact"},
    ) as out:
        stream = out.add_stream(video_codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {
            "threads": "1",
            **{
                "libx264": {"preset": "ultrafast", "crf": "18"},
                "libvpx": {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "2M"},
            }.get(video_codec, {}),
        }
        stream.codec_context.flags |= bitexact
        astream = None
        if audio is not None:
            rate = 48000 if audio_codec == "libopus" else sample_rate
            astream = out.add_stream(
                audio_codec,
                rate=rate,
                layout="mono",
                options={"aac_coder": "fast"} if audio_codec == "aac" else {},
            )
            astream.codec_context.flags |= bitexact
            wave = np.asarray(audio, dtype=np.float32)
            if rate != sample_rate:
                from mmpretrain.towers.audio import resample

                wave = resample(wave, sample_rate, rate)
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if astream is not None:
            fmt = "s16" if audio_codec == "pcm_s16le" else "fltp"
            samples = (np.clip(wave, -1, 1) * 32767).astype(np.int16) if fmt == "s16" else wave
            step = 960 if audio_codec == "libopus" else 1024  # the codec's frame size: fed as is, fast
            for start in range(0, len(samples), step):
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(samples[None, start : start + step]), format=fmt, layout="mono"
                )
                frame.sample_rate, frame.pts = astream.rate, start
                for packet in astream.encode(frame):
                    out.mux(packet)
            for packet in astream.encode():
                out.mux(packet)
    return buf.getvalue()
