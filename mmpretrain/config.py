"""Restricted instantiation of ``_target_`` entries: configs may only build allow-listed classes.

A config (from a CLI override, a sweep, an exported ``config.json``) must never be able to call
``os.system`` or ``builtins.exec``. Every ``_target_`` is resolved to an object, and the object's
own module (not the dotted path, which ``mmpretrain.cli.os.system`` would fool) must be under an
allowed prefix, and it must be a class.
"""

from __future__ import annotations

from typing import Any, Iterable

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

DEFAULT_ALLOWED = (
    "mmpretrain.",
    "torch.optim.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.strategies.",
    "lightning.pytorch.plugins.",
)


class UnsafeTargetError(ValueError):
    pass


def _targets(node: Any) -> Iterable[str]:
    if isinstance(node, (dict, DictConfig)):
        for k, v in node.items():
            if k == "_target_":
                yield str(v)
            else:
                yield from _targets(v)
    elif isinstance(node, (list, tuple, ListConfig)):
        for v in node:
            yield from _targets(v)


def check_targets(cfg: Any, allowed: Iterable[str] = DEFAULT_ALLOWED) -> None:
    allowed = tuple(allowed)
    for target in _targets(cfg):
        if not target.startswith(allowed):
            raise UnsafeTargetError(
                f"_target_: {target} is not allowed: configs may only build classes under {', '.join(allowed)}"
            )
        try:
            obj = get_object(target)
        except Exception as e:  # noqa: BLE001 - Hydra raises several types here
            raise UnsafeTargetError(f"_target_: {target} cannot be imported ({e})") from None
        module = getattr(obj, "__module__", "") or ""
        if not isinstance(obj, type) or not f"{module}.".startswith(allowed):
            raise UnsafeTargetError(
                f"_target_: {target} resolves to {obj!r} (module '{module}'), which is not an allowed class"
            )


def safe_instantiate(cfg: Any, allowed: Iterable[str] = DEFAULT_ALLOWED, **kwargs: Any) -> Any:
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    check_targets(cfg, allowed)
    return instantiate(cfg, _convert_="all", **kwargs)
