"""The bundled demo data: scikit-learn's 8x8 digits as image-caption-class webdataset shards."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

from mmpretrain.data.convert.writing import write_prompt_files as _write_prompt_files
from mmpretrain.data.convert.writing import write_shard, write_sizes

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Zero-shot prompts: "{}" is replaced by a class name.
TEMPLATES = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "an image of a {}.",
]

# Training captions: the digit as a word or a numeral in several phrasings.
CAPTIONS = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "an image of a {}.",
    "a small scan of a handwritten {}",
    "digit {}",
    "{}",
    "a blurry picture showing the number {}",
]


def caption_for(label: int, rng: random.Random) -> str:
    name = CLASSNAMES[label] if rng.random() < 0.5 else str(label)
    return rng.choice(CAPTIONS).format(name)


def digit_png(pixels: np.ndarray, size: int) -> bytes:
    """8x8 grey levels 0..16 -> upsampled RGB PNG."""
    arr = (pixels.reshape(8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_split(out: Path, name: str, items: list[dict], shards: int) -> dict[str, int]:
    (out / name).mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(shards):
        fname = f"{name}-{s:04d}.tar"
        sizes[fname] = write_shard(out / name / fname, items[s::shards])
    write_sizes(out / name, sizes)
    return sizes


def build_digits(
    out: str | Path,
    image_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.2,
    train_shards: int = 8,
    val_shards: int = 4,
) -> Path:
    """Write ``out/train/*.tar``, ``out/val/*.tar``, ``classnames.txt``, ``templates.txt``."""
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    order = np.random.RandomState(seed).permutation(len(digits.target))
    n_val = round(len(order) * val_fraction)
    splits = {"val": order[:n_val], "train": order[n_val:]}
    rng = random.Random(seed)
    for name, idx in splits.items():
        items = [
            {
                "__key__": f"digits_{i:05d}",
                "png": digit_png(digits.data[i], image_size),
                "txt": caption_for(int(digits.target[i]), rng),
                "cls": str(int(digits.target[i])),
            }
            for i in idx
        ]
        write_split(out, name, items, train_shards if name == "train" else val_shards)
    write_prompt_files(out, TEMPLATES)
    return out


def write_prompt_files(out: Path, templates: list[str]) -> None:
    """``classnames.txt`` (the digit words, in label order) and ``templates.txt`` for zero-shot."""
    _write_prompt_files(out, CLASSNAMES, templates)


def is_built(root: str | Path) -> bool:
    root = Path(root)
    return (
        (root / "classnames.txt").exists()
        and any((root / "train").glob("*.tar"))
        and any((root / "val").glob("*.tar"))
    )
