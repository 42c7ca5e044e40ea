"""Where pretrained weights come from: open_clip tags, hf-hub ids, timm names, or a local file.

Every remote file goes through huggingface_hub's cache (open_clip's and timm's own download
functions call ``hf_hub_download``), so with ``HF_HUB_OFFLINE=1`` and the files cached everything
works offline. A file that is neither cached nor downloadable raises
:class:`WeightsUnavailableError` naming the repo, the file and the two ways out.

- ``open_clip_config(repo)``: the model config of an open_clip model on the hub
  (``open_clip_config.json``: ``model_cfg`` + ``preprocess_cfg``).
- ``open_clip_weights(config, pretrained)``: the checkpoint file for a registry name + tag
  (``ViT-B-32`` + ``laion2b_s34b_b79k``, via ``open_clip.get_pretrained_cfg``), an
  ``hf-hub:ORG/REPO`` id, or an ``hf-hub:`` config alone (its own weights, as open_clip does).
- ``check_timm_weights(name)``: that timm's weights for ``name`` (a registry name, its default
  tag, or ``hf-hub:ORG/REPO``) are reachable; timm itself then loads them.
- ``check_available(model_cfg)``: all of the above for a composed model config, before anything
  heavy starts.
"""

from __future__ import annotations

import json
import os
from typing import Any

HUB_PREFIX = "hf-hub:"
# open_clip's default file names in a hub repo (open_clip.constants), safetensors first.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# timm's (timm.models._hub), safetensors first.
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class WeightsUnavailableError(FileNotFoundError):
    """A pretrained file is neither in the Hugging Face hub cache nor downloadable."""

    def __init__(self, repo: str, files: tuple[str, ...] | list[str], what: str):
        from huggingface_hub import constants

        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        alternatives = f" (or {', '.join(files[1:])})" if len(files) > 1 else ""
        super().__init__(
            f"{what} needs '{files[0]}'{alternatives} from the Hugging Face hub repo '{repo}', which is "
            f"neither in the hub cache ({constants.HF_HUB_CACHE}) nor downloadable{offline}. Either "
            f"download it on a machine with network: `huggingface-cli download {repo} {files[0]}` (and copy "
            "the cache here, or point HF_HUB_CACHE at it), or give a local file with pretrained_path=FILE "
            "(model.towers.<modality>.pretrained_path) instead."
        )
        self.repo, self.files = repo, tuple(files)


def is_hub_id(name: Any) -> bool:
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def _hub_file(repo: str, files: tuple[str, ...], what: str) -> str:
    """The first of ``files`` in ``repo`` that the cache holds or the hub serves."""
    from huggingface_hub import hf_hub_download

    for filename in files:
        try:
            return hf_hub_download(repo, filename)
        except (OSError, ValueError):  # not cached, offline, no network (all OSError), not in the repo
            pass
    raise WeightsUnavailableError(repo, files, what)


# -- open_clip --------------------------------------------------------------------------------------
def open_clip_config(config: str) -> dict[str, Any]:
    """``model_cfg`` of ``hf-hub:ORG/REPO`` with the repo's ``preprocess_cfg`` folded in."""
    repo = config.removeprefix(HUB_PREFIX)
    path = _hub_file(repo, ("open_clip_config.json",), f"open_clip model '{config}'")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    cfg = dict(data.get("model_cfg", data))
    if data.get("preprocess_cfg"):
        cfg["preprocess_cfg"] = dict(cfg.get("preprocess_cfg", {})) | dict(data["preprocess_cfg"])
    return cfg


def open_clip_weights(config: Any, pretrained: str | None) -> tuple[str | None, dict[str, Any]]:
    """``(checkpoint file, preprocess overrides)`` for an open_clip model; ``(None, {})`` when none.

    ``pretrained``: a tag of the registry name ``config`` (``open_clip.list_pretrained_tags_by_model``),
    ``hf-hub:ORG/REPO``, or a local file. ``config=hf-hub:ORG/REPO`` with no ``pretrained`` takes
    that repo's weights.
    """
    import open_clip

    if not pretrained and is_hub_id(config):
        pretrained = config
    if not pretrained:
        return None, {}
    pretrained = str(pretrained)
    if is_hub_id(pretrained):
        repo = pretrained.removeprefix(HUB_PREFIX)
        return _hub_file(repo, OPEN_CLIP_WEIGHTS, f"open_clip weights '{pretrained}'"), {}
    if os.path.isfile(pretrained):
        return pretrained, {}
    name = str(config)
    pcfg = open_clip.get_pretrained_cfg(name, pretrained) if isinstance(config, str) else {}
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(name) if isinstance(config, str) else []
        raise ValueError(
            f"open_clip has no pretrained weights '{pretrained}' for model '{name}'. Tags for it: "
            f"{tags or 'none'}; or pretrained=hf-hub:ORG/REPO, or a local file with pretrained_path=FILE."
        )
    preprocess = {
        k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if pcfg.get(k) is not None
    }
    hub = pcfg.get("hf_hub", "")
    if hub:  # open_clip's convention: 'org/repo/' (default file name) or 'org/repo/file'
        repo, filename = os.path.split(hub)
        files = (filename,) if filename else OPEN_CLIP_WEIGHTS
        if filename.endswith((".bin", ".pth")):  # open_clip prefers the safetensors twin
            files = (filename[:-4] + ".safetensors", filename)
        return _hub_file(repo, files, f"open_clip weights '{name}' / '{pretrained}'"), preprocess
    return open_clip.download_pretrained(pcfg), preprocess  # a URL-only tag: open_clip's own cache


def checkpoint_scalars(path: str, keys: tuple[str, ...] = ("logit_scale", "logit_bias")) -> dict[str, float]:
    """The scalar tensors ``keys`` of a checkpoint (read lazily: the rest is not loaded)."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            return {k: float(f.get_tensor(k)) for k in keys if k in names}
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    found = {}
    for key in keys:
        match = next((v for k, v in state.items() if k.removeprefix("module.") == key), None)
        if match is not None:
            found[key] = float(match)
    return found


# -- timm -------------------------------------------------------------------------------------------
def check_timm_weights(model_name: str) -> None:
    """Raise :class:`WeightsUnavailableError` unless timm can load ``model_name``'s pretrained weights."""
    if is_hub_id(model_name):
        repo = model_name.removeprefix(HUB_PREFIX).split("@")[0]
        _hub_file(repo, ("config.json",), f"timm model '{model_name}'")
        _hub_file(repo, TIMM_WEIGHTS, f"timm model '{model_name}'")
        return
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(model_name)
    if pcfg is None:
        raise ValueError(
            f"timm has no pretrained weights for '{model_name}'; set pretrained=false or pretrained_path"
        )
    pcfg = pcfg.to_dict()
    if pcfg.get("hf_hub_id"):
        filename = pcfg.get("hf_hub_filename")
        files = (filename,) if filename else TIMM_WEIGHTS
        _hub_file(pcfg["hf_hub_id"], files, f"timm model '{model_name}' (pretrained=true)")


# -- a whole model config, before anything heavy ----------------------------------------------------
def tower_configs(model_cfg: Any) -> list[Any]:
    """Every tower config of a model config, with the frame tower inside a video tower."""
    out = []
    for tower in (model_cfg.get("towers") or {}).values():
        if tower is not None:
            out.append(tower)
            if tower.get("frame") is not None:
                out.append(tower["frame"])
    return out


def check_available(model_cfg: Any) -> None:
    """Resolve every pretrained file a composed model config names (cached or downloaded now).

    Raises :class:`WeightsUnavailableError` for the first one that is unreachable.
    """
    for tower in tower_configs(model_cfg):
        if tower.get("pretrained_path"):
            continue  # a local file: the tower reads it
        if "config" in tower:  # an open_clip tower
            config, pretrained = tower.get("config"), tower.get("pretrained")
            if is_hub_id(config):
                open_clip_config(config)
            open_clip_weights(config, pretrained)
        elif "model_name" in tower:  # a timm tower: pretrained null means "only for an hf-hub: name"
            wanted = tower.get("pretrained")
            if wanted or (wanted is None and is_hub_id(tower["model_name"])):
                check_timm_weights(tower["model_name"])
