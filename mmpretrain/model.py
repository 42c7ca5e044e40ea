"""ContrastiveModel: one tower per modality, projections to a shared space, learnable temperatures."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.towers.base import BATCH_NORMS, TRAINING_OPTIONS, Tower

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)


class ContrastiveModel(nn.Module):
    """``forward(batch)`` encodes every modality the batch carries.

    Returns ``{"<modality>_features": [B, D] L2-normalised, "logit_scale": exp(log s), ...}``;
    with per-pair temperatures it returns ``logit_scale_<a>_<b>`` for each pair instead.
    ``<modality>_mask`` entries of the batch pass through for losses over partial batches.

    With a caption ``decoder`` (:mod:`mmpretrain.towers.decoder`; ``loss=coca``) a batch with images and
    captions also gives, per sample, ``caption_nll`` (the caption's summed token cross-entropy under
    teacher forcing) and ``caption_tokens`` (how many tokens it scores): per-sample outputs, so the
    caption term accumulates exactly under grad caching and never holds a batch of vocabulary logits.
    """

    def __init__(
        self,
        towers: Mapping[str, Tower],
        embed_dim: int,
        temperature_pairs: list[list[str]] | None = None,
        init_logit_scale: float = INIT_LOGIT_SCALE,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        init_logit_bias: float | None = None,
        decoder: nn.Module | None = None,
    ):
        super().__init__()
        for name, tower in towers.items():
            if tower.modality != name:
                raise ValueError(
                    f"tower under key '{name}' encodes '{tower.modality}'; key towers by modality"
                )
        self.towers = nn.ModuleDict(dict(towers))
        self.embed_dim = embed_dim
        self.projections = nn.ModuleDict(
            {
                m: nn.Identity()
                if t.has_projection and t.output_dim == embed_dim
                else nn.Linear(t.output_dim, embed_dim, bias=False)
                for m, t in self.towers.items()
            }
        )
        # One shared temperature ("logit_scale") or one per modality pair ("a_b").
        keys = ["_".join(p) for p in temperature_pairs] if temperature_pairs else [""]
        self.logit_scales = nn.ParameterDict(
            {k or "shared": nn.Parameter(torch.tensor(float(init_logit_scale))) for k in keys}
        )
        self.max_logit_scale = max_logit_scale
        # A learnable logit bias for sigmoid losses (SigLIP: -10); None: no bias, as CLIP.
        self.logit_bias = (
            None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        )
        self.decoder = decoder

    @property
    def modalities(self) -> list[str]:
        return list(self.towers.keys())

    def encode(self, modality: str, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if modality not in self.towers:
            raise KeyError(f"this model has no '{modality}' tower; it has {self.modalities}")
        z = self.projections[modality](self.towers[modality](x))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encode("image", x, normalize)

    def encode_text(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encode("text", x, normalize)

    def encode_audio(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encode("audio", x, normalize)

    def encode_video(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Clips ``[B, T, C, H, W]`` (uint8 frames, or normalised floats)."""
        return self.encode("video", x, normalize)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.decoder is not None and _captions(batch, self.decoder.source):
            out |= self._caption_forward(batch)
        for m in self.modalities:
            if m not in batch or f"{m}_features" in out:
                continue
            mask = batch.get(f"{m}_mask")
            if mask is None:
                out[f"{m}_features"] = self.encode(m, batch[m])
                continue
            out[f"{m}_mask"] = mask
            out[f"{m}_features"] = self._encode_present(m, batch[m], mask.to(batch[m].device).bool())
        # [B, M, ...] more captions per row: hard negatives (loss.hard_negatives) and the sample's other
        # captions of this pass (data.captions_per_sample > 1), each with its [B, M] mask
        for key in ("text_negatives", "text_positives"):
            captions = batch.get(key)
            if captions is not None and "text" in self.towers:
                rows, m = captions.shape[:2]
                out[f"{key}_features"] = self.encode("text", captions.flatten(0, 1)).view(rows, m, -1)
                out[f"{key}_mask"] = batch[f"{key}_mask"].bool()
        return out | self.logit_scale_outputs()

    def _caption_forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Image and text features and the caption terms, each tower run once (for its tokens too)."""
        source, text = self.decoder.source, self.towers["text"]
        pooled, image_tokens = self.towers[source].forward_with_tokens(batch[source])
        text_tokens = None
        if self.decoder.reads_text_tower:
            text_pooled, text_tokens = text.forward_with_tokens(batch["text"])
        else:
            text_pooled = text(batch["text"])
        nll, count = self.decoder.caption_nll(image_tokens, batch["text"], text_tokens)
        return {
            f"{source}_features": F.normalize(self.projections[source](pooled), dim=-1),
            "text_features": F.normalize(self.projections["text"](text_pooled), dim=-1),
            "caption_nll": nll,
            "caption_tokens": count,
        }

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The image (video) tower's tokens ``[B, N, C]``, what the caption decoder reads."""
        return self.towers[self.decoder.source].forward_with_tokens(images)[1]

    @torch.no_grad()
    def generate(self, images: torch.Tensor, strategy: str = "greedy", **options: Any) -> list[list[int]]:
        """Caption token ids of each image (no start or end token): ``strategy`` greedy | beam | top_p,
        ``max_len``, ``min_len``, ``num_beams``, ``top_p``, ``temperature``, ``length_penalty``,
        ``use_cache``, ``generator`` (:func:`mmpretrain.towers.generation.generate`). :meth:`caption`
        gives the text."""
        from mmpretrain.towers.generation import generate

        if self.decoder is None:
            raise ValueError(
                "this model has no caption decoder: train it with loss=coca, or give its towers one with "
                "`mmpretrain finetune task=caption pretrained=...`"
            )
        device = next(self.decoder.parameters()).device
        tokens = self.image_tokens(images.to(device))
        return generate(self.decoder, tokens, self.towers["text"], strategy, **options)

    def caption(self, images: torch.Tensor, strategy: str = "greedy", **options: Any) -> list[str]:
        """:meth:`generate`, decoded to text by the text tower's tokenizer."""
        tokenizer = self.towers["text"].preprocess(False).tokenizer
        # open_clip's BPE decodes "five-sided" as "five - sided": hyphens rejoined
        return [
            re.sub(r"(?<=\w) - (?=\w)", "-", tokenizer.decode(ids).strip())
            for ids in self.generate(images, strategy, **options)
        ]

    def _encode_present(self, m: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Features of the rows that carry modality ``m``; absent rows get zero features, which
        losses and metrics leave out by the mask.

        A tower whose rows do not interact (LayerNorm transformers, any tower in eval mode) encodes
        the whole batch and the absent rows are zeroed: no host sync, and one compiled shape. A
        tower with BatchNorm in training mode encodes only the present rows, since zero-filled rows
        would skew its batch statistics; selecting them costs one host sync (``nonzero``) and a
        shape that varies with the count (compile goes dynamic). With fewer than 2 present rows
        it encodes the whole batch too, so every tower still runs on every step (DDP needs a
        gradient for every parameter on every rank) and BatchNorm never sees a single row.
        """
        if not _couples_rows(self.towers[m]):
            return self.encode(m, x) * mask[:, None]
        rows = mask.nonzero().squeeze(1)  # the one host sync of a partial batch through a BatchNorm tower
        if rows.numel() < 2:
            return self.encode(m, x) * mask[:, None]
        z = self.encode(m, x[rows])
        return z.new_zeros(x.shape[0], z.shape[1]).index_put((rows,), z)

    def logit_scale_outputs(self) -> dict[str, torch.Tensor]:
        """The loss's scalar parameters: ``logit_scale``(``_<a>_<b>``) and, when built, ``logit_bias``."""
        out = {
            ("logit_scale" if k == "shared" else f"logit_scale_{k}"): p.exp()
            for k, p in self.logit_scales.items()
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    @torch.no_grad()
    def clamp_logit_scales(self) -> None:
        """CLIP clamps log s to [0, ln 100] after every optimiser step."""
        for p in self.logit_scales.values():
            p.clamp_(0, self.max_logit_scale)

    def preprocess(self, train: bool) -> dict[str, Any]:
        """Per-modality callables turning one decoded sample value into a tower input."""
        return {m: t.preprocess(train) for m, t in self.towers.items()}

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model without weights (exported as config.json)."""
        pairs = [k.split("_") for k in self.logit_scales if k != "shared"] or None
        return {
            "embed_dim": self.embed_dim,
            "temperature_pairs": pairs,
            "max_logit_scale": self.max_logit_scale,
            "init_logit_bias": None if self.logit_bias is None else float(self.logit_bias.detach()),
            "towers": {m: t.config for m, t in self.towers.items()},
        } | ({"decoder": dict(self.decoder.config)} if self.decoder is not None else {})


def _captions(batch: Mapping[str, Any], source: str) -> bool:
    """A batch the decoder trains on: images (videos) with their captions, every row complete."""
    return source in batch and "text" in batch and f"{source}_mask" not in batch and "text_mask" not in batch


def _couples_rows(tower: nn.Module) -> bool:
    """Whether a row's features depend on the other rows of the batch (BatchNorm in training)."""
    return any(isinstance(mod, BATCH_NORMS) and mod.training for mod in tower.modules())


def apply_training_options(model: ContrastiveModel, cfg: Mapping[str, Any]) -> ContrastiveModel:
    """Apply ``towers.<m>.lock`` / ``grad_checkpointing`` / ``channels_last`` / ``patch_dropout`` of a
    model config (``patch_dropout``: FLIP, a fraction of a ViT's patches dropped in training only).

    ``lock: {unlocked_groups: N, freeze_norm_stats: bool}`` freezes all but the tower's last N
    parameter groups (LiT: ``unlocked_groups: 0`` with a pretrained tower). ``lr_scale`` is read
    by :func:`mmpretrain.training.optim.build_optimizer`.
    """
    for m, tcfg in cfg["towers"].items():
        tower = model.towers[m]
        lock = tcfg.get("lock")
        if lock:
            unknown = set(lock) - {"unlocked_groups", "freeze_norm_stats"}
            if unknown:
                raise ValueError(
                    f"model.towers.{m}.lock has unknown keys {sorted(unknown)}; use unlocked_groups, "
                    "freeze_norm_stats"
                )
            tower.lock(int(lock.get("unlocked_groups", 0)), bool(lock.get("freeze_norm_stats", False)))
        if tcfg.get("grad_checkpointing"):
            tower.set_grad_checkpointing(True)
        if tcfg.get("channels_last"):
            tower.set_channels_last(True)
        if tcfg.get("patch_dropout"):
            tower.set_patch_dropout(float(tcfg["patch_dropout"]))
    return model


#: Keys of a tower config that name where its starting weights come from.
WEIGHT_SOURCES = ("pretrained_path", "image_tower_path")


def weights_free(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` (a model config) with every source of starting weights removed: the towers (and a video
    tower's frame tower) get ``pretrained: false`` and no ``pretrained_path``/``image_tower_path``, and
    the top-level open_clip ``config``/``pretrained`` (read only for the starting temperature) go. What
    rebuilds a model whose weights come from a checkpoint or an export: it never reads a weights file
    or contacts a hub for weights."""
    from mmpretrain.config import to_plain

    def tower(t: dict[str, Any]) -> dict[str, Any]:
        t = {k: v for k, v in t.items() if k not in WEIGHT_SOURCES}
        if isinstance(t.get("frame"), dict):  # a video tower: its frame tower holds the weights source
            t["frame"] = tower(t["frame"])
        else:
            t["pretrained"] = False
        return t

    out = {k: v for k, v in to_plain(cfg).items() if k not in ("config", "pretrained")}
    out["towers"] = {m: tower(t) for m, t in out["towers"].items() if t is not None}
    return out


def build_model(cfg: Mapping[str, Any]) -> ContrastiveModel:
    """Build from a model config (``towers: {modality: {_target_: ..., ...}}``, ``embed_dim`` ...)."""
    from mmpretrain.config import safe_instantiate

    towers = {
        m: safe_instantiate(
            {k: v for k, v in tcfg.items() if k not in TRAINING_OPTIONS}, allowed=("mmpretrain.towers.",)
        )
        for m, tcfg in cfg["towers"].items()
    }
    embed_dim = cfg.get("embed_dim")
    if embed_dim is None:  # towers with their own projection (open_clip) fix the shared dim
        dims = {t.output_dim for t in towers.values() if t.has_projection}
        if len(dims) != 1:
            raise ValueError(
                f"model.embed_dim is null but the towers' projected dims are {dims}; set model.embed_dim"
            )
        embed_dim = dims.pop()
    init_logit_scale = float(cfg.get("init_logit_scale", INIT_LOGIT_SCALE))
    init_logit_bias = None if cfg.get("init_logit_bias") is None else float(cfg["init_logit_bias"])
    path = None
    if cfg.get("config") is not None:  # one open_clip model: its checkpoint's temperature (and bias)
        from mmpretrain.pretrained import checkpoint_scalars, open_clip_weights

        path, _ = open_clip_weights(cfg["config"], cfg.get("pretrained"))
        scalars = checkpoint_scalars(path) if path else {}
        init_logit_scale = scalars.get("logit_scale", init_logit_scale)
        if init_logit_bias is not None:  # a bias only where the loss uses one (loss=siglip)
            init_logit_bias = scalars.get("logit_bias", init_logit_bias)
    from mmpretrain.towers.decoder import build_decoder

    decoder = build_decoder(cfg.get("decoder"), towers)
    if path and hasattr(decoder, "load_open_clip_checkpoint"):  # a pretrained CoCa: its decoder too
        decoder.load_open_clip_checkpoint(path)
    return ContrastiveModel(
        towers,
        embed_dim=int(embed_dim),
        temperature_pairs=[list(p) for p in cfg["temperature_pairs"]]
        if cfg.get("temperature_pairs")
        else None,
        init_logit_scale=init_logit_scale,
        max_logit_scale=float(cfg.get("max_logit_scale", MAX_LOGIT_SCALE)),
        init_logit_bias=init_logit_bias,
        decoder=decoder,
    )
