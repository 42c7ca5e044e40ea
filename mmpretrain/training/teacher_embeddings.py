"""``mmpretrain data teacher-embeddings teacher=... in=SHARDS out=DIR model=...``: the shards again, each
sample with the teacher's embeddings of K augmentations and of every caption (:mod:`teacher_cache`).

The augmentations are the student's training transform (``model=``, the student's towers) under the
seeds a ``distill.cached=true`` stream uses, and the teacher embeds them as online distillation
does (the student's crop at the teacher's size, the student's token ids), so a cached run's loss is
the online run's. Samples that fail to decode are left out of the output, counted and reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpretrain.data.convert.writing import write_shard
from mmpretrain.data.stream import teacher_cache
from mmpretrain.data.stream.decode import decode_captions
from mmpretrain.data.stream.pipeline import ShardStream
from mmpretrain.data.stream.shards import Source, expand_shards, write_sizes
from mmpretrain.data.stream.tar_reader import read_samples
from mmpretrain.losses.pairs import logit_scale_for
from mmpretrain.model import build_model, weights_free
from mmpretrain.training.distill import _context_length, _resize, image_size, load_teacher


@torch.no_grad()
def build_teacher_embeddings(
    teacher: str,
    shards: str | list[str],
    out: str | Path,
    model_cfg: dict[str, Any],
    data_cfg: dict[str, Any] | None = None,
    augmentations: int = 4,
    batch_size: int = 64,
    device: str | None = None,
) -> Path:
    """Write ``out/<shard name>`` for every shard of ``shards`` (and ``out/sizes.json``); the directory."""
    if int(augmentations) < 1:
        raise ValueError(f"augmentations must be >= 1, got {augmentations}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher_model = load_teacher(teacher).to(device)
    student = build_model(weights_free(model_cfg))  # only its preprocessing is used
    missing = [m for m in ("image", "text") if m not in student.towers or m not in teacher_model.towers]
    if missing:
        raise ValueError(
            f"teacher-embeddings needs image and text towers in student and teacher; missing {missing}"
        )
    data_cfg = dict(data_cfg or {})
    preprocess = student.preprocess(True)
    stream = ShardStream(
        [Source("in", [])],
        {"image": preprocess["image"]},
        batch_size=1,
        train=True,
        caption_field=data_cfg.get("caption_field", "caption"),
        caption_keys=data_cfg.get("caption_keys"),
        modality_keys=data_cfg.get("modality_keys"),
        teacher_augmentations=int(augmentations),
    )
    tokenize = preprocess["text"]
    scale = float(logit_scale_for(teacher_model.logit_scale_outputs(), "image", "text"))
    size, context = image_size(teacher_model.towers["image"]), None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    urls = expand_shards(shards)
    skipped, written = 0, {}
    for url in urls:
        samples, crops, captions = [], [], []
        for _, _, raw in read_samples(url, on_error=lambda exn: None):
            raw = dict(raw, __url__=url)
            try:
                texts = decode_captions(raw, stream.caption_keys, stream.caption_field) or []
                views = [
                    stream._process(dict(raw), stream.sources[0], None, a)["image"]
                    for a in range(augmentations)
                ]
            except Exception as exn:  # noqa: BLE001 - a sample the stream would skip is left out
                skipped += 1
                print(f"skipped sample '{raw.get('__key__')}' in {url}: {exn}")
                continue
            samples.append(raw)
            crops.append(torch.stack(views))
            captions.append([tokenize(t) for t in texts])
        image = _embed_images(teacher_model, crops, size, batch_size, device)
        tokens = [t for per in captions for t in per]
        context = context or _context_length(teacher_model.towers["text"], 10**9)
        text = _embed_texts(teacher_model, tokens, context, batch_size, device)
        rows, at = [], 0
        for i, raw in enumerate(samples):
            n = len(captions[i])
            member = teacher_cache.encode(image[i], text[at : at + n], scale)
            at += n
            rows.append(
                {k: v for k, v in raw.items() if not k.startswith("__")}
                | {"__key__": raw["__key__"], teacher_cache.MEMBER: member}
            )
        name = Path(url).name
        written[name] = write_shard(out / name, rows)
        print(f"{name}: {written[name]} samples x {augmentations} augmentations")
    write_sizes(out, written)
    print(f"teacher embeddings of {sum(written.values())} samples in {out} ({skipped} skipped)")
    return out


def _embed_images(teacher, crops: list[torch.Tensor], size, batch_size: int, device) -> np.ndarray:
    """``[samples, K, D]``: the teacher's embedding of each crop at its own size."""
    if not crops:
        return np.zeros((0, 0, 0), np.float32)
    flat = torch.cat(crops)
    feats = [
        teacher.encode("image", _resize(flat[i : i + batch_size].to(device), size)).float().cpu()
        for i in range(0, len(flat), batch_size)
    ]
    return torch.cat(feats).view(len(crops), crops[0].shape[0], -1).numpy()


def _embed_texts(teacher, tokens: list[torch.Tensor], context: int, batch_size: int, device) -> np.ndarray:
    """``[captions, D]``: each caption's token ids (the student's, cut to the teacher's context)."""
    text_tower = teacher.towers["text"]
    out = []
    for i in range(0, len(tokens), batch_size):
        batch = text_tower.trim_input(torch.stack(tokens[i : i + batch_size])[:, :context])
        out.append(teacher.encode("text", batch.to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
