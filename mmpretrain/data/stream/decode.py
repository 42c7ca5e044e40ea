"""Per-modality decoding of raw webdataset samples (bytes by extension) into Python values.

Conventions (README): image ``jpg|jpeg|png|webp``; text ``txt`` or ``json`` with a caption field;
audio ``flac|wav|mp3``; video ``mp4|webm|avi`` (PyAV, :mod:`mmpretrain.data.stream.video`); integer
class ``cls``. Text decodes to the sample's *captions*, a list: ``caption_keys`` are read in order,
a text key giving one caption and a json key its ``caption_field`` (a string, or a list of
captions); by default every caption of a json list (``mmpretrain data shards`` writes a file's
captions so, with the first as ``txt``), else the first of ``txt``, ``json``. The json may also
carry ``negatives`` (captions that do not match, with ``negative_kinds``) and ``labels``
(``{task: int}``, -1 where the task does not apply): :func:`read_meta` reads them. Only these
decoders run: webdataset's pickle and torch decoders are never enabled, so a shard cannot execute
code.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image


class MissingKeyError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()  # force full decode so truncated files fail here, inside the skip handler
    return img.convert("RGB")


def decode_text(data: bytes, ext: str, caption_field: str = "caption") -> str:
    if ext == "json":
        obj = json.loads(data)
        if caption_field not in obj:
            raise MissingKeyError(f"json has no '{caption_field}' field (set data.caption_field)")
        return str(obj[caption_field])
    return data.decode("utf-8").strip()


def decode_captions(
    sample: dict[str, Any], caption_keys: list[str] | None = None, caption_field: str = "caption"
) -> list[str] | None:
    """Every caption of ``sample`` from ``caption_keys`` in order (None when it has none of them).

    A key ending in ``json`` gives its ``caption_field``: one caption (a string) or several (a
    list). Without ``caption_keys``: ``json`` when its ``caption_field`` is a list, else the first
    of ``txt``/``json`` present (a json that does not parse is then read only without a txt)."""
    keys = list(caption_keys) if caption_keys else [_default_caption_key(sample, caption_field)]
    captions: list[str] = []
    found = False
    for key in keys:
        if key not in sample:
            continue
        found = True
        if key.endswith("json"):
            obj = _parsed_json(sample, key)
            if caption_field not in obj:
                raise MissingKeyError(f"{key} has no '{caption_field}' field (set data.caption_field)")
            value = obj[caption_field]
            captions += [str(c) for c in value] if isinstance(value, list) else [str(value)]
        else:
            captions.append(sample[key].decode("utf-8").strip())
    if found and not captions:
        raise MissingKeyError(f"sample '{sample.get('__key__')}' has an empty caption list")
    return captions if found else None


def _default_caption_key(sample: dict[str, Any], caption_field: str) -> str:
    if "json" in sample:
        try:
            obj = _parsed_json(sample, "json")
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get(caption_field), list):
            return "json"
    return next((k for k in ("txt", "json") if k in sample), "txt")


def read_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's json (negatives, negative_kinds, labels ...) as a dict; {} without one."""
    meta = _parsed_json(sample, "json") if "json" in sample else {}
    return meta if isinstance(meta, dict) else {}


def _parsed_json(sample: dict[str, Any], key: str) -> Any:
    """``sample[key]`` parsed, once per raw sample (captions and metadata both read the json)."""
    parsed = sample.setdefault("__parsed__", {})
    if key not in parsed:
        parsed[key] = json.loads(sample[key])
    return parsed[key]


def decode_audio(data: bytes, ext: str) -> tuple[np.ndarray, int]:
    """``(waveform [T, C] float32, sample_rate)`` via soundfile (libsndfile): flac, wav, mp3; the audio
    track of a video key (``data.modality_keys: {audio: [mp4]}``) via PyAV.

    mp3 needs libsndfile >= 1.1 (bundled with the soundfile >= 0.12 wheels); an older system
    library fails here with a message saying so instead of an opaque format error.
    """
    from mmpretrain.data.stream.video import VIDEO_EXTENSIONS, decode_video_audio

    if ext in VIDEO_EXTENSIONS:
        return decode_video_audio(data, ext)
    import soundfile as sf

    if ext == "mp3" and "MP3" not in sf.available_formats():
        raise UnsupportedAudioError(
            f"this libsndfile ({sf.__libsndfile_version__}) cannot decode mp3: install soundfile>=0.12 "
            f"(its wheels bundle libsndfile>=1.1 with mp3) or convert the audio to flac/wav"
        )
    wave, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return wave, int(sample_rate)


class UnsupportedAudioError(RuntimeError):
    pass


def decode_cls(data: bytes) -> int:
    return int(data.decode("ascii").strip())


#: modality -> (extensions in priority order, decoder(bytes, ext) -> value)
DECODERS: dict[str, tuple[tuple[str, ...], Callable[..., Any]]] = {
    "image": (("jpg", "jpeg", "png", "webp"), lambda b, ext, **_: decode_image(b)),
    "text": (
        ("txt", "json"),
        lambda b, ext, caption_field="caption", **_: decode_text(b, ext, caption_field),
    ),
    "audio": (("flac", "wav", "mp3"), lambda b, ext, **_: decode_audio(b, ext)),
    "cls": (("cls",), lambda b, ext, **_: decode_cls(b)),
    "video": (("mp4", "webm", "avi"), lambda b, ext, **_: _decode_video(b, ext)),
    "qa": (("json",), lambda b, ext, **_: _decode_qa(b)),  # the json's questions with answers (VQA)
}


def _decode_qa(data: bytes):
    from mmpretrain.data.stream.questions import decode_qa

    return decode_qa(data)


def _decode_video(data: bytes, ext: str):
    from mmpretrain.data.stream.video import decode_video

    return decode_video(data, ext)


DECODERS_TEXT = DECODERS["text"][1]  # text goes through decode_captions (a list) unless re-registered

#: modality -> a decoded value standing for "absent": its preprocessed tensor (zeroed) fills the
#: rows of a batch whose sample lacks the modality, so every batch carries the same keys.
BLANKS: dict[str, Callable[[], Any]] = {
    "image": lambda: Image.new("RGB", (8, 8)),
    "text": lambda: "",
    "audio": lambda: (np.zeros((160, 1), dtype=np.float32), 16000),
    "video": lambda: np.zeros((1, 8, 8, 3), dtype=np.uint8),  # frames [T, H, W, 3]: what VideoClip also takes
}


def register_decoder(
    modality: str, extensions: tuple[str, ...], fn: Callable[..., Any], blank: Callable[[], Any] | None = None
) -> None:
    DECODERS[modality] = (extensions, fn)
    if blank is not None:
        BLANKS[modality] = blank


def find_key(sample: dict[str, Any], extensions: tuple[str, ...]) -> str | None:
    for ext in extensions:
        if ext in sample:
            return ext
    return None


def decode_sample(
    sample: dict[str, Any], modalities: list[str], required: list[str], **options: Any
) -> dict[str, Any]:
    """Decode the wanted modalities; raise :class:`MissingKeyError` when a required one is absent.

    ``modality_keys`` (``{modality: [key, ...]}``, ``data.modality_keys``) adds keys a modality is also
    read from, after its own: ``{audio: [mp4]}`` takes the audio track of the video when the sample
    has no audio file. Modalities in ``raw`` keep their encoded bytes (their preprocess decodes them,
    e.g. :class:`~mmpretrain.data.stream.image.FastResizedCrop`)."""
    extra_keys = options.pop("modality_keys", None) or {}
    raw = options.pop("raw", None) or ()
    out = {"__key__": sample.get("__key__"), "__url__": sample.get("__url__")}
    for modality in modalities:
        exts, fn = DECODERS[modality]
        exts = (*exts, *extra_keys.get(modality, ()))
        if modality == "text" and fn is DECODERS_TEXT:
            captions = decode_captions(
                sample, options.get("caption_keys"), options.get("caption_field", "caption")
            )
            if captions is None and modality in required:
                raise MissingKeyError(
                    f"sample '{sample.get('__key__')}' in {sample.get('__url__')} has no text (looked for "
                    f"{options.get('caption_keys') or '.txt/.json'}; it has "
                    f"{sorted(k for k in sample if not k.startswith('__'))})"
                )
            if captions is not None:
                out[modality] = captions
            continue
        ext = find_key(sample, exts)
        if ext is None:
            if modality in required:
                raise MissingKeyError(
                    f"sample '{sample.get('__key__')}' in {sample.get('__url__')} has no {modality} "
                    f"(looked for .{'/.'.join(exts)}; it has "
                    f"{sorted(k for k in sample if not k.startswith('__'))})"
                )
            continue
        out[modality] = sample[ext] if modality in raw else fn(sample[ext], ext, **options)
    return out
