"""``mmpretrain data NAME out=DIR``: a bundled data set, or ``shards in=...`` for the user's own data."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def data(cfg: DictConfig) -> Path:
    """Build ``cfg.name`` into ``cfg.out`` with the options that builder takes; the directory written."""
    from mmpretrain.data.builders import build, options

    if cfg.name == "teacher-embeddings":
        return _teacher_embeddings(cfg)
    out = build(cfg.name, cfg.out, **options(cfg.name, cfg))
    print(f"wrote {cfg.name} to {out}")
    return out


def _teacher_embeddings(cfg: DictConfig) -> Path:
    """``mmpretrain data teacher-embeddings teacher=T in=SHARDS out=DIR model=... [data=...]``."""
    from mmpretrain.config import to_plain
    from mmpretrain.training.teacher_embeddings import build_teacher_embeddings

    if not cfg.get("teacher"):
        raise ValueError(
            "mmpretrain data teacher-embeddings needs teacher= (a checkpoint, export, NAME:TAG or hf-hub:)"
        )
    if not cfg.get("model"):
        raise ValueError(
            "mmpretrain data teacher-embeddings needs the student's model= (its training transform makes the "
            "augmentations the teacher embeds), e.g. model=openclip model.config=PATH.json"
        )
    data_cfg = to_plain(cfg.get("data")) or {}
    shards = cfg.get("in")
    if not shards:
        sources = [s for s in (data_cfg.get("sources") or {}).values() if s]
        if len(sources) != 1:
            raise ValueError("give in=SHARDS (a pattern or list of tar shards), or data= with one source")
        shards = sources[0]["shards"]
    return build_teacher_embeddings(
        cfg.teacher,
        to_plain(shards),
        cfg.out,
        to_plain(cfg.model),
        data_cfg,
        augmentations=int(cfg.get("augmentations") or 4),
        batch_size=int(cfg.get("batch_size") or 64),
    )
