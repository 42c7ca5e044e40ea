"""Classifiers on top of a pretrained ContrastiveModel: each maps a batch dict to class logits.

- :class:`LinearHead`: a linear layer on pre-extracted features (standardised with train statistics).
- :class:`TowerClassifier`: one tower + a linear head, trained end to end.
- :class:`FusionClassifier`: two or more towers' tokens fused ``early`` (one small transformer over
  all tokens), ``late`` (per-modality logits, learned softmax weights) or by ``attention`` (tokens
  of a query modality attend to the other modalities' tokens).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.model import ContrastiveModel


class LinearHead(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clamp_min(1e-6).clone())
        self.fc = nn.Linear(mean.numel(), num_classes)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.fc((batch["features"] - self.mean) / self.std)


def features(model: ContrastiveModel, modality: str, x: torch.Tensor, kind: str) -> torch.Tensor:
    """``embedding``: the projected, L2-normalised embedding; ``tower``: the tower's own output."""
    if kind == "embedding":
        return model.encode(modality, x)
    if kind == "tower":
        return model.towers[modality](x)
    raise ValueError(f"task.features must be 'embedding' or 'tower', not '{kind}'")


class TowerClassifier(nn.Module):
    """A pretrained tower (with its projection) and a linear head, fine-tuned end to end."""

    def __init__(self, model: ContrastiveModel, modality: str, num_classes: int, kind: str = "tower"):
        super().__init__()
        if modality not in model.towers:
            raise ValueError(f"task.modality={modality}: the pretrained model has towers {model.modalities}")
        self.model, self.modality, self.kind = model, modality, kind
        dim = model.towers[modality].output_dim if kind == "tower" else model.embed_dim
        self.head = nn.Linear(dim, num_classes)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.head(features(self.model, self.modality, batch[self.modality], self.kind))

    def param_groups(
        self, lr: float, tower_lr_scale: float, layer_decay: float | None
    ) -> list[dict[str, Any]]:
        """Head at ``lr``; the tower at ``lr * tower_lr_scale``, each of its groups (input -> output)
        further scaled by ``layer_decay ** (distance from the top)`` when layer_decay is set."""
        tower = self.model.towers[self.modality]
        groups = tower.param_groups() if layer_decay else [list(tower.parameters())]
        n = len(groups)
        out = [{"params": list(self.head.parameters()), "lr": lr, "name": "head"}]
        if self.kind == "embedding":  # the projection is used (and trained) only for embedding features
            out.append(
                {
                    "params": list(self.model.projections[self.modality].parameters()),
                    "lr": lr * tower_lr_scale,
                    "name": "projection",
                }
            )
        for i, params in enumerate(groups):
            scale = tower_lr_scale * (layer_decay ** (n - 1 - i) if layer_decay else 1.0)
            out.append({"params": params, "lr": lr * scale, "name": f"tower.{i}"})
        return [g for g in out if g["params"]]


# -- fusion --------------------------------------------------------------------------------------
def tower_tokens(
    model: ContrastiveModel, modality: str, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, N, C]`` token features of a tower and a ``[B, N]`` padding mask (True = ignore) or None.

    open_clip towers give their transformer tokens, timm towers their feature map (``[B, C, H, W]``
    as ``H*W`` tokens); any other tower its pooled output as one token.
    """
    from mmpretrain.towers.open_clip import OpenClipTower
    from mmpretrain.towers.timm import TimmTower

    tower = model.towers[modality]
    x = tower.normalize_input(x)  # uint8 images: the normalisation the tower's forward starts with
    if isinstance(tower, OpenClipTower):
        _, tokens = tower.forward_with_tokens(x)  # text may come without its padding columns
        mask = None
        if modality == "text" and not x.is_floating_point() and x.shape[1] == tokens.shape[1]:
            mask = x == 0  # open_clip pads with token id 0; the start token is never 0
        return tokens, mask
    if isinstance(tower, TimmTower):
        fmap = tower.model.forward_features(x)
        return (fmap.flatten(2).transpose(1, 2) if fmap.ndim == 4 else fmap), None
    return tower(x)[:, None], None


FUSIONS = ("early", "late", "attention")


class FusionClassifier(nn.Module):
    def __init__(
        self,
        model: ContrastiveModel,
        modalities: list[str],
        num_classes: int,
        fusion: str,
        example: dict[str, torch.Tensor],
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        query: str | None = None,
        freeze_towers: bool = True,
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion={fusion} is unknown; use one of {', '.join(FUSIONS)}")
        if len(modalities) < 2:
            raise ValueError(f"task=fusion needs two or more modalities (task.modalities), got {modalities}")
        missing = [m for m in modalities if m not in model.towers]
        if missing:
            raise ValueError(
                f"task.modalities names {missing}, but the pretrained model has towers {model.modalities}"
            )
        self.model, self.modalities, self.fusion = model, list(modalities), fusion
        self.freeze_towers = freeze_towers
        if freeze_towers:
            model.requires_grad_(False)
        self.query = query or self.modalities[0]
        if self.query not in self.modalities:
            raise ValueError(f"task.query={self.query} is not one of task.modalities {self.modalities}")
        if fusion == "late":
            # LayerNorm first: unit-norm embeddings have tiny per-dimension scale, which a bare linear layer
            # learns slowly
            self.heads = nn.ModuleDict(
                {
                    m: nn.Sequential(nn.LayerNorm(model.embed_dim), nn.Linear(model.embed_dim, num_classes))
                    for m in self.modalities
                }
            )
            self.weights = nn.Parameter(torch.zeros(len(self.modalities)))
            return
        was_training = model.training
        model.eval()
        with torch.no_grad():  # token widths per modality, from one example
            dims = {m: tower_tokens(model, m, example[m][:1])[0].shape[-1] for m in self.modalities}
        model.train(was_training)
        self.proj = nn.ModuleDict({m: nn.Linear(dims[m], width) for m in self.modalities})
        self.type_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(width)) for m in self.modalities})
        if fusion == "early":
            self.cls = nn.Parameter(torch.zeros(1, 1, width))
            layer = nn.TransformerEncoderLayer(
                width, heads, 2 * width, dropout=0.1, batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        else:
            self.attn = nn.MultiheadAttention(width, heads, dropout=0.1, batch_first=True)
            self.norm_q = nn.LayerNorm(width)
            self.ffn = nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
            )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def train(self, mode: bool = True) -> FusionClassifier:
        super().train(mode)
        if self.freeze_towers:
            self.model.eval()  # frozen towers keep dropout off and norm statistics as loaded
        return self

    def _tokens(self, batch: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for m in self.modalities:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_towers):
                tokens, mask = tower_tokens(self.model, m, batch[m])
            tokens = self.proj[m](tokens) + self.type_embed[m]
            if mask is None:
                mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            out[m] = (tokens, mask)
        return out

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.fusion == "late":
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_towers):
                emb = {m: self.model.encode(m, batch[m]) for m in self.modalities}
            logits = torch.stack([self.heads[m](emb[m]) for m in self.modalities])  # [M, B, C]
            return (F.softmax(self.weights, 0)[:, None, None] * logits).sum(0)
        toks = self._tokens(batch)
        if self.fusion == "early":
            b = next(iter(toks.values()))[0].shape[0]
            x = torch.cat([self.cls.expand(b, -1, -1)] + [t for t, _ in toks.values()], 1)
            mask = torch.cat(
                [torch.zeros(b, 1, dtype=torch.bool, device=x.device)] + [m for _, m in toks.values()], 1
            )
            return self.head(self.norm(self.encoder(x, src_key_padding_mask=mask)[:, 0]))
        q, q_mask = toks[self.query]
        kv = torch.cat([toks[m][0] for m in self.modalities if m != self.query], 1)
        kv_mask = torch.cat([toks[m][1] for m in self.modalities if m != self.query], 1)
        attended, _ = self.attn(self.norm_q(q), kv, kv, key_padding_mask=kv_mask, need_weights=False)
        x = q + attended
        x = x + self.ffn(x)
        keep = (~q_mask).unsqueeze(-1).float()
        pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1)
        return self.head(self.norm(pooled))
