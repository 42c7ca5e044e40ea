"""Building objects from configs, safely: a ``_target_`` may only name an allow-listed class.

A config (from a CLI override, a sweep, an exported ``config.json``) must never be able to call
``os.system`` or ``builtins.exec``. Every ``_target_`` is resolved to an object, and the object's own
module (not the dotted path, which ``mmpretrain.cli.os.system`` would fool) must be under an allowed
prefix, and it must be a class. The class is called with the other keys as keyword arguments (plain
dicts and lists; nested ``_target_`` entries are checked but passed on as dicts, for the class to
build: a video tower builds its frame tower). Neither Hydra nor Lightning is imported here.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, MutableSequence
from typing import Any

DEFAULT_ALLOWED = (
    "mmpretrain.",
    "torch.optim.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.strategies.",
    "lightning.pytorch.plugins.",
)

#: Where classes named by configs of earlier versions live now (a user's own config files and the
#: ``train_config`` of older exports keep working).
MOVED = {
    "mmpretrain.monitor.": "mmpretrain.training.monitor.",
    "mmpretrain.callbacks.": "mmpretrain.training.callbacks.",
    "mmpretrain.ddp.": "mmpretrain.runtime.ddp.",
    "mmpretrain.sharding.": "mmpretrain.runtime.fsdp.",
    "mmpretrain.cli.SweepCallback": "mmpretrain.commands.sweep_summary.SweepCallback",
}
_SPECIAL = ("_target_", "_recursive_", "_convert_", "_partial_")


class UnsafeTargetError(ValueError):
    pass


def to_plain(cfg: Any) -> Any:
    """``cfg`` as plain dicts and lists, as JSON holds them: mappings (OmegaConf's DictConfig too, its
    interpolations resolved) and sequences (lists, tuples, ListConfig) anywhere inside converted."""
    if isinstance(cfg, Mapping):  # DictConfig.items() resolves interpolations
        return {k: to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (MutableSequence, tuple)):
        return [to_plain(v) for v in cfg]
    return cfg


def current_target(target: str) -> str:
    """``target`` with a moved module path replaced by where the class lives now."""
    for old, new in MOVED.items():
        if target.startswith(old):
            return new + target[len(old) :]
    return target


def locate(path: str) -> Any:
    """The object a dotted path names (a module attribute, possibly nested: ``pkg.mod.Class``)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"no module in '{path}' can be imported")


def _targets(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                yield str(v)
            else:
                yield from _targets(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _targets(v)


def check_targets(cfg: Any, allowed: Iterable[str] = DEFAULT_ALLOWED) -> None:
    """Raise :class:`UnsafeTargetError` unless every ``_target_`` in ``cfg`` is an allowed class."""
    allowed = tuple(allowed)
    for target in _targets(to_plain(cfg)):
        target = current_target(target)
        if not target.startswith(allowed):
            raise UnsafeTargetError(
                f"_target_: {target} is not allowed: configs may only build classes under "
                f"{', '.join(allowed)}"
            )
        try:
            obj = locate(target)
        except Exception as e:  # noqa: BLE001 - an import can fail in many ways
            raise UnsafeTargetError(f"_target_: {target} cannot be imported ({e})") from None
        module = getattr(obj, "__module__", "") or ""
        if not isinstance(obj, type) or not f"{module}.".startswith(allowed):
            raise UnsafeTargetError(
                f"_target_: {target} resolves to {obj!r} (module '{module}'), which is not an allowed class"
            )


def safe_instantiate(cfg: Any, allowed: Iterable[str] = DEFAULT_ALLOWED, **kwargs: Any) -> Any:
    """``cfg["_target_"](**rest_of_cfg, **kwargs)`` after :func:`check_targets`."""
    cfg = to_plain(cfg)
    check_targets(cfg, allowed)
    args = {k: v for k, v in cfg.items() if k not in _SPECIAL} | kwargs
    return locate(current_target(str(cfg["_target_"])))(**args)


def instantiate_all(group: Any) -> list:
    """Every entry of a config group that names a ``_target_`` (callbacks, loggers), built in order."""
    return [safe_instantiate(c) for c in (group or {}).values() if c is not None and c.get("_target_")]
