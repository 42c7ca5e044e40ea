"""Bundled datasets, by name: ``mmpretrain data NAME out=DIR``; ``shards`` converts the user's own data."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmpretrain.data.convert import convert
from mmpretrain.data.synthetic import digits, digits_classifier, moving_digits, scenes, spoken_digits

BUILDERS: dict[str, Callable[..., Path]] = {
    "digits": digits.build_digits,
    "spoken-digits": spoken_digits.build_spoken_digits,
    "digits-classifier": digits_classifier.build_digits_classifier,  # weights: LiT's pretrained image tower
    "scenes": scenes.build_scenes,  # drawn shapes, 5 captions and hard negatives each
    "moving-digits": moving_digits.build_moving_digits,  # mp4 clips + spoken captions (video, audio, text)
    "shards": convert.convert,  # in=TABLE_OR_FOLDER: the user's own data into our layout
}

# The keys of conf/build_data.yaml each builder takes (the others belong to other builders).
OPTIONS: dict[str, tuple[str, ...]] = {
    "scenes": ("seed", "train", "val", "test", "workers", "image_size_min", "image_size_max", "shard_size"),
    "moving-digits": ("seed", "train", "val", "workers", "image_size", "frames", "fps", "sample_rate"),
    "shards": (
        "in",
        "val",
        "val_fraction",
        "shard_size",
        "workers",
        "img_key",
        "caption_key",
        "label_key",
        "separator",
        "labels",
        "classnames",
        "question_key",
        "answer_key",
        "answer_separator",
    ),
}
DEFAULT_OPTIONS = ("seed", "image_size")

#: What each builder writes, one line for ``mmpretrain data --help`` (else its docstring's first line).
ABOUT: dict[str, str] = {
    "digits": "scikit-learn's 8x8 digits as captioned images (seeded 80/20 train/val split)",
    "spoken-digits": "the digits spoken by espeak-ng (wav) beside their image and caption",
    "digits-classifier": "a small supervised digits backbone (weights for LiT's locked image tower)",
    "scenes": "drawn scenes of 1-4 coloured shapes, 5 captions and hard negatives each",
    "moving-digits": "short mp4 clips of moving digits with captions, the first one spoken",
    "shards": "your own data (a table, a folder of media, img2dataset tars) as our shards",
}
# Built by commands/data.py (it needs a teacher model, above this layer): `mmpretrain data --help` lists it.
TEACHER_EMBEDDINGS = (
    "teacher-embeddings",
    "in=SHARDS out=DIR teacher=T model=...: the shards with a teacher's embeddings (distill.cached=true)",
)


def build(name: str, out: str | Path, **kwargs: Any) -> Path:
    if name not in BUILDERS:
        raise ValueError(f"no bundled dataset '{name}'; choose one of {sorted(BUILDERS)}")
    return BUILDERS[name](out, **kwargs)


def options(name: str, cfg: Any) -> dict[str, Any]:
    """The options of builder ``name`` out of the ``build_data`` config (``in`` becomes ``src``);
    null ones are left out, so the builder's own default applies."""
    picked = {key: cfg.get(key) for key in OPTIONS.get(name, DEFAULT_OPTIONS)}
    picked = {key: value for key, value in picked.items() if value is not None or key == "in"}
    if "in" in picked:
        picked["src"] = picked.pop("in")
        if picked["src"] is None:
            raise ValueError(
                "mmpretrain data shards needs in=TABLE_OR_FOLDER (a .csv/.tsv/.parquet or a folder)"
            )
    return picked


def describe(name: str, cfg: Any) -> tuple[str, dict[str, Any]]:
    """``(what builder name writes, {option: default})`` for the help: an option's default is its
    value in the ``build_data`` config ``cfg``, else the builder's own (None: none; ``in``: required)."""
    fn = BUILDERS[name]
    about = ABOUT.get(name) or (inspect.getdoc(fn) or "").split("\n", 1)[0]
    own = {
        key: p.default
        for key, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    defaults = {}
    for key in OPTIONS.get(name, DEFAULT_OPTIONS):
        value = cfg.get(key)
        defaults[key] = value if value is not None else own.get("src" if key == "in" else key)
    return about, defaults


def is_built(root: str | Path, name: str = "digits") -> bool:
    """Whether ``root`` holds what builder ``name`` writes (the shard layout; the classifier's weights)."""
    checks = {
        "digits-classifier": digits_classifier.is_built,
        "scenes": scenes.is_built,
        "moving-digits": moving_digits.is_built,
    }
    return checks.get(name, digits.is_built)(root)
