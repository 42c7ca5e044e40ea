"""The one interface every tower implements.

A tower turns a batch of one modality into features ``[B, output_dim]``. It also owns the
preprocessing of a single raw sample (a PIL image, a caption string, a waveform) into the tensor
its ``forward`` takes, so data loaders never need to know which library built the tower.

Images travel as uint8: an image tower's ``preprocess`` does everything its library's transform
does (resize, crop, flip, colour jitter) except the final float conversion and normalisation, and
returns a ``uint8 [C, H, W]`` tensor, a quarter of the float32 bytes in the data loader's shared
memory and host-to-device copies. The tower's ``forward`` normalises on the device as its first
step (:class:`ImageNormalize`, the same arithmetic and mean/std as the library's ``ToTensor`` +
``Normalize``). The contract of an image tower's ``forward``:

- ``uint8`` input: raw pixels in ``[0, 255]``; the tower scales and normalises them.
- floating-point input: already normalised (the library's own float transform, e.g. open_clip's
  ``preprocess``, or a transform of the user's); taken as is, never normalised twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

#: Batch-statistics normalisation layers (timm's BatchNormAct2d and the lazy variants subclass these).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

#: Per-tower keys of a model config that configure training, not the architecture (not exported).
TRAINING_OPTIONS = ("lock", "lr_scale", "grad_checkpointing", "channels_last", "patch_dropout")


def check_patch_dropout(prob: float) -> None:
    """Refuse a ``patch_dropout`` outside [0, 1)."""
    if not 0 <= prob < 1:
        raise ValueError(f"patch_dropout is the fraction of patches dropped, in [0, 1); got {prob}")


class ImageNormalize(nn.Module):
    """``uint8 [B, C, H, W]`` pixels -> float ``(x / 255 - mean) / std``; floating input passes through.

    The same operations, in the same order and precision (float32), as torchvision's ``ToTensor`` +
    ``Normalize``, so the result is what the library's float transform gives. ``mean``/``std`` are
    non-persistent buffers: they move with the tower but are no part of its state dict (exports and
    open_clip interop are unchanged). Under a low-precision model (``bf16-true``) the buffers are
    cast with it; the arithmetic stays float32 and only the result takes the tower's dtype.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer(
            "mean", torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        out = x.float().div(255).sub(self.mean.float()).div(self.std.float())
        return out.to(self.mean.dtype)


def uint8_transform(transform: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
    """A library's float image transform (a torchvision ``Compose`` ending ``ToTensor, Normalize``) with
    that ending replaced by a PIL -> ``uint8 [C, H, W]`` conversion; the tower normalises instead.

    The caller builds ``transform`` with the same mean/std as its :class:`ImageNormalize`. A transform
    that does not end that way (e.g. timm's RandomErasing, which works on normalised floats, runs
    after ``Normalize``) is returned unchanged: it keeps producing normalised floats, which the tower
    takes as they are.
    """
    from timm.data.transforms import MaybePILToTensor
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-1], T.Normalize):
        return transform
    if type(steps[-2]).__name__ not in ("ToTensor", "MaybeToTensor"):
        return transform
    return T.Compose([*steps[:-2], MaybePILToTensor()])


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

    def forward_with_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(x)`` and the tower's token features ``[B, N, C]`` from the same pass (what a caption
        decoder cross-attends to). The default, for a tower without tokens: its pooled output as one."""
        pooled = self(x)
        return pooled, pooled[:, None]

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """What ``forward`` does to its input before the encoder (for code that calls the encoder
        itself, e.g. for token features): uint8 images normalised, anything else unchanged.
        Image towers own an :class:`ImageNormalize` as ``self.input_norm``."""
        norm = self._modules.get("input_norm")
        return norm(x) if norm is not None else x

    def trim_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs cut to the part that can change the output, or ``x`` itself (the
        default). Called on the host before the batch moves to its device, so it may read values
        without a device sync: text towers that cannot see padding drop the trailing columns that
        are padding in every row (see :class:`~mmpretrain.towers.open_clip.OpenClipTower`)."""
        return x

    def preprocess(self, train: bool) -> Callable[[Any], torch.Tensor]:  # pragma: no cover
        """Callable mapping one decoded sample value to the tensor ``forward`` expects (image
        towers: ``uint8 [C, H, W]``, see the module docstring)."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def set_channels_last(self, enable: bool = True) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} has no channels_last option (it is for CNN image towers: timm)"
        )

    def set_patch_dropout(self, prob: float) -> None:
        """FLIP's patch dropout: in training a random ``prob`` of the patch tokens is dropped before the
        blocks (the class token kept); evaluation sees every patch. ViT towers only."""
        raise ValueError(
            f"patch_dropout is for ViT image towers (open_clip ViTs, timm VisionTransformer); "
            f"{type(self).__name__} has no patch tokens to drop"
        )

    def param_groups(self) -> list[list[nn.Parameter]]:
        """Parameters in groups ordered input -> output (stem, blocks..., head)."""
        return [list(self.parameters())]

    def blocks(self) -> list[nn.Module]:
        """The tower's repeated blocks, input -> output: for each parameter group between the stem
        and the head (:meth:`param_groups`), the smallest submodule holding all of its parameters
        (ViT ``blocks.i``, open_clip ``transformer.resblocks.i``, ResNet ``layerN``). Units a trainer
        may shard, offload or checkpoint one at a time; empty for a one-group tower."""
        groups = self.param_groups()[1:-1]
        names = {id(p): n for n, p in self.named_parameters()}
        modules = dict(self.named_modules())
        out: list[nn.Module] = []
        for group in groups:
            paths = [names[id(p)].split(".")[:-1] for p in group if id(p) in names]
            if not paths:
                continue
            common = os.path.commonprefix(paths)  # the longest shared module path (lists work too)
            module = modules.get(".".join(common))
            if module is not None and module is not self and module not in out:
                out.append(module)
        return out

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

    def train(self, mode: bool = True) -> Tower:
        super().train(mode)
        if getattr(self, "_freeze_norm_stats", False):
            for m in self.modules():
                if isinstance(m, BATCH_NORMS):
                    m.eval()  # running statistics stay as loaded
        return self
