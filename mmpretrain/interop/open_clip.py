"""open_clip's format in and out: its checkpoint key layouts and its ``local-dir:`` directory.

open_clip saves a model in one of two key layouts: ``CLIP`` (OpenAI, LAION: ``visual.*`` plus the
text tower at the top level, ``token_embedding``, ``positional_embedding``, ``transformer.*``,
``ln_final``, ``text_projection``) and ``CustomTextCLIP`` (``visual.*``, ``text.*``). Both, with
open_clip-trainer (``module.``) or torch.compile prefixes, and our own ``model=openclip`` layout
(``towers.image.visual.*``, ``towers.text.text.*``), come out of :func:`open_clip_state_dict` as
``CustomTextCLIP`` keys; that one function is behind every way a file gets in (tower
``pretrained_path``, ``finetune pretrained=``, ``eval ckpt=``, ``export ckpt=``).

Only :mod:`mmpretrain.io` of ours is imported: towers import this module, never the reverse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from open_clip.transform import PreprocessCfg
from safetensors.torch import save_file

from mmpretrain.io import atomic_write, read_state_dict, strip_prefixes, write_text_atomic

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TOWER_TARGET = "mmpretrain.towers.open_clip.OpenClipTower"
# Our keys -> CustomTextCLIP keys (the open_clip towers keep open_clip's own sub-keys).
_OURS_TO_OPEN_CLIP = {
    "towers.image.": "",
    "towers.text.": "",
    "decoder.text_decoder.": "text_decoder.",  # CoCa's caption decoder
    "logit_scales.shared": "logit_scale",
    "logit_bias": "logit_bias",
}
# The text tower's top-level modules in open_clip's CLIP layout (under ``text.`` in CustomTextCLIP).
_CLIP_TEXT_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
_SCALARS = ("logit_scale", "logit_bias")


def preprocess_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's image preprocessing settings for a model config (its defaults + ``preprocess_cfg``)."""
    size = model_cfg["vision_cfg"].get("image_size", 224)
    cfg = PreprocessCfg(size=size)
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__} | dict(model_cfg.get("preprocess_cfg", {}))


# -- in --------------------------------------------------------------------------------------------
def open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any layout holding an open_clip model (see the module docstring) as CustomTextCLIP keys:
    ``visual.*``, ``text.*``, scalar ``logit_scale`` and, for SigLIP, ``logit_bias``."""
    state = strip_prefixes(state)
    if any(k.startswith(("towers.", "model.towers.")) for k in state):  # ours: an export or a Lightning .ckpt
        ours = {k.removeprefix("model."): v for k, v in state.items()}
        state = {}
        for k, v in ours.items():
            for prefix, theirs in _OURS_TO_OPEN_CLIP.items():
                if k.startswith(prefix):
                    state[theirs + k[len(prefix) :]] = v
                    break
    clip_layout = any(k == "token_embedding.weight" or k == "positional_embedding" for k in state)
    out = {}
    for k, v in state.items():
        if clip_layout and k.split(".")[0] in _CLIP_TEXT_KEYS:
            k = f"text.{k}"
        elif k in _SCALARS:
            v = v.reshape(())  # open_clip's nonscalar_logit_scale keeps them as [1]
        out[k] = v
    return out


def read_open_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """:func:`open_clip_state_dict` of a file (``.pt``/``.bin``/``.ckpt`` read safely, or
    ``.safetensors``)."""
    state = open_clip_state_dict(read_state_dict(path))
    if not any(k.startswith(("visual.", "text.")) for k in state):
        raise ValueError(
            f"{path} holds no open_clip tensors: neither visual.* nor text.* (CustomTextCLIP) nor the "
            f"CLIP text keys (token_embedding, transformer.*, ...); is it an open_clip checkpoint?"
        )
    return state


def from_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip state dict in any layout as this package's keys for ``model=openclip``."""
    out = {}
    for k, v in open_clip_state_dict(state).items():
        if k.startswith("visual."):
            out[f"towers.image.{k}"] = v
        elif k.startswith("text."):
            out[f"towers.text.{k}"] = v
        elif k.startswith("text_decoder."):  # CoCa
            out[f"decoder.{k}"] = v
        elif k == "logit_scale":
            out["logit_scales.shared"] = v
        elif k == "logit_bias":
            out["logit_bias"] = v
    return out


def open_clip_model_config(
    model_cfg: dict[str, Any] | str, init_logit_bias: float | None = None
) -> dict[str, Any]:
    """The ``model=openclip`` config (both towers from one open_clip model config); SigLIP configs
    (``init_logit_bias`` in ``model_cfg``, or given) get the learnable logit bias."""
    if init_logit_bias is None and hasattr(model_cfg, "get"):
        init_logit_bias = model_cfg.get("init_logit_bias")
    out = {
        "embed_dim": None,
        "temperature_pairs": None,
        "init_logit_bias": init_logit_bias,
        "towers": {
            m: {"_target_": TOWER_TARGET, "modality": m, "config": model_cfg} for m in ("image", "text")
        },
    }
    if hasattr(model_cfg, "get") and model_cfg.get("multimodal_cfg"):  # CoCa: open_clip's caption decoder
        out["decoder"] = {}
    return out


# -- out -------------------------------------------------------------------------------------------
def open_clip_model_cfg(model) -> dict[str, Any]:
    """The one open_clip model_cfg behind every tower, or a clear error if the model is not
    open_clip-native."""
    kinds = {m: type(t).__name__ for m, t in model.towers.items()}
    if set(model.modalities) != {"image", "text"} or not all(
        t.config.get("_target_") == TOWER_TARGET for t in model.towers.values()
    ):
        raise ValueError(
            f"format=open_clip needs an image and a text tower both built by open_clip (model=openclip "
            f"model.config=JSON); this model has {kinds}. Use format=mmpretrain for it."
        )
    cfgs = [t.model_cfg for t in model.towers.values()]
    if cfgs[0] != cfgs[1]:
        raise ValueError(
            "format=open_clip needs both towers built from the same open_clip model config; "
            "these two differ. Use format=mmpretrain."
        )
    if set(model.logit_scales) != {"shared"}:
        raise ValueError("format=open_clip needs one shared temperature (temperature_pairs=null)")
    return dict(cfgs[0])


def to_open_clip_state_dict(model) -> dict[str, torch.Tensor]:
    """A ``model=openclip`` ContrastiveModel's tensors under CustomTextCLIP keys."""
    out = {}
    for k, v in model.state_dict().items():
        for ours, theirs in _OURS_TO_OPEN_CLIP.items():
            if k.startswith(ours):
                out[theirs + k[len(ours) :]] = v.detach().contiguous().cpu()
                break
        else:
            hint = (
                " (a caption decoder of ours: open_clip's layout holds only open_clip's CoCa decoder, "
                "model=openclip with a multimodal_cfg; use format=mmpretrain)"
                if k.startswith("decoder.")
                else ""
            )
            raise ValueError(f"tensor '{k}' has no open_clip counterpart{hint}")
    return out


def export_open_clip(model, out: str | Path) -> Path:
    """open_clip's own directory layout: ``open_clip.create_model_and_transforms("local-dir:DIR")``
    and ``open_clip.get_tokenizer("local-dir:DIR")`` load it without mmpretrain. A model with a
    logit bias (SigLIP) is written with ``init_logit_bias`` so that open_clip builds one too."""
    model_cfg = open_clip_model_cfg(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # custom_text: our text tower is open_clip's TextTransformer under ``text.``, as in CustomTextCLIP.
    oc_model_cfg = {k: v for k, v in model_cfg.items() if k not in ("preprocess_cfg", "init_logit_bias")}
    oc_model_cfg["custom_text"] = True
    if model.logit_bias is not None:
        oc_model_cfg["init_logit_bias"] = float(model.logit_bias.detach())
    config = {"model_cfg": oc_model_cfg, "preprocess_cfg": preprocess_cfg(model_cfg)}
    state = to_open_clip_state_dict(model)
    atomic_write(out / OPEN_CLIP_WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_text_atomic(out / OPEN_CLIP_CONFIG, json.dumps(config, indent=2))
    return out
