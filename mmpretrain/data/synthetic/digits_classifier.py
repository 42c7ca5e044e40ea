"""A supervised digits classifier's backbone as a local weights file: the pretrained image tower of
``experiment=lit_digits`` (LiT: a locked, pretrained image tower and a text tower trained to match).

``mmpretrain data digits-classifier out=DIR`` trains timm's ``resnet10t`` at 32 px (the image
tower of ``model=tiny``) with a linear head on the *train* split of the bundled digits (the shards
of ``mmpretrain data digits``, built beside ``DIR`` when missing), through the same tower class,
transforms and shard reader as contrastive training, and writes the backbone (no head) to
``DIR/model.safetensors``, loadable by ``model.towers.image.pretrained_path=``, plus
``DIR/info.json`` (val accuracy, epochs, seconds). The val split is never trained on.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from mmpretrain.data.stream.pipeline import ShardStream
from mmpretrain.data.stream.shards import Source, count_samples
from mmpretrain.data.synthetic import digits
from mmpretrain.io import atomic_write, write_text_atomic

WEIGHTS = "model.safetensors"


def is_built(out: str | Path) -> bool:
    return (Path(out) / WEIGHTS).is_file()


def build_digits_classifier(
    out: str | Path,
    digits_root: str | Path | None = None,
    model_name: str = "resnet10t",
    image_size: int = 32,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    **_: object,
) -> Path:
    from safetensors.torch import save_file

    from mmpretrain.towers.timm import TimmTower

    out = Path(out)
    root = Path(digits_root) if digits_root else out.parent / "digits"
    if not digits.is_built(root):
        digits.build_digits(root)
    torch.manual_seed(seed)

    def batches_of(split: str, train: bool = False) -> ShardStream:
        """One pass over a split's shards in order (augmented when ``train``)."""
        urls = sorted(str(p) for p in (root / split).glob("*.tar"))
        return ShardStream(
            [Source(split, urls, modalities=["image", "cls"])],
            {"image": tower.preprocess(train)},
            batch_size=batch_size,
            train=False,
            seed=seed,
        )

    tower = TimmTower(model_name=model_name, img_size=image_size)
    head = nn.Linear(tower.output_dim, 10)
    net = nn.Sequential(tower, head)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    steps = math.ceil(count_samples(sorted(str(p) for p in (root / "train").glob("*.tar"))) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps)

    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for batch in batches_of("train", train=True):
            loss = nn.functional.cross_entropy(net(batch["image"]), batch["cls"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in batches_of("val"):
            correct += int((net(batch["image"]).argmax(1) == batch["cls"]).sum())
            total += len(batch["cls"])
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in tower.model.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, tmp))
    info = {
        "model_name": model_name,
        "image_size": image_size,
        "epochs": epochs,
        "val_accuracy": correct / max(total, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "digits_root": str(root),
    }
    write_text_atomic(out / "info.json", json.dumps(info, indent=2))
    print(
        f"digits classifier ({model_name}, {epochs} epochs): val accuracy {info['val_accuracy']:.4f} "
        f"in {info['seconds']} s -> {out / WEIGHTS}"
    )
    return out
