"""Bundled datasets, by name: ``mmpretrain data NAME out=DIR``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmpretrain.data import digits, digits_classifier, scenes, spoken_digits

BUILDERS: dict[str, Callable[..., Path]] = {
    "digits": digits.build_digits,
    "spoken-digits": spoken_digits.build_spoken_digits,
    "digits-classifier": digits_classifier.build_digits_classifier,  # weights: LiT's pretrained image tower
    "scenes": scenes.build_scenes,  # drawn shapes, 5 captions and hard negatives each
}


def build(name: str, out: str | Path, **kwargs: Any) -> Path:
    if name not in BUILDERS:
        raise ValueError(f"no bundled dataset '{name}'; choose one of {sorted(BUILDERS)}")
    return BUILDERS[name](out, **kwargs)


def is_built(root: str | Path, name: str = "digits") -> bool:
    """Whether ``root`` holds what builder ``name`` writes (the shard layout; the classifier's weights)."""
    checks = {"digits-classifier": digits_classifier.is_built, "scenes": scenes.is_built}
    return checks.get(name, digits.is_built)(root)
