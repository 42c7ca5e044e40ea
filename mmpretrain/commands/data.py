"""``mmpretrain data NAME out=DIR``: a bundled data set, or ``shards in=...`` for the user's own data."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def data(cfg: DictConfig) -> Path:
    """Build ``cfg.name`` into ``cfg.out`` with the options that builder takes; the directory written."""
    from mmpretrain.data.builders import build, options

    out = build(cfg.name, cfg.out, **options(cfg.name, cfg))
    print(f"wrote {cfg.name} to {out}")
    return out
