"""Towers backed by timm: any ``timm.create_model`` name; timm's pretrained weights, a local file, or
random init."""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_data_config

from mmpretrain.io import read_state_dict
from mmpretrain.pretrained import HUB_PREFIX, check_timm_weights, is_hub_id
from mmpretrain.towers.base import ImageNormalize, Tower, check_patch_dropout, uint8_transform


def unknown_model_error(name: str, library: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    if library == "timm":
        pattern, key, where = f"'*{name[:4]}*'", "model_name", "NAME"
    else:  # open_clip: a registry name or a model-config JSON
        pattern, key, where = "", "config", "NAME (or a path to an open_clip model-config JSON)"
    return ValueError(
        f"{library} has no model named '{name}'.{hint} "
        f"Pick a name from {library}'s list (`python -c \"import {library}; "
        f'print({library}.list_models({pattern}))"`) '
        f"and set it as model.towers.<modality>.{key}={where}."
    )


def load_local_weights(module: torch.nn.Module, path: str, strict: bool = False) -> None:
    """Load a local weights file (safetensors or a torch file, never unpickled) into ``module``."""
    state = read_state_dict(path)
    missing, unexpected = module.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "classifier."))]
    if strict and (missing or unexpected):
        raise ValueError(
            f"weights in {path} do not match the tower: missing={missing} unexpected={unexpected}"
        )
    if len(missing) == len(module.state_dict()):
        raise ValueError(f"no tensor in {path} matches the tower's parameter names; is it the right file?")


def timm_weights_wanted(
    config: dict[str, Any], model_name: str, pretrained: bool | None, pretrained_path: str | None
) -> bool:
    """Whether timm should load hub weights for ``model_name`` (checked to exist first, for a clear
    error rather than one from inside huggingface_hub); fails on an unknown name.

    ``pretrained=None``: a hub name means its weights, a registry name random init. A tower named by
    hub id records ``pretrained: false`` in its ``config``: rebuilt from an export, its weights come
    from the export, not the hub.
    """
    hub = is_hub_id(model_name)
    if pretrained is None:
        pretrained = hub
    if hub:
        config["pretrained"] = False
    if not hub and not timm.is_model(model_name):
        raise unknown_model_error(model_name, "timm", timm.list_models())
    if pretrained and not pretrained_path:
        check_timm_weights(model_name)
    return bool(pretrained)


def record_hub_architecture(config: dict[str, Any], model_name: str, kwargs: dict[str, Any]) -> None:
    """For a model named by hub id, record in ``config`` what the hub's ``config.json`` said (the
    architecture, its arguments, the weights' preprocessing settings), so that rebuilding the tower from
    a checkpoint or an export contacts no hub (its weights come from there anyway)."""
    if not is_hub_id(model_name):
        return
    from timm.models import load_model_config_from_hf

    pcfg, architecture, model_args = load_model_config_from_hf(model_name.removeprefix(HUB_PREFIX))  # cached
    model_args = {k: v for k, v in model_args.items() if k not in ("num_classes", "in_chans")}
    config.update(
        model_name=architecture,
        model_kwargs=model_args | kwargs,
        pretrained_cfg=json.loads(json.dumps(pcfg, default=str)),
        pretrained=False,
    )


class TimmTower(Tower):
    """An image (or spectrogram) encoder from timm, with timm's own transforms.

    ``preprocess`` gives ``uint8 [C, H, W]`` (timm's transform without its ToTensor + Normalize) and
    ``forward`` normalises uint8 input with timm's mean/std; float input is taken as normalised.
    """

    def __init__(
        self,
        model_name: str,
        modality: str = "image",
        pretrained_path: str | None = None,
        img_size: int | None = None,
        in_chans: int = 3,
        model_kwargs: dict[str, Any] | None = None,
        transform: dict[str, Any] | None = None,
        pretrained: bool | None = None,
        pretrained_cfg: dict[str, Any] | None = None,
    ):
        """``pretrained=True``: timm's default weights for ``model_name``; ``model_name=hf-hub:ORG/REPO``
        loads that repo's weights unless ``pretrained=False``. A local ``pretrained_path`` replaces both.
        ``pretrained_cfg``: timm's preprocessing settings of the weights (recorded for hub models)."""
        super().__init__(
            {
                "_target_": f"{__name__}.TimmTower",
                "model_name": model_name,
                "modality": modality,
                "img_size": img_size,
                "in_chans": in_chans,
                "model_kwargs": dict(model_kwargs or {}),
                "transform": dict(transform or {}),
            }
        )
        if pretrained_cfg:
            self.config["pretrained_cfg"] = dict(pretrained_cfg)
        pretrained = timm_weights_wanted(self.config, model_name, pretrained, pretrained_path)
        # img_size sizes the transforms; ViT-style models also need it in model_kwargs.
        kwargs = dict(model_kwargs or {})
        self.modality = modality
        self.model = timm.create_model(
            model_name,
            pretrained=pretrained and not pretrained_path,
            num_classes=0,
            in_chans=in_chans,
            pretrained_cfg=pretrained_cfg,
            **kwargs,
        )
        record_hub_architecture(self.config, model_name, kwargs)
        if pretrained_path:
            load_local_weights(self.model, pretrained_path)
        self.output_dim = self.model.num_features
        size = img_size or self.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        self.data_config = resolve_data_config({"input_size": (in_chans, size, size)}, model=self.model)
        self.transform_kwargs = dict(transform or {})
        self.input_norm = ImageNormalize(self.data_config["mean"], self.data_config["std"])
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features before timm's global pool (``forward_features``): ``[N, C, h, w]``
        for a CNN (``[N, tokens, C]`` for a ViT), the input normalised as in :meth:`forward`."""
        x = self.input_norm(x)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model.forward_features(x)

    def forward_with_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(x)`` and the backbone's features before the pool as tokens: a CNN's ``[N, C, h, w]``
        map as ``h*w`` tokens, a ViT's tokens as they are; one pass through the backbone."""
        fmap = self.feature_map(x)
        pooled = self.model.forward_head(fmap)
        return pooled, (fmap.flatten(2).transpose(1, 2) if fmap.ndim == 4 else fmap)

    def preprocess(self, train: bool) -> Callable:
        kwargs = dict(self.transform_kwargs) if train else {}
        # uint8 [C, H, W] (timm's transform without ToTensor + Normalize): forward normalises.
        return uint8_transform(create_transform(**self.data_config, is_training=train, **kwargs))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def set_patch_dropout(self, prob: float) -> None:
        """timm's own ``PatchDropout`` (its ViTs' ``patch_drop_rate``) in place of the model's ``patch_drop``;
        timm applies it in training only and keeps the prefix (class, register) tokens."""
        from timm.layers import PatchDropout

        if not hasattr(self.model, "patch_drop"):
            super().set_patch_dropout(prob)
        check_patch_dropout(prob)
        prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        self.model.patch_drop = (
            PatchDropout(prob, num_prefix_tokens=prefix) if prob > 0 else torch.nn.Identity()
        )

    def set_channels_last(self, enable: bool = True) -> None:
        """NHWC weights and inputs: faster convolutions on GPUs with tensor cores (and oneDNN CPUs)."""
        self.channels_last = enable
        self.model.to(memory_format=torch.channels_last if enable else torch.contiguous_format)

    def param_groups(self):
        # timm's group_matcher gives stem / blocks / head in order for every model family.
        from timm.models import group_parameters

        matcher = self.model.group_matcher(coarse=True)
        named = dict(self.model.named_parameters())
        grouped = group_parameters(self.model, matcher, reverse=False)
        return [[named[n] for n in names] for _, names in sorted(grouped.items())]
