"""Optimiser parameter groups and the warmup-cosine schedule (stepped per optimiser step)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, lr_scales: dict[int, float] | None = None
) -> list[dict[str, Any]]:
    """No weight decay on biases, norms (all <2-D tensors) and temperatures, as in CLIP.

    ``lr_scales`` maps ``id(param)`` to a learning-rate multiplier (per tower, layer decay);
    parameters sharing (multiplier, decay) share a group whose ``lr_scale`` key records it.
    Frozen parameters (``requires_grad=False``) are left out.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        wd = 0.0 if p.ndim < 2 or "logit_scale" in name or "bias" in name else weight_decay
        scale = (lr_scales or {}).get(id(p), 1.0)
        groups.setdefault((scale, wd), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": scale} for (scale, wd), ps in groups.items()]


def lr_scales(model: nn.Module, towers_cfg: Any = None, layer_decay: float | None = None) -> dict[int, float]:
    """Learning-rate multipliers: ``towers.<m>.lr_scale`` times ``layer_decay ** depth_from_top``.

    A tower's parameter groups (``Tower.param_groups``: stem, blocks ..., head) get
    ``layer_decay**(n-1-i)``, so the head trains at the tower's rate and the stem slowest. The
    tower's projection trains at the tower's rate; temperatures and bias at the base rate.
    """
    scales: dict[int, float] = {}
    for m, tower in getattr(model, "towers", {}).items():
        tower_scale = float(((towers_cfg or {}).get(m) or {}).get("lr_scale", 1.0) or 1.0)
        groups = tower.param_groups()
        for i, group in enumerate(groups):
            depth = len(groups) - 1 - i
            for p in group:
                scales[id(p)] = tower_scale * (float(layer_decay) ** depth if layer_decay else 1.0)
        for p in model.projections[m].parameters():
            scales[id(p)] = tower_scale
    return scales


def build_optimizer(model: nn.Module, cfg: Any, towers_cfg: Any = None) -> torch.optim.Optimizer:
    scales = lr_scales(model, towers_cfg, cfg.get("layer_decay"))
    groups = param_groups(model.named_parameters(), float(cfg["weight_decay"]), scales)
    if not groups:
        raise ValueError("every parameter is frozen (model.towers.*.lock): nothing to train")
    lr = float(cfg["lr"])
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    betas = tuple(cfg.get("betas", (0.9, 0.98)))
    fused = cfg.get("fused", "auto")
    if fused == "auto":
        fused = can_fuse([p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=float(cfg.get("eps", 1e-6)), fused=bool(fused))


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW (one kernel over all tensors) takes ``params``: floating-point
    tensors on CPU or CUDA."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def warmup_steps(value: float | int | None, total_steps: int) -> int:
    """``optim.warmup_steps`` in steps: a value in (0, 1) is a fraction of the run's ``total_steps``,
    anything else a step count."""
    value = float(value or 0)
    if value < 0:
        raise ValueError(
            f"warmup_steps must be >= 0 (steps, or a fraction of the run in (0, 1)), got {value}"
        )
    return int(value * total_steps) if value < 1 else int(value)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """LambdaLR factor: linear warmup from ~0 to 1, then cosine to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
