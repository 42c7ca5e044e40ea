"""``mmpretrain data NAME out=DIR``: a bundled data set, or ``shards in=...`` for the user's own data.
``out=s3://...`` (any fsspec URL): built in a local staging folder, then uploaded (``sizes.json`` last)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def data(cfg: DictConfig) -> Path | str:
    """Build ``cfg.name`` into ``cfg.out`` with the options that builder takes; where it was written."""
    from mmpretrain import storage
    from mmpretrain.data.builders import build, options

    if cfg.name == "teacher-embeddings":
        return _teacher_embeddings(cfg)
    target = str(cfg.out)
    if not storage.is_remote(target):
        out = build(cfg.name, target, **options(cfg.name, cfg))
        print(f"wrote {cfg.name} to {out}")
        return out
    staging = storage.staging_dir(target)
    print(f"building {cfg.name} in {staging}, then uploading to {target}")
    build(cfg.name, staging, **options(cfg.name, cfg))
    n = storage.put_tree(staging, target)
    print(f"wrote {cfg.name} to {target} ({n} files uploaded)")
    return target


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
