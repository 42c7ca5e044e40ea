"""Video tower: any image tower per frame (batched as ``B*T``), temporal pooling, then the projection.

``forward`` takes ``uint8 [B, T, C, H, W]`` clips (frames travel as uint8 like images; the frame
tower normalises them on the device). Pooling, chosen by config:

- ``mean``: the mean of the frame features (CLIP4Clip's meanP): blind to frame order.
- ``transformer``: a small temporal transformer over the frame features with learned frame-position
  embeddings (CLIP4Clip's seqTransf): residual, then the mean over time. Order matters.
  ``temporal.motion: true`` adds to each frame's feature a learned linear map of its difference to
  the next frame's (the two-stream / TDN idea on the features): order-aware from the first step.
- ``inflate``: the ViT's patch embedding inflated to tubelets of 2 frames (ImageBind;
  :mod:`mmpretrain.towers.inflate`); the ViT attends over the tokens of the whole clip.

What a frame's feature keeps of WHERE things are, ``frame_pool`` (mean/transformer pooling):

- ``avg``: the frame tower's own output (a CNN's global average pool): position mostly discarded,
  so no pooling over time can see a digit move.
- ``spatial_softmax``: the frame backbone's feature map (timm ``forward_features``); per channel a
  softmax over the positions and its expected (x, y) (the keypoints of Levine et al. 2016, "deep
  spatial autoencoders"), concatenated with the average pool, then a linear layer back to the frame
  width.
- ``grid``: the feature map average-pooled to ``grid_size x grid_size`` cells, flattened, a linear layer.

``preprocess(train)`` is a :class:`VideoClip`: it picks ``num_frames`` frame indices (every
``stride``-th frame of a window, or one per equal segment when ``stride`` is null; a random window /
random frame per segment in training, the centre in evaluation), pads a short clip by repetition,
decodes only those frames and applies the frame tower's own image transform to each, with the SAME
random crop/flip for every frame of a clip.

The frame tower is built from its config (``frame:``, e.g. a ``timm_image`` or ``openclip_image``
tower), so its pretrained weights come the usual ways (``pretrained``, ``hf-hub:``,
``pretrained_path``); ``image_tower_path`` takes the image tower of an mmpretrain export instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import nn

from mmpretrain.towers.base import TRAINING_OPTIONS, Tower

POOLINGS = ("mean", "transformer", "inflate")
FRAME_POOLS = ("avg", "grid", "spatial_softmax")
PADS = ("loop", "last")


def sample_indices(
    n: int,
    num_frames: int,
    stride: int | None,
    train: bool,
    rng: random.Random | None = None,
    pad: str = "loop",
) -> list[int]:
    """``num_frames`` indices into a clip of ``n`` frames.

    ``stride``: frames ``start, start + stride, ...``; the window starts at random (train) or is
    centred (eval). ``stride=None``: the clip cut into ``num_frames`` equal segments, a random frame
    of each (train) or its middle (eval). Too few frames: what there is, padded by ``pad``: ``loop``
    (the clip again from its start) or ``last`` (the last frame repeated).
    """
    if n < 1:
        raise ValueError("a clip needs at least one frame")
    if pad not in PADS:
        raise ValueError(f"video pad must be one of {', '.join(PADS)}, not '{pad}'")
    rng = rng or random
    if stride:
        span = (num_frames - 1) * stride + 1
        if n >= span:
            start = rng.randint(0, n - span) if train else (n - span) // 2
            return [start + i * stride for i in range(num_frames)]
        idx = list(range(0, n, stride))
    elif n >= num_frames:
        edges = [round(i * n / num_frames) for i in range(num_frames + 1)]
        if train:
            return [rng.randint(lo, hi - 1) for lo, hi in pairwise(edges)]
        return [(lo + hi - 1) // 2 for lo, hi in pairwise(edges)]
    else:
        idx = list(range(n))
    missing = num_frames - len(idx)
    return idx + ([idx[i % len(idx)] for i in range(missing)] if pad == "loop" else [idx[-1]] * missing)


class VideoClip:
    """Picklable: a decoded video (anything with ``num_frames`` and ``frames(indices)``, as the data
    stream's decoder gives, or frames
    ``uint8 [N, H, W, 3]``) -> ``uint8 [num_frames, C, H, W]``, the frame transform applied per frame
    with one random draw per clip."""

    def __init__(
        self,
        frame_transform: Callable[[Any], torch.Tensor],
        num_frames: int,
        stride: int | None,
        train: bool,
        pad: str = "loop",
    ):
        self.frame_transform, self.num_frames, self.stride = frame_transform, int(num_frames), stride
        self.train, self.pad = train, pad

    def __call__(self, decoded: Any) -> torch.Tensor:
        from PIL import Image

        encoded = hasattr(decoded, "frames")  # decoded lazily: only the frames chosen here are converted
        n = decoded.num_frames if encoded else len(decoded)
        idx = sample_indices(n, self.num_frames, self.stride, self.train, pad=self.pad)
        frames = decoded.frames(idx) if encoded else np.asarray(decoded)[idx]
        # The same augmentation for every frame: each frame's transform starts from the same RNG state.
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        out = []
        for frame in frames:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)
            out.append(self.frame_transform(Image.fromarray(frame)))
        return torch.stack(out)


class TemporalTransformer(nn.Module):
    """Frame features ``[B, T, D]`` + learned frame positions -> pre-norm transformer -> residual ->
    LayerNorm ->
    mean over T. ``motion``: a linear map of each frame's change to the next joins its feature, and the output
    is the plain mean over T of the residual stream (no LayerNorm), so the frame features keep their scale."""

    def __init__(
        self,
        dim: int,
        num_frames: int,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        motion: bool = False,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(
                f"temporal transformer: the frame feature dim {dim} is not divisible by heads={heads}"
            )
        self.position = nn.Parameter(torch.randn(1, num_frames, dim) * 0.02)
        # motion: each frame also gets W (f[t+1] - f[t]) (the last frame 0), so the output depends on the
        # change
        # between frames from the first step; without it, attention starts near uniform (an average of the
        # frames, blind to order) and order is learned only as the position embeddings grow.
        self.motion = nn.Linear(dim, dim, bias=False) if motion else None
        self.norm = None if motion else nn.LayerNorm(dim)  # with motion the output is not layer-normalised
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            int(dim * mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.position.shape[1]:
            raise ValueError(
                f"the temporal transformer was built for {self.position.shape[1]} frames, got {x.shape[1]}"
            )
        if self.motion is None:
            return self.norm(x + self.blocks(x + self.position.to(x.dtype))).mean(1)
        # With motion the output is the mean over time of (frame feature + its motion term + the blocks'
        # output), not layer-normalised per frame: the frame features keep their scale, as mean pooling's.
        x = x + self.motion(torch.cat([x[:, 1:] - x[:, :-1], torch.zeros_like(x[:, :1])], 1))
        return (x + self.blocks(x + self.position.to(x.dtype))).mean(1)


class FramePool(nn.Module):
    """A frame backbone's feature map ``[N, C, h, w]`` -> ``[N, C]`` that keeps where things are
    (``grid`` or ``spatial_softmax``; see the module docstring)."""

    def __init__(self, kind: str, dim: int, grid_size: int = 2):
        super().__init__()
        if kind not in FRAME_POOLS[1:]:
            raise ValueError(f"FramePool kind must be one of {', '.join(FRAME_POOLS[1:])}, not '{kind}'")
        if int(grid_size) < 1:
            raise ValueError(f"video grid_size must be >= 1, got {grid_size}")
        self.kind, self.grid_size = kind, int(grid_size)
        if kind == "grid":
            self.proj = nn.Linear(dim * self.grid_size**2, dim)
        else:
            self.log_temperature = nn.Parameter(torch.zeros(()))  # the softmax's temperature, learned
            self.proj = nn.Linear(3 * dim, dim)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if fmap.ndim != 4:
            raise ValueError(
                f"frame_pool={self.kind} needs a frame backbone whose forward_features is a map "
                f"[N, C, h, w] (a CNN), got shape {tuple(fmap.shape)}: use frame_pool=avg"
            )
        if self.kind == "grid":
            return self.proj(nn.functional.adaptive_avg_pool2d(fmap, self.grid_size).flatten(1))
        keypoints = spatial_keypoints(fmap, self.log_temperature.exp())
        return self.proj(torch.cat([fmap.mean((2, 3)), keypoints.flatten(1).to(fmap.dtype)], 1))


def spatial_keypoints(fmap: torch.Tensor, temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, C, 2]``: per channel, the expected (x, y) under a softmax over the
    positions, in [-1, 1] (left/top -1, right/bottom 1; the centres of the corner cells)."""
    n, c, h, w = fmap.shape
    attn = (fmap.flatten(2).float() / temperature).softmax(-1)  # [N, C, h*w]
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, device=fmap.device),
        torch.linspace(-1, 1, w, device=fmap.device),
        indexing="ij",
    )
    return attn @ torch.stack([xs.flatten(), ys.flatten()], 1)


class VideoTower(Tower):
    """A frame tower (any image tower config) + temporal pooling; see the module docstring."""

    def __init__(
        self,
        frame: dict[str, Any],
        modality: str = "video",
        num_frames: int = 8,
        stride: int | None = None,
        pad: str = "loop",
        pooling: str = "mean",
        temporal: dict[str, Any] | None = None,
        image_tower_path: str | None = None,
        frame_pool: str = "avg",
        grid_size: int = 2,
    ):
        from mmpretrain.config import safe_instantiate

        if pooling not in POOLINGS:
            raise ValueError(f"video pooling must be one of {', '.join(POOLINGS)}, not '{pooling}'")
        if frame_pool not in FRAME_POOLS:
            raise ValueError(f"video frame_pool must be one of {', '.join(FRAME_POOLS)}, not '{frame_pool}'")
        if frame_pool != "avg" and pooling == "inflate":
            raise ValueError(
                f"frame_pool={frame_pool} pools a CNN's frame features; pooling=inflate takes a ViT's "
                "tokens: use frame_pool=avg with it"
            )
        if pad not in PADS:
            raise ValueError(f"video pad must be one of {', '.join(PADS)}, not '{pad}'")
        if int(num_frames) < 1 or (stride is not None and int(stride) < 1):
            raise ValueError(
                f"video needs num_frames >= 1 and stride >= 1 or null, got {num_frames}, {stride}"
            )
        frame_cfg = {k: v for k, v in dict(frame).items() if k not in TRAINING_OPTIONS} | {
            "modality": "image"
        }
        frame_tower = safe_instantiate(frame_cfg, allowed=("mmpretrain.towers.",))
        super().__init__(
            {
                "_target_": f"{__name__}.VideoTower",
                "_recursive_": False,
                "frame": frame_tower.config,
                "modality": modality,
                "num_frames": int(num_frames),
                "stride": None if stride is None else int(stride),
                "pad": pad,
                "pooling": pooling,
                "temporal": dict(temporal or {}),
                "frame_pool": frame_pool,
                "grid_size": int(grid_size),
            }
        )
        self.modality = modality
        self.frame = frame_tower
        if image_tower_path:
            load_image_tower(self.frame, image_tower_path)
        self.num_frames, self.stride, self.pad, self.pooling = int(num_frames), stride, pad, pooling
        self.has_projection = self.frame.has_projection
        self.output_dim = self.frame.output_dim
        self.frame_pool: FramePool | None = None
        if frame_pool != "avg":
            if not hasattr(self.frame, "feature_map"):
                raise ValueError(
                    f"frame_pool={frame_pool} needs a timm frame tower (its forward_features map), "
                    f"not {type(self.frame).__name__}: use frame_pool=avg"
                )
            self.frame_pool = FramePool(frame_pool, self.output_dim, grid_size)
        self.temporal: nn.Module | None = None
        if pooling == "transformer":
            self.temporal = TemporalTransformer(self.output_dim, self.num_frames, **dict(temporal or {}))
        elif pooling == "inflate":
            from mmpretrain.towers.inflate import InflatedViT

            encoder = getattr(self.frame, "model", None) or getattr(self.frame, "encoder", None)
            self.temporal = InflatedViT(encoder, self.num_frames)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"a video tower takes clips [B, T, C, H, W], got shape {tuple(x.shape)}")
        b, t = x.shape[:2]
        if self.pooling == "inflate":
            frames = self.frame.normalize_input(x.flatten(0, 1))
            return self.temporal(frames.view(b, t, *frames.shape[1:]))
        feats = self.frame_features(x.flatten(0, 1)).view(b, t, -1)
        return feats.mean(1) if self.pooling == "mean" else self.temporal(feats)

    def forward_with_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(x)`` and the per-frame features ``[B, T, D]`` as tokens (what a caption decoder reads);
        ``pooling=inflate`` has no per-frame features: its pooled output is the one token."""
        if self.pooling == "inflate":
            pooled = self(x)
            return pooled, pooled[:, None]
        b, t = x.shape[:2]
        feats = self.frame_features(x.flatten(0, 1)).view(b, t, -1)
        return (feats.mean(1) if self.pooling == "mean" else self.temporal(feats)), feats

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` frames -> ``[N, D]``: the frame tower's output, or its map through
        ``frame_pool``."""
        if self.frame_pool is None:
            return self.frame(frames)
        return self.frame_pool(self.frame.feature_map(frames))

    def preprocess(self, train: bool) -> Callable[[Any], torch.Tensor]:
        return VideoClip(self.frame.preprocess(train), self.num_frames, self.stride, train, self.pad)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.frame.set_grad_checkpointing(enable)

    def set_channels_last(self, enable: bool = True) -> None:
        self.frame.set_channels_last(enable)

    def param_groups(self) -> list[list[nn.Parameter]]:
        """The frame tower's groups (stem, blocks, head), the frame pool's, then the temporal module's
        parameters."""
        groups = self.frame.param_groups()
        if self.frame_pool is not None:
            groups.append(list(self.frame_pool.parameters()))
        if self.temporal is not None:
            groups.append(list(self.temporal.parameters()))
        return [g for g in groups if g]

    @property
    def data_config(self) -> dict[str, Any]:
        """Export settings: the frame transform's and the sampling's."""
        frame = dict(getattr(self.frame, "data_config", {}))
        return frame | {
            "num_frames": self.num_frames,
            "stride": self.stride,
            "pad": self.pad,
            "pooling": self.pooling,
            "frame_pool": self.config["frame_pool"],
        }


def load_image_tower(frame: Tower, path: str) -> None:
    """The image tower of an mmpretrain export (a directory or its ``model.safetensors``) into ``frame``."""
    from pathlib import Path

    from mmpretrain.io import read_state_dict

    file = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    prefix = "towers.image."
    state = {k[len(prefix) :]: v for k, v in read_state_dict(str(file)).items() if k.startswith(prefix)}
    if not state:
        raise ValueError(
            f"{file} holds no image tower ('{prefix}*' tensors): give an mmpretrain export of a model "
            f"with an image tower, or name the frame tower's own weights (frame.pretrained_path)"
        )
    missing, unexpected = frame.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the image tower in {file} does not match the frame tower (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): configure the frame tower as that image tower was"
        )
