"""The one interface every tower implements.

A tower turns a batch of one modality into features ``[B, output_dim]``. It also owns the
preprocessing of a single raw sample (a PIL image, a caption string, a waveform) into the tensor
its ``forward`` takes, so data loaders never need to know which library built the tower.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class Tower(nn.Module):
    """Base class: subclasses set ``modality``, ``output_dim`` and ``has_projection``."""

    modality: str
    output_dim: int
    #: True when the tower already ends in a projection to the shared embedding dim (open_clip
    #: towers do); the model then adds none of its own.
    has_projection: bool = False

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        # The exact keyword arguments that rebuild this tower (without weights): exported as is.
        self.config = dict(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def preprocess(self, train: bool) -> Callable[[Any], torch.Tensor]:  # pragma: no cover
        """Callable mapping one decoded sample value to the tensor ``forward`` expects."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def set_channels_last(self, enable: bool = True) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no channels_last option (it is for CNN image towers: timm)")

    def param_groups(self) -> list[list[nn.Parameter]]:
        """Parameters in groups ordered input -> output (stem, blocks..., head)."""
        return [list(self.parameters())]

    def lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = False) -> None:
        """Freeze the tower except its last ``unlocked_groups`` parameter groups."""
        groups = self.param_groups()
        if unlocked_groups < 0:
            raise ValueError(f"lock.unlocked_groups must be >= 0, got {unlocked_groups}")
        frozen = groups[: max(0, len(groups) - unlocked_groups)]
        for group in frozen:
            for p in group:
                p.requires_grad_(False)
        self._freeze_norm_stats = freeze_norm_stats
        self.train(self.training)

    def train(self, mode: bool = True) -> "Tower":
        super().train(mode)
        if getattr(self, "_freeze_norm_stats", False):
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()  # running statistics stay as loaded
        return self
