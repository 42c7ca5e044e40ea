"""Towers backed by open_clip: the image or text half of an open_clip model.

The model is named by open_clip registry name (``ViT-B-32``), by a path to an open_clip
model-config JSON (bare ``model_cfg`` or a file with a ``model_cfg`` key), or inline as a dict.
The tower keeps only its half (``visual`` or ``text``) of a ``CustomTextCLIP``, so the state dict
of the two towers together is exactly open_clip's own, which is what open_clip export relies on.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch

# Private in open_clip, and the only way to build one half of a CLIP without the other (its public
# factories build both); tests/unit/test_private_apis.py fails when open_clip changes them.
from open_clip.model import _build_text_tower, _build_vision_tower
from open_clip.transformer import TextTransformer, text_global_pool

from mmpretrain.config import to_plain
from mmpretrain.interop.open_clip import preprocess_cfg, read_open_clip_state_dict
from mmpretrain.pretrained import is_hub_id, open_clip_config, open_clip_weights
from mmpretrain.towers.base import ImageNormalize, Tower, check_patch_dropout, uint8_transform
from mmpretrain.towers.timm import unknown_model_error

_PARTS = {"image": "visual", "text": "text"}
# Parameters after the last transformer block in open_clip's ViT and text transformer.
_HEAD_PARTS = {"ln_post", "proj", "attn_pool", "ln_final", "text_projection", "text_pool"}


def resolve_model_cfg(config: str | dict) -> dict[str, Any]:
    """open_clip model_cfg as a plain dict from a registry name, a JSON path or a dict."""
    if isinstance(config, dict) or hasattr(config, "items"):
        cfg = dict(config)
    elif is_hub_id(config):  # an open_clip model on the Hugging Face hub (open_clip_config.json)
        cfg = open_clip_config(str(config))
    elif str(config).endswith(".json") or Path(str(config)).is_file():
        path = Path(str(config))
        if not path.is_file():
            raise FileNotFoundError(
                f"open_clip model config '{config}' does not exist; give an existing JSON file"
            )
        cfg = json.loads(path.read_text())
        cfg = cfg.get("model_cfg", cfg)
    else:
        cfg = open_clip.get_model_config(str(config))
        if cfg is None:
            raise unknown_model_error(str(config), "open_clip", open_clip.list_models())
    cfg = to_plain(copy.deepcopy(cfg))
    cfg.pop("custom_text", None)
    if "embed_dim" not in cfg or not ({"vision_cfg", "text_cfg"} & set(cfg)):
        raise ValueError(f"open_clip model config {config!r} needs embed_dim and vision_cfg/text_cfg")
    return cfg


def build_tokenizer(model_cfg: dict[str, Any]):
    """The text tower's tokenizer, built once per (tokenizer, context length) in a process and shared
    by training, validation, the zero-shot prompts and the plots (a tokenizer only reads its tables)."""
    text_cfg = model_cfg["text_cfg"]
    return _tokenizer(text_cfg.get("hf_tokenizer_name") or None, int(text_cfg.get("context_length", 77)))


@functools.lru_cache(maxsize=8)
def _tokenizer(hf_name: str | None, context_length: int):
    if hf_name:
        return open_clip.tokenizer.HFTokenizer(hf_name, context_length=context_length)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def _trimmable_pad_id(encoder: torch.nn.Module) -> int | None:
    """The padding id of an open_clip text transformer whose pooled output never sees padding
    (causal mask, pooled at the end token, no appended class token or padding mask), else None."""
    ok = (
        isinstance(encoder, TextTransformer)
        and hasattr(encoder, "_embeds")
        and getattr(encoder, "attn_mask", None) is not None
        and getattr(encoder, "cls_emb", None) is None
        and not getattr(encoder, "use_pad_mask", False)
        and not getattr(encoder, "output_tokens", False)
        and getattr(encoder, "pool_type", None) in ("argmax", "eos")
    )
    return int(getattr(encoder, "pad_id", 0)) if ok else None


def trim_padding(x: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Token ids ``[..., L]`` without the trailing columns that are ``pad_id`` in every row (at least one
    kept).

    For the text transformers :func:`_trimmable_pad_id` accepts (causal attention, features pooled at
    the end token, no padding mask) this is exact: no position attends to a later one, so the pooled
    feature, the loss and every gradient are those of the full-length input, at the cost of the
    batch's longest caption instead of the context length. Reads the values: meant for host tensors
    (the data pipeline applies it to each collated batch, in its workers)."""
    if x.ndim < 2 or x.dtype.is_floating_point or x.shape[-1] < 2:
        return x
    used = x.reshape(-1, x.shape[-1]).ne(pad_id).any(0).nonzero()
    keep = int(used.max()) + 1 if len(used) else 1
    return x[..., :keep].contiguous() if keep < x.shape[-1] else x


class _Tokenize:
    """Picklable single-caption tokenizer (runs in data-loader workers). ``trim`` (None when the tower
    could see padding) cuts a collated batch of its output to the batch's longest caption."""

    def __init__(self, tokenizer, pad_id: int | None = None):
        self.tokenizer = tokenizer
        self.pad_id = pad_id

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]

    @property
    def trim(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return None if self.pad_id is None else functools.partial(trim_padding, pad_id=self.pad_id)


class OpenClipTower(Tower):
    has_projection = True

    def __init__(
        self,
        modality: str,
        config: str | dict,
        pretrained_path: str | None = None,
        aug: dict[str, Any] | None = None,
        pretrained: str | bool | None = None,
    ):
        """``pretrained``: an open_clip tag of ``config`` (``laion2b_s34b_b79k``) or ``hf-hub:ORG/REPO``;
        ``config=hf-hub:ORG/REPO`` brings its own weights. A local ``pretrained_path`` wins over both;
        ``pretrained=False`` loads none (the weights come from a checkpoint or an export)."""
        if modality not in _PARTS:
            raise ValueError(f"open_clip towers are 'image' or 'text', not '{modality}'")
        model_cfg = resolve_model_cfg(config)
        if not pretrained_path and pretrained is not False:
            pretrained_path, preprocess = open_clip_weights(config, pretrained)
            if preprocess:  # the tag's own mean/std/resize (e.g. OpenAI's or SigLIP's)
                model_cfg["preprocess_cfg"] = dict(model_cfg.get("preprocess_cfg", {})) | preprocess
        super().__init__(
            {
                "_target_": f"{__name__}.OpenClipTower",
                "modality": modality,
                "config": model_cfg,
                "aug": dict(aug or {}),
            }
        )
        self.modality = modality
        self.model_cfg = model_cfg
        self.part = _PARTS[modality]
        part_cfg = model_cfg.get(f"{'vision' if modality == 'image' else 'text'}_cfg")
        if part_cfg is None:
            raise ValueError(f"open_clip config for the {modality} tower has no {self.part}_cfg")
        # The same builders CustomTextCLIP uses, for our half only: keys match open_clip's.
        build = _build_vision_tower if modality == "image" else _build_text_tower
        setattr(
            self, self.part, build(model_cfg["embed_dim"], part_cfg, model_cfg.get("quick_gelu", False), None)
        )
        self.output_dim = model_cfg["embed_dim"]
        self.pad_id = _trimmable_pad_id(self.encoder)
        self.aug = dict(aug or {})
        if modality == "image":
            pp = preprocess_cfg(model_cfg)
            self.input_norm = ImageNormalize(pp["mean"], pp["std"])
        if pretrained_path:
            self.load_open_clip_checkpoint(pretrained_path)

    def load_open_clip_checkpoint(self, path: str) -> None:
        """Our half of a whole-model checkpoint in any open_clip layout (CLIP as OpenAI and LAION
        save it, CustomTextCLIP, open_clip's trainer, or an mmpretrain ``model=openclip`` export)."""
        prefix = f"{self.part}."
        half = {k: v for k, v in read_open_clip_state_dict(path).items() if k.startswith(prefix)}
        if not half:
            raise ValueError(f"{path} holds no open_clip {self.modality} tower ('{prefix}*' tensors)")
        self.load_state_dict(half, strict=True)

    @property
    def encoder(self) -> torch.nn.Module:
        return getattr(self, self.part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (text; fewer columns than the context length after :func:`trim_padding`), or
        images: uint8 pixels (normalised here) or already-normalised floats."""
        if self._is_short(x):
            return self._short_text(x)[0]
        out = self.encoder(self.normalize_input(x))
        return out[0] if isinstance(out, tuple) else out  # CoCa's towers give (pooled, tokens)

    def forward_with_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip's ``output_tokens`` forward: the pooled features and the per-token features
        (text after ``ln_final``; a ViT's patch tokens), for any input :meth:`forward` takes."""
        if self._is_short(x):
            return self._short_text(x)
        enc = self.encoder
        previous = enc.output_tokens
        enc.output_tokens = True
        try:
            return enc(self.normalize_input(x))
        finally:
            enc.output_tokens = previous

    def _is_short(self, x: torch.Tensor) -> bool:
        return self.pad_id is not None and x.shape[-1] < self.encoder.attn_mask.shape[0]

    def trim_input(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids without the trailing columns that are padding in every row (:func:`trim_padding`;
        ``x`` itself for a tower that could see the padding)."""
        return x if self.pad_id is None else trim_padding(x, self.pad_id)

    def _short_text(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip's ``TextTransformer.forward`` on ``n`` < context-length columns, with the causal
        mask cut to ``n`` x ``n`` (open_clip's own forward passes its full-size mask to the blocks):
        the pooled features and the per-token features."""
        enc, n = self.encoder, text.shape[-1]
        x, _ = enc._embeds(
            text
        )  # open_clip's own embedding step (private; no public one without the forward)
        tokens = enc.ln_final(enc.transformer(x, attn_mask=enc.attn_mask[:n, :n]))
        pooled = text_global_pool(
            tokens, text, pool_type=enc.pool_type, eos_token_id=getattr(enc, "eos_id", None)
        )
        if isinstance(enc.text_projection, torch.nn.Linear):
            pooled = enc.text_projection(pooled)
        elif enc.text_projection is not None:
            pooled = pooled @ enc.text_projection
        return pooled, tokens

    def preprocess(self, train: bool) -> Callable:
        if self.modality == "text":
            return _Tokenize(build_tokenizer(self.model_cfg), self.pad_id)
        pp = preprocess_cfg(self.model_cfg)
        # uint8 [C, H, W] (open_clip's transform without ToTensor + Normalize): forward normalises.
        return uint8_transform(
            open_clip.image_transform(
                pp["size"],
                is_train=train,
                mean=pp["mean"],
                std=pp["std"],
                resize_mode=pp["resize_mode"],
                interpolation=pp["interpolation"],
                aug_cfg=self.aug if train else None,
            )
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def set_patch_dropout(self, prob: float) -> None:
        """open_clip's own ``PatchDropout`` (its ``vision_cfg.patch_dropout``) in place of the ViT's;
        open_clip applies it in training only and keeps the class token."""
        if not hasattr(self.encoder, "patch_dropout"):
            super().set_patch_dropout(prob)
        check_patch_dropout(prob)
        self.encoder.patch_dropout = (
            open_clip.transformer.PatchDropout(prob) if prob > 0 else torch.nn.Identity()
        )

    def param_groups(self) -> list[list[torch.nn.Parameter]]:
        """Embeddings, one group per transformer block, then the final norm + projection.

        Locking and layer-wise lr decay both use these groups (open_clip's own ``lock`` methods
        group the two halves differently, and the text one refuses ``freeze_layer_norm=False``).
        Non-transformer encoders (open_clip's ModifiedResNet, timm trunks) form one group.
        """
        blocks = getattr(getattr(self.encoder, "transformer", None), "resblocks", None)
        if blocks is None:
            return [list(self.parameters())]
        in_block = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
        stem, head, per_block = [], [], [[] for _ in blocks]
        for name, p in self.encoder.named_parameters():
            if id(p) in in_block:
                per_block[in_block[id(p)]].append(p)
            elif name.split(".")[0] in _HEAD_PARTS:
                head.append(p)
            else:
                stem.append(p)
        return [g for g in [stem, *per_block, head] if g]
