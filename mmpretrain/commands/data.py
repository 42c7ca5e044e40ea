"""``mmpretrain data NAME out=DIR``: a bundled data set, or ``shards in=...`` for the user's own data.
``out=s3://...`` (any fsspec URL): built in a local staging folder, then uploaded (``sizes.json`` last)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def data(cfg: DictConfig) -> Path | str:
    """Build ``cfg.name`` into ``cfg.out`` with the options that builder takes; where it was written."""
    from mmpretrain import storage
    from mmpretrain.data.builders import build, options

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
