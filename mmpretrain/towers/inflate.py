"""ImageBind-style inflation of a ViT's patch embedding over time: tubelets of 2 frames -> tokens.

The 2D patch convolution ``[D, C, p, p]`` becomes a Conv3d ``[D, C, 2, p, p]`` with stride
``(2, p, p)`` whose two temporal slices are each the 2D kernel divided by 2 (I3D's inflation): a
clip of identical frames gives exactly the image's patch tokens. Tokens of tubelet ``t`` at patch
``(i, j)`` get the ViT's spatial position embedding of ``(i, j)`` plus a learned temporal embedding
of ``t`` (zero at init), then the ViT's own blocks, norm and pooling run over all ``T/2 * N``
tokens. An odd number of frames is padded with the last frame (ImageBind pads an image to 2).

Supported: timm ``VisionTransformer`` (``patch_embed.proj``, ``pos_embed``, ``cls_token``) and
open_clip's ``VisionTransformer`` (``conv1``, ``positional_embedding``, ``class_embedding``). The
3D kernel replaces the 2D one at the same place in the module tree, so the state dict keys stay
the image tower's and the inflated tower exports and reloads like any other.
"""

from __future__ import annotations

import torch
from torch import nn

TUBELET = 2


def inflate_conv(conv: nn.Conv2d) -> nn.Conv3d:
    """A Conv3d over ``TUBELET`` frames equal to ``conv`` applied to each frame and averaged."""
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != conv.stride:
        raise ValueError(f"pooling=inflate needs a non-overlapping 2D patch convolution, found {conv}")
    conv3d = nn.Conv3d(
        conv.in_channels,
        conv.out_channels,
        (TUBELET, *conv.kernel_size),
        stride=(TUBELET, *conv.stride),
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        conv3d.weight.copy_(conv.weight[:, :, None].repeat(1, 1, TUBELET, 1, 1) / TUBELET)
        if conv.bias is not None:
            conv3d.bias.copy_(conv.bias)
    return conv3d.to(conv.weight.dtype)


def vit_kind(encoder: nn.Module) -> str | None:
    """``timm`` / ``open_clip`` for the ViTs this module inflates, else None."""
    if hasattr(encoder, "patch_embed") and hasattr(encoder, "blocks") and hasattr(encoder, "pos_embed"):
        return "timm"
    if (
        hasattr(encoder, "conv1")
        and hasattr(encoder, "positional_embedding")
        and hasattr(encoder, "transformer")
    ):
        return "open_clip"
    return None


class InflatedViT(nn.Module):
    """Owns the temporal position embedding; runs ``encoder`` (whose patch conv it inflated) on clips.

    The encoder is not a child module (it stays registered under the frame tower), so parameters
    and state dict keys are not duplicated.
    """

    def __init__(self, encoder: nn.Module, num_frames: int):
        super().__init__()
        self.kind = vit_kind(encoder)
        if self.kind is None:
            raise ValueError(
                f"pooling=inflate needs a ViT frame tower (a timm vit_* model or an open_clip ViT), not "
                f"{type(encoder).__name__}; use pooling=mean or pooling=transformer for other backbones"
            )
        self._encoder = [encoder]  # a plain list: not a submodule
        if self.kind == "timm":
            encoder.patch_embed.proj = inflate_conv(encoder.patch_embed.proj)
            width = encoder.embed_dim
        else:
            encoder.conv1 = inflate_conv(encoder.conv1)
            width = encoder.conv1.out_channels
        self.tubelets = -(-num_frames // TUBELET)
        self.time_embed = nn.Parameter(torch.zeros(1, self.tubelets, 1, width))

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def tokens(self, clips: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
        """``[B, T, C, H, W]`` normalised frames -> ``[B, T', N, D]`` tubelet tokens with time embeddings."""
        if clips.shape[1] % TUBELET:
            clips = torch.cat(
                [clips, clips[:, -1:].expand(-1, TUBELET - clips.shape[1] % TUBELET, -1, -1, -1)], 1
            )
        if clips.shape[1] // TUBELET != self.tubelets:
            raise ValueError(
                f"the inflated tower was built for {self.tubelets * TUBELET} frames, got {clips.shape[1]}"
            )
        x = conv(clips.transpose(1, 2).to(conv.weight.dtype))  # [B, D, T', h, w]
        x = x.flatten(3).permute(0, 2, 3, 1)  # [B, T', N, D]
        return x + self.time_embed.to(x.dtype)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        return self._timm(enc, clips) if self.kind == "timm" else self._open_clip(enc, clips)

    def _timm(self, m: nn.Module, clips: torch.Tensor) -> torch.Tensor:
        x = self.tokens(clips, m.patch_embed.proj)
        b, t, n, d = x.shape
        x = m.patch_embed.norm(x)
        prefix = m.num_prefix_tokens
        spatial = m.pos_embed if m.no_embed_class else m.pos_embed[:, prefix:]
        if spatial.shape[1] != n:
            raise ValueError(
                f"the ViT's position embedding has {spatial.shape[1]} patches, the frames give {n}: "
                f"set the frame tower's img_size to the clip's frame size"
            )
        x = (x + spatial[:, None]).reshape(b, t * n, d)
        tokens = [
            tok.expand(b, -1, -1) for tok in (m.cls_token, getattr(m, "reg_token", None)) if tok is not None
        ]
        if tokens:
            head = torch.cat(tokens, 1)
            if not m.no_embed_class:
                head = head + m.pos_embed[:, :prefix]
            x = torch.cat([head, x], 1)
        x = m.norm_pre(m.pos_drop(x))
        x = m.norm(m.blocks(x))
        return m.forward_head(x)

    def _open_clip(self, m: nn.Module, clips: torch.Tensor) -> torch.Tensor:
        x = self.tokens(clips, m.conv1)
        b, t, n, d = x.shape
        spatial = m.positional_embedding[1:]
        if spatial.shape[0] != n:
            raise ValueError(
                f"the ViT's position embedding has {spatial.shape[0]} patches, the frames give {n}: "
                f"the clip's frame size must be the open_clip config's image_size"
            )
        x = (x + spatial.to(x.dtype)).reshape(b, t * n, d)
        cls = (m.class_embedding + m.positional_embedding[0]).to(x.dtype).expand(b, 1, -1)
        x = m.ln_pre(m.patch_dropout(torch.cat([cls, x], 1)))
        x = m.transformer(x)
        pooled, _ = m._pool(x)  # open_clip's own pooling (private; test_private_apis.py watches it)
        return pooled @ m.proj if m.proj is not None else pooled
