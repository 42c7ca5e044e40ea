"""mmpretrain: CLIP-style contrastive pretraining across modalities.

Public API (no Lightning or Hydra needed): ``load_pretrained``, ``create_model``, ``list_towers``.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_pretrained(path, device="cpu"):
    """Load an exported model directory (``mmpretrain export``) with its transforms and tokenizer."""
    from mmpretrain.export import load_pretrained as _load

    return _load(path, device)


def create_model(config):
    """Build a ContrastiveModel from a model config dict (``towers``, ``embed_dim``, ...)."""
    from mmpretrain.model import build_model

    return build_model(config)


def list_towers() -> dict[str, str]:
    """Tower classes a config can name in ``_target_``."""
    return {
        "timm": "mmpretrain.towers.timm.TimmTower",
        "open_clip": "mmpretrain.towers.open_clip.OpenClipTower",
        "audio": "mmpretrain.towers.audio.AudioTower",
        "video": "mmpretrain.towers.video.VideoTower",
    }


__all__ = ["load_pretrained", "create_model", "list_towers", "__version__"]
