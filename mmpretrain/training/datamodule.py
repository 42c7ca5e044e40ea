"""LightningDataModule: wires ``mmpretrain.data`` into train/val loaders; nothing else."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmpretrain.data import ShardStream, Source, count_samples, expand_shards
from mmpretrain.data.stream.image import decode_on_device, resolve_mode, training_image_transform
from mmpretrain.data.stream.position import StreamPosition, continue_pass, shard_plan
from mmpretrain.data.stream.shards import check_shard_counts, shards_fingerprint
from mmpretrain.runtime import distributed


def sources_from_config(cfg: Any) -> list[Source]:
    sources = []
    for name, src in cfg["sources"].items():
        if src is None:
            continue
        sources.append(
            Source(
                name=name,
                urls=expand_shards(src["shards"], missing=cfg.get("missing_shards", "error")),
                weight=float(src.get("weight", 1.0)),
                modalities=list(src.get("modalities") or []),
            )
        )
    if not sources:
        raise ValueError("data.sources is empty: configure at least one source with a shards pattern")
    return sources


class ContrastiveDataModule(L.LightningDataModule):
    def __init__(
        self,
        cfg: Any,
        preprocess: Callable[[bool], dict[str, Callable]],
        seed: int = 0,
        negatives: int = 0,
        teacher_cache: bool = False,
        captions_per_sample: int = 1,
    ):
        super().__init__()
        self.teacher_cache = teacher_cache  # distill.cached: training samples bring the teacher's embeddings
        self.cfg = cfg
        self.negatives = int(negatives)  # hard negative captions per training sample (loss.hard_negatives)
        self.captions_per_sample = int(captions_per_sample)  # data.captions_per_sample (checked by train)
        self.preprocess = preprocess
        self.seed = seed
        self.resume_state: dict[str, Any] | None = None  # from the checkpoint (load_state_dict)
        self._start_positions: dict[int, str] = {}  # stream -> position the resumed run starts from
        self._consumed: dict[
            int, list[tuple[int, str]]
        ] = {}  # stream -> last (batch index, position) consumed
        # Resolve shard patterns now: a pattern that matches nothing fails before anything heavy.
        self.sources = sources_from_config(cfg)
        resolve_mode(cfg.get("image_decode"), cuda=True)  # a wrong data.image_decode fails here, by name
        missing = cfg.get("missing_shards", "error")
        self.val_urls = expand_shards(cfg["val"]["shards"], missing=missing) if cfg.get("val") else []

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
            "caption_keys": list(self.cfg.get("caption_keys") or []) or None,
            "modality_keys": {m: list(k) for m, k in (self.cfg.get("modality_keys") or {}).items()} or None,
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
        policy = self.shard_policy()
        check_shard_counts(self.sources, common["world_size"], workers, policy)
        per_worker = self.batches_per_worker()
        self._check_epoch_limit(per_worker * max(1, workers))
        stream = ShardStream(
            self.sources,
            self._train_preprocess(),
            train=True,
            batches_per_worker=per_worker,
            shuffle_buffer=int(self.cfg.get("shuffle_buffer", 1000)),
            start_batch=self._resume_batch(self._layout()),
            shard_policy=policy,
            positions=self._start_positions,
            negatives=self.negatives,
            captions_per_sample=self.captions_per_sample,
            teacher_augmentations=0 if self.teacher_cache else None,
            **common,
        )
        stream.num_workers = max(1, workers)
        return self._loader(stream, workers, persistent=True, pin=self._pin_memory(), cls=TrainLoader)

    def _train_preprocess(self) -> dict[str, Callable]:
        """The model's training preprocess, its image crop as ``data.image_decode`` says (exact | fast |
        gpu, :mod:`mmpretrain.data.stream.image`); gpu on a trainer without CUDA falls back to fast."""
        preprocess = self.preprocess(True)
        cuda = self.trainer.strategy.root_device.type == "cuda" if self.trainer else None
        mode = resolve_mode(self.cfg.get("image_decode"), cuda)
        if "image" in preprocess:
            preprocess["image"] = training_image_transform(preprocess["image"], mode)
        return preprocess

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """data.image_decode=gpu: the batch's JPEG bytes are decoded, cropped and resized on its device."""
        if isinstance(batch, dict) and self.trainer is not None:
            return decode_on_device(batch, self.trainer.strategy.root_device)
        return batch

    def _check_epoch_limit(self, epoch_batches: int) -> None:
        """``trainer.limit_train_batches`` below an epoch's batches, with another epoch to follow, would
        start that epoch at a point of the streams no worker stands at (the stream serves whole
        passes and never skips the rest of one): refused at the start, naming the option that makes
        epochs shorter. One epoch (or ``max_steps`` within the limit) is fine."""
        t = self.trainer
        limit = getattr(t, "limit_train_batches", None)
        if t is None or limit is None:
            return
        kept = int(limit) if isinstance(limit, int) else int(float(limit) * epoch_batches)
        if kept >= epoch_batches:
            return
        one_epoch = t.max_epochs == 1 or (t.max_steps is not None and 0 < t.max_steps <= kept)
        if one_epoch:
            return
        samples = kept * self._common()["batch_size"] * self._common()["world_size"]
        raise ValueError(
            f"trainer.limit_train_batches={limit} cuts each epoch at {kept} of its {epoch_batches} batches, "
            "and the next epoch cannot skip the rest of the pass over the shards. For shorter epochs set "
            f"data.train_samples={samples} (epochs of {kept} batches) instead, or train one epoch "
            "(trainer.max_epochs=1)."
        )

    # -- resume: each stream's position lives in the checkpoint (Lightning saves this state) -------
    def _layout(self) -> dict[str, Any]:
        common = self._common()
        return {
            "seed": self.seed,
            "world_size": common["world_size"],
            "num_workers": max(1, int(self.cfg.get("num_workers", 0))),
            "batch_size": common["batch_size"],
            "batches_per_worker": self.batches_per_worker(),
            "shard_policy": self.shard_policy(),
            "sources": [[s.name, len(s.urls), fp] for s, fp in zip(self.sources, self._fingerprints())],
        }

    def shard_policy(self) -> str:
        """``data.shard_policy``, with ``auto`` (the default) resolved: ``error`` (each reader its own share
        of every source's shards) when every source has at least one shard per reader (ranks x workers),
        else ``resample`` (each reader draws shards with replacement), said once on rank 0."""
        policy = self.cfg.get("shard_policy", "auto")
        if policy != "auto":
            return policy
        common = self._common()
        workers = max(1, int(self.cfg.get("num_workers", 0)))
        readers = common["world_size"] * workers
        few = [s for s in self.sources if len(s.urls) < readers]
        if not few:
            return "error"
        if common["rank"] == 0 and not getattr(self, "_said_policy", False):
            names = ", ".join(f"'{s.name}' ({len(s.urls)})" for s in few)
            print(
                f"data.shard_policy=auto: fewer shards than the {readers} readers ({common['world_size']} "
                f"ranks x {workers} workers) in {names}: every reader draws shards with replacement "
                f"(data.shard_policy=resample); write at least {readers} shards per source for an exact split"
            )
            self._said_policy = True
        return "resample"

    def _fingerprints(self) -> list[str]:
        """Per source, :func:`shards_fingerprint` of its shard list (computed once: one stat per shard)."""
        if getattr(self, "_shard_fingerprints", None) is None:
            self._shard_fingerprints = [shards_fingerprint(s.urls) for s in self.sources]
        return self._shard_fingerprints

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Note the position each consumed training batch leaves its stream at (the workers run ahead
        of the trainer: their live state is not what the checkpoint must hold)."""
        position = batch.pop("__position__", None) if isinstance(batch, dict) else None
        if position is not None:
            stream, batches = StreamPosition.peek(position)
            j = (batches - 1) * max(1, int(self.cfg.get("num_workers", 0))) + stream  # the rank's batch index
            self._consumed[stream] = [*self._consumed.get(stream, [])[-3:], (j, position)]
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The layout, the batches consumed per rank, and where every stream of every rank stands
        after them: ``positions[rank][stream]`` is a :class:`StreamPosition` as JSON (None: a stream
        that has produced nothing yet). Called on every rank (Lightning's save_checkpoint is)."""
        if self.trainer is None:
            return {}
        layout = self._layout()
        consumed = int(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        w, per = layout["num_workers"], layout["batches_per_worker"]
        this_rank: list[str | None] = []
        for s in range(w):
            done = [(j, p) for j, p in self._consumed.get(s, []) if j < consumed]
            this_rank.append(max(done)[1] if done else self._start_positions.get(s))
        module = self.trainer.lightning_module
        sync = getattr(module, "sync_skipped", None)  # a collective: every rank saves (see above)
        skipped = int(sync() if sync is not None else getattr(module, "skipped_total", 0))
        return layout | {
            "batches_consumed": consumed,
            "epoch": consumed // (w * per),
            "skipped_samples": skipped,
            "positions": self._gather(this_rank),
        }

    def _gather(self, this_rank: list[str | None]) -> list[list[str | None]]:
        """Every rank's stream positions (rank 0 writes the checkpoint)."""
        if distributed.world_size() == 1:
            return [this_rank]
        device = self.trainer.strategy.root_device
        data = torch.tensor(list(json.dumps(this_rank).encode()), dtype=torch.uint8, device=device)
        sizes = distributed.all_gather_variable(torch.tensor([len(data)], device=device)).tolist()
        flat = distributed.all_gather_variable(data).cpu().numpy().tobytes()
        offsets = [sum(sizes[:r]) for r in range(len(sizes) + 1)]
        return [json.loads(flat[offsets[r] : offsets[r + 1]]) for r in range(len(sizes))]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume_state = dict(state)

    def _resume_batch(self, layout: dict[str, Any]) -> int:
        """The batches the resumed run already consumed; sets where each stream of this rank starts."""
        if not self.resume_state:
            return 0
        state = self.resume_state
        if "positions" not in state:
            raise ValueError(
                "this checkpoint predates saved stream positions: its data stream cannot be resumed. "
                "Start a new run from its weights instead."
            )
        rank = self.trainer.global_rank if self.trainer else 0
        consumed = int(state["batches_consumed"])
        changed = {k: (state.get(k), v) for k, v in layout.items() if k != "sources" and state.get(k) != v}
        for name, why in changed_sources(state.get("sources"), layout["sources"]).items():
            changed[f"source '{name}'"] = why
        if self.trainer is not None:  # the bad-sample count continues too
            self.trainer.lightning_module.skipped_total = int(state.get("skipped_samples", 0))
        if not changed:
            self._start_positions = {s: p for s, p in enumerate(state["positions"][rank]) if p is not None}
            if rank == 0:
                print(
                    f"resumed the data stream exactly: after the {consumed} batches each rank had consumed "
                    f"(epoch {state.get('epoch', 0)}), at the saved position of every stream",
                    flush=True,
                )
            return consumed
        detail = ", ".join(
            v if isinstance(v, str) else f"{k}: checkpoint {v[0]} != now {v[1]}" for k, v in changed.items()
        )
        mode = self.cfg.get("resume", "exact")
        if mode != "approx":
            raise ValueError(
                f"cannot resume the data stream exactly: the data layout changed ({detail}). Resume with "
                "the same devices, num_nodes, data.num_workers, data.batch_size and seed as the "
                "checkpointed run, or set data.resume=approx to continue with what the current pass has "
                "not read yet."
            )
        self._start_positions = self._continue_pass(state, layout, rank, consumed, detail)
        return consumed

    def _continue_pass(
        self, state: dict[str, Any], layout: dict[str, Any], rank: int, consumed: int, detail: str
    ) -> dict[int, str]:
        """data.resume=approx: this rank's share of what the checkpointed pass had left to read."""
        old = [
            [None if p is None else StreamPosition.from_json(p) for p in streams]
            for streams in state["positions"]
        ]
        old_sources = state.get("sources") or layout["sources"]
        # A source continues its pass only where its shards are the checkpointed ones (a checkpoint from
        # before shards were fingerprinted: the same name and count); any other starts afresh.
        source_map = [
            next((i for i, old in enumerate(old_sources) if not changed_sources([old], [new])), None)
            for new in layout["sources"]
        ]

        def old_plan(i: int, pass_idx: int, r: int, s: int) -> list[int]:
            return shard_plan(
                old_sources[i][1],
                state["seed"],
                pass_idx,
                r,
                state["world_size"],
                s,
                state["num_workers"],
                state["shard_policy"],
            )

        w, world = layout["num_workers"], layout["world_size"]
        before = [len(range(slot % w, consumed, w)) for slot in range(world * w)]
        new, summary = continue_pass(old, old_plan, source_map, world * w, before)
        if rank == 0:
            print(
                f"data.resume=approx: the data layout changed ({detail}). Each source continues its current "
                f"pass across {world} ranks x {w} workers with the {summary['shards']} shards it had not "
                f"finished and the {summary['buffered']} samples that sat in shuffle buffers (re-read): no "
                f"sample of the pass repeats; {summary['dropped_streams']} stream(s) still in an earlier "
                "pass leave its rest unread. Batches differ from an uninterrupted run.",
                flush=True,
            )
        return {slot % w: new[slot].to_json() for slot in range(rank * w, (rank + 1) * w)}

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
    def _loader(
        stream: ShardStream,
        workers: int,
        persistent: bool,
        pin: bool = False,
        cls: type[DataLoader] = DataLoader,
    ) -> DataLoader:
        # Images travel as uint8 (the tower normalises on the device) and each worker keeps 2 batches
        # ahead: the shared memory held per rank is ~2 x workers x a uint8 batch.
        return cls(
            stream,
            batch_size=None,
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
            prefetch_factor=2 if workers > 0 else None,
            pin_memory=pin,
        )


class TrainLoader(DataLoader):
    """The training DataLoader, which Lightning may take for resumable: the stream's position is the
    datamodule's state, saved with every checkpoint and restored exactly (:meth:`ContrastiveDataModule.
    state_dict`), so the loader's own state is empty."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def changed_sources(saved: list[list[Any]] | None, now: list[list[Any]]) -> dict[str, str]:
    """``{source: why}`` for each source whose shards differ between a checkpoint's layout (``saved``:
    ``[name, count, fingerprint]`` each; a checkpoint from before fingerprints has ``[name, count]``)
    and the current one."""
    saved = saved or []
    out = {}
    for new in now:
        old = next((o for o in saved if o[0] == new[0]), None)
        if old is None:
            out[new[0]] = f"source '{new[0]}' is not in the checkpoint"
        elif old[1] != new[1]:
            out[new[0]] = f"source '{new[0]}' has {new[1]} shards, the checkpoint's had {old[1]}"
        elif len(old) > 2 and old[2] != new[2]:
            out[new[0]] = (
                f"source '{new[0]}': its {new[1]} shards are not the checkpointed ones (a name or a "
                f"size changed)"
            )
    for old in saved:
        if not any(n[0] == old[0] for n in now):
            out[old[0]] = f"source '{old[0]}' of the checkpoint is not configured now"
    return out
