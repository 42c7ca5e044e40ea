"""Per-modality decoding of raw webdataset samples (bytes by extension) into Python values.

Conventions (README): image ``jpg|jpeg|png|webp``; text ``txt`` or ``json`` with a caption field;
audio ``flac|wav|mp3``; integer class ``cls``. Only these decoders run: webdataset's pickle and
torch decoders are never enabled, so a shard cannot execute code.
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable

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


def decode_cls(data: bytes) -> int:
    return int(data.decode("ascii").strip())


#: modality -> (extensions in priority order, decoder(bytes, ext) -> value)
DECODERS: dict[str, tuple[tuple[str, ...], Callable[..., Any]]] = {
    "image": (("jpg", "jpeg", "png", "webp"), lambda b, ext, **_: decode_image(b)),
    "text": (("txt", "json"), lambda b, ext, caption_field="caption", **_: decode_text(b, ext, caption_field)),
    "cls": (("cls",), lambda b, ext, **_: decode_cls(b)),
}


def register_decoder(modality: str, extensions: tuple[str, ...], fn: Callable[..., Any]) -> None:
    DECODERS[modality] = (extensions, fn)


def find_key(sample: dict[str, Any], extensions: tuple[str, ...]) -> str | None:
    for ext in extensions:
        if ext in sample:
            return ext
    return None


def decode_sample(
    sample: dict[str, Any], modalities: list[str], required: list[str], **options: Any
) -> dict[str, Any]:
    """Decode the wanted modalities; raise :class:`MissingKeyError` when a required one is absent."""
    out = {"__key__": sample.get("__key__"), "__url__": sample.get("__url__")}
    for modality in modalities:
        exts, fn = DECODERS[modality]
        ext = find_key(sample, exts)
        if ext is None:
            if modality in required:
                raise MissingKeyError(
                    f"sample '{sample.get('__key__')}' in {sample.get('__url__')} has no {modality} "
                    f"(looked for .{'/.'.join(exts)}; it has {sorted(k for k in sample if not k.startswith('__'))})"
                )
            continue
        out[modality] = fn(sample[ext], ext, **options)
    return out
