"""LightningDataModule: wires ``mmpretrain.data`` into train/val loaders; nothing else."""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning as L
from torch.utils.data import DataLoader

from mmpretrain.data import ShardStream, Source, count_samples, expand_shards


def sources_from_config(cfg: Any) -> list[Source]:
    sources = []
    for name, src in cfg["sources"].items():
        if src is None:
            continue
        sources.append(
            Source(
                name=name,
                urls=expand_shards(src["shards"]),
                weight=float(src.get("weight", 1.0)),
                modalities=list(src.get("modalities") or []),
            )
        )
    if not sources:
        raise ValueError("data.sources is empty: configure at least one source with a shards pattern")
    return sources


class ContrastiveDataModule(L.LightningDataModule):
    def __init__(self, cfg: Any, preprocess: Callable[[bool], dict[str, Callable]], seed: int = 0, start_step: int = 0):
        super().__init__()
        self.cfg = cfg
        self.preprocess = preprocess
        self.seed = seed
        self.start_step = start_step
        # Resolve shard patterns now: a pattern that matches nothing fails before anything heavy.
        self.sources = sources_from_config(cfg)
        self.val_urls = expand_shards(cfg["val"]["shards"]) if cfg.get("val") else []

    def _common(self) -> dict[str, Any]:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        return dict(
            rank=rank,
            world_size=world,
            seed=self.seed,
            on_error=self.cfg.get("on_error", "skip"),
            on_missing=self.cfg.get("on_missing", "skip"),
            caption_field=self.cfg.get("caption_field", "caption"),
            batch_size=int(self.cfg["batch_size"]),
        )

    def batches_per_worker(self) -> int:
        common = self._common()
        samples = self.cfg.get("train_samples") or sum(count_samples(s.urls) for s in self.sources)
        workers = max(1, int(self.cfg.get("num_workers", 0)))
        global_batch = common["batch_size"] * common["world_size"]
        return max(1, math.ceil(samples / (global_batch * workers)))

    def train_dataloader(self) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        per_worker = self.batches_per_worker()
        stream = ShardStream(
            self.sources,
            self.preprocess(True),
            train=True,
            batches_per_worker=per_worker,
            shuffle_buffer=int(self.cfg.get("shuffle_buffer", 1000)),
            start_batch=self.start_step // max(1, workers),
            **self._common(),
        )
        stream.num_workers = max(1, workers)
        return self._loader(stream, workers, persistent=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        workers = min(int(self.cfg.get("num_workers", 0)), len(self.val_urls))
        val = Source("val", self.val_urls, modalities=list(self.cfg["val"].get("modalities") or []))
        stream = ShardStream([val], self.preprocess(False), train=False, **self._common())
        return self._loader(stream, workers, persistent=False)

    @staticmethod
    def _loader(stream: ShardStream, workers: int, persistent: bool) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )
