"""Tower families. Each file exposes one :class:`Tower` subclass; configs name it by ``_target_``."""

from mmpretrain.towers.base import Tower

__all__ = ["Tower"]
