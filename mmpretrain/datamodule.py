"""LightningDataModule: wires ``mmpretrain.data`` into train/val loaders; nothing else."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from mmpretrain.data import ShardStream, Source, count_samples, expand_shards
from mmpretrain.data.pipeline import check_shard_counts


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
    def __init__(self, cfg: Any, preprocess: Callable[[bool], dict[str, Callable]], seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.preprocess = preprocess
        self.seed = seed
        self.resume_state: dict[str, Any] | None = None  # from the checkpoint (load_state_dict)
        # Resolve shard patterns now: a pattern that matches nothing fails before anything heavy.
        self.sources = sources_from_config(cfg)
        self.val_urls = expand_shards(cfg["val"]["shards"]) if cfg.get("val") else []

    def _common(self) -> dict[str, Any]:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        return {
            "rank": rank,
            "world_size": world,
            "seed": self.seed,
            "on_error": self.cfg.get("on_error", "skip"),
            "on_missing": self.cfg.get("on_missing", "skip"),
            "caption_field": self.cfg.get("caption_field", "caption"),
            "batch_size": int(self.cfg["batch_size"]),
        }

    def batches_per_worker(self) -> int:
        if getattr(self, "_per_worker", None) is None:
            self._per_worker = self._batches_per_worker()
        return self._per_worker

    def _batches_per_worker(self) -> int:
        common = self._common()
        samples = self.cfg.get("train_samples") or sum(count_samples(s.urls) for s in self.sources)
        workers = max(1, int(self.cfg.get("num_workers", 0)))
        global_batch = common["batch_size"] * common["world_size"]
        return max(1, math.ceil(samples / (global_batch * workers)))

    def train_dataloader(self) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        common = self._common()
        policy = self.cfg.get("shard_policy", "error")
        check_shard_counts(self.sources, common["world_size"], workers, policy)
        per_worker = self.batches_per_worker()
        stream = ShardStream(
            self.sources,
            self.preprocess(True),
            train=True,
            batches_per_worker=per_worker,
            shuffle_buffer=int(self.cfg.get("shuffle_buffer", 1000)),
            start_batch=self._resume_batch(self._layout()),
            shard_policy=policy,
            **common,
        )
        stream.num_workers = max(1, workers)
        return self._loader(stream, workers, persistent=True, pin=self._pin_memory())

    # -- exact resume: the stream position lives in the checkpoint (Lightning saves this state) --
    def _layout(self) -> dict[str, Any]:
        common = self._common()
        return {
            "seed": self.seed,
            "world_size": common["world_size"],
            "num_workers": max(1, int(self.cfg.get("num_workers", 0))),
            "batch_size": common["batch_size"],
            "batches_per_worker": self.batches_per_worker(),
            "shard_policy": self.cfg.get("shard_policy", "error"),
        }

    def state_dict(self) -> dict[str, Any]:
        """Where every worker of every rank is: batch ``j`` of a rank is batch ``j // W`` of stream
        ``j % W``, so the batches consumed per rank determine each stream's position (pass, shard,
        sample offset and augmentation seeds follow deterministically from the layout)."""
        if self.trainer is None:
            return {}
        layout = self._layout()
        consumed = int(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        w, per = layout["num_workers"], layout["batches_per_worker"]
        streams = {s: consumed // w + (1 if s < consumed % w else 0) for s in range(w)}
        skipped = int(getattr(self.trainer.lightning_module, "skipped_total", 0))
        return layout | {"batches_consumed": consumed, "epoch": consumed // (w * per), "stream_batches": streams,
                         "skipped_samples": skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_state = dict(state)

    def _resume_batch(self, layout: dict[str, Any]) -> int:
        if not self.resume_state:
            return 0
        changed = {k: (self.resume_state.get(k), v) for k, v in layout.items() if self.resume_state.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: checkpoint {a} != now {b}" for k, (a, b) in changed.items())
            raise ValueError(
                f"cannot resume the data stream exactly: the data layout changed ({detail}). Resume with the "
                f"same devices, num_nodes, data.num_workers, data.batch_size and seed as the checkpointed run."
            )
        if self.trainer is not None:  # the bad-sample count continues too
            self.trainer.lightning_module.skipped_total = int(self.resume_state.get("skipped_samples", 0))
        return int(self.resume_state["batches_consumed"])

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        workers = min(int(self.cfg.get("num_workers", 0)), len(self.val_urls))
        val = Source("val", self.val_urls, modalities=list(self.cfg["val"].get("modalities") or []))
        stream = ShardStream([val], self.preprocess(False), train=False, **self._common())
        return self._loader(stream, workers, persistent=False, pin=self._pin_memory())

    def _pin_memory(self) -> bool:
        """Pinned batches when training on CUDA: the host-to-device copy is then asynchronous."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    @staticmethod
    def _loader(stream: ShardStream, workers: int, persistent: bool, pin: bool = False) -> DataLoader:
        # Images travel as uint8 (the tower normalises on the device) and each worker keeps 2 batches
        # ahead: the shared memory held per rank is ~2 x workers x a uint8 batch.
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
            prefetch_factor=2 if workers > 0 else None,
            pin_memory=pin,
        )
