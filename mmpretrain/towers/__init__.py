"""Tower families: one file each (``timm``, ``open_clip``, ``audio``, ``video`` with ``inflate``), one
interface (``base.Tower``); caption decoders reading a tower's tokens (``decoder``) and decoding with
them (``generation``); configs name a tower class by ``_target_`` (those paths are stored in
checkpoints and exports: they stay where they are).

May import ``io``, ``config``, ``pretrained`` and ``interop``; nothing else of ours, no Lightning or Hydra.
"""

from mmpretrain.towers.base import Tower

__all__ = ["Tower"]
