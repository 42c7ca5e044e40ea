"""A Hugging Face hub cache in a directory, in huggingface_hub's own layout, for offline tests.

``models--ORG--REPO/refs/main`` holds the revision, ``snapshots/<rev>/<file>`` the files: what
``hf_hub_download`` finds with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing at the directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

REVISION = "0123456789abcdef0123456789abcdef01234567"
# A tiny open_clip model (2-layer ViT and text transformer).
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def snapshot(cache: Path, repo: str) -> Path:
    """The snapshot directory of ``repo`` (created, with ``refs/main``)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    snap = root / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def add_open_clip(
    cache: Path, repo: str, logit_bias: float | None = None, seed: int = 0
) -> open_clip.CustomTextCLIP:
    """Save a tiny open_clip model as open_clip publishes one on the hub; return it (the reference)."""
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**TINY_OPEN_CLIP, init_logit_bias=logit_bias).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.25)
    snap = snapshot(cache, repo)
    (snap / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": TINY_PREPROCESS})
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "open_clip_model.safetensors")
    )
    return model


def add_timm(cache: Path, repo: str, model_name: str = "resnet10t", seed: int = 0) -> torch.nn.Module:
    """Save a timm model with timm's own hub writer (config.json + model.safetensors); return it."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False).eval()
    save_for_hf(model, snapshot(cache, repo), safe_serialization=True)
    return model
