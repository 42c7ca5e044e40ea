"""The webdataset stream: shards -> samples -> decoded -> preprocessed -> batches.

Training streams are infinite and deterministic: in pass ``p`` every source's shard list is
shuffled by a seed of ``(seed, p)``, split by rank then by *stream* (one per DataLoader worker),
and each stream cycles through its passes with a seeded sample-shuffle buffer; each sample's
augmentation is seeded by (seed, rank, stream, sample index), so a batch is a pure function of its
position. Every seed comes from :func:`mmpretrain.data.stream.seeds.derive` (numpy's SeedSequence): any
non-negative user seed works and no two (purpose, rank, stream, sample) share one.
An "epoch" is a fixed number of batches per worker, so every rank always yields the same number
of batches (no DDP hang with uneven shards).

Resume: batch ``j`` of a rank (counted from the start of training) is batch ``j // W`` of stream
``j % W`` (``W`` workers), which is what the DataLoader's round-robin over workers gives. Every
training batch carries ``__position__``, its stream's :class:`~mmpretrain.data.stream.position.StreamPosition`
after it; the DataModule keeps the one of the last batch consumed per stream and the checkpoint
saves it. A resumed stream opens at that position: the current shard at its byte offset and the
shuffle buffer re-read by reference, never a replay, so resuming costs the same at any step.

Sources may carry different modality subsets (``Source.modalities``; e.g. image-text shards mixed
with audio-text shards). Every batch carries every modality of the stream: rows whose sample
lacks one are zeros with ``<modality>_mask`` False, and the loss leaves them out. A sample missing
a modality its source declares is skipped and counted (``on_missing="skip"``) or kept with that
modality masked (``on_missing="partial"``).

Bad samples (corrupt bytes, missing keys, truncated tars) are skipped and counted: each batch
carries ``__skipped__``, the number of samples dropped since the previous batch of its worker,
so the count is exact across workers and ranks once summed by the training module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmpretrain.data.stream import teacher_cache
from mmpretrain.data.stream.captions import kind_index, pick_caption, pick_captions, pick_negatives
from mmpretrain.data.stream.collate import collate, ragged_rows
from mmpretrain.data.stream.decode import BLANKS, decode_sample, read_meta
from mmpretrain.data.stream.position import PositionFiles, StreamPosition, restore_rng, rng_state, shard_plan
from mmpretrain.data.stream.reader import SourceReader
from mmpretrain.data.stream.seeds import check_seed, derive, seeded
from mmpretrain.data.stream.shards import Source
from mmpretrain.data.stream.skips import SampleError, SkipCounter


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class ShardStream(IterableDataset):
    """Batches of preprocessed samples from one or more weighted sources of shards.

    ``positions`` (stream -> :class:`StreamPosition` or its JSON) are where the streams of this
    rank stand after the ``start_batch`` batches a resumed run consumed (the checkpoint's).
    """

    def __init__(
        self,
        sources: list[Source],
        preprocess: dict[str, Callable[[Any], torch.Tensor]],
        batch_size: int,
        train: bool,
        batches_per_worker: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        on_error: str = "skip",
        required: list[str] | None = None,
        caption_field: str = "caption",
        start_batch: int = 0,
        shard_policy: str = "error",
        on_missing: str = "skip",
        positions: dict[int, StreamPosition | str] | None = None,
        caption_keys: list[str] | None = None,
        negatives: int = 0,
        modality_keys: dict[str, list[str]] | None = None,
        captions_per_sample: int = 1,
        teacher_augmentations: int | None = None,
    ):
        """``teacher_augmentations`` (distill.cached): training samples take one of their stored
        augmentations and bring the teacher's embeddings (:mod:`.teacher_cache`); 0: as many as each
        sample's ``teacher.npz`` holds; N: N stored augmentations (``teacher-embeddings`` writing them)."""
        if shard_policy not in ("error", "resample"):
            raise ValueError(f"data.shard_policy must be 'error' or 'resample', not '{shard_policy}'")
        self.sources = sources
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.train = train
        self.batches_per_worker = batches_per_worker
        self.rank, self.world_size = rank, world_size
        self.seed = check_seed(seed)
        self.shuffle_buffer = shuffle_buffer
        self.on_error = on_error
        self.required = required
        self.caption_field = caption_field
        self.caption_keys = list(caption_keys) if caption_keys else None
        # {modality: [key, ...]}: extra keys a modality is read from ({audio: [mp4]}: a video's sound)
        self.modality_keys = {m: tuple(k) for m, k in (modality_keys or {}).items()}
        self.negatives = int(negatives)  # hard negatives per training sample (loss.hard_negatives)
        if int(captions_per_sample) < 1:
            raise ValueError(f"data.captions_per_sample must be at least 1, not {captions_per_sample}")
        # captions of a multi-caption sample per training pass (data.captions_per_sample): the first is
        # ``text``, the others ``text_positives`` with ``text_positives_mask``
        self.captions_per_sample = int(captions_per_sample)
        self.teacher_augmentations = teacher_augmentations
        self.start_batch = start_batch
        self.shard_policy = shard_policy
        if on_missing not in ("skip", "partial"):
            raise ValueError(f"data.on_missing must be 'skip' or 'partial', not '{on_missing}'")
        self.on_missing = on_missing
        self.positions = {
            int(s): p if isinstance(p, StreamPosition) else StreamPosition.from_json(p)
            for s, p in (positions or {}).items()
        }
        self._fill: dict[str, torch.Tensor] | None = None
        self._streams: dict[int, tuple[Iterator[dict], int]] = {}  # stream -> (generator, next batch)
        self._next_start: int | None = None
        self.num_workers = 1  # set by the DataModule so __len__ is the per-rank epoch length
        self._handoff = PositionFiles() if train else None

    def __len__(self) -> int:
        if self.batches_per_worker is None:
            raise TypeError("validation streams have no fixed length")
        return self.batches_per_worker * max(self.num_workers, 1)

    # -- shards -> raw samples, per source ------------------------------------------------------
    def _reader(
        self, index: int, worker: int, num_workers: int, pos: Any, counter: SkipCounter
    ) -> SourceReader:
        source = self.sources[index]

        def shards_of_pass(pass_idx: int) -> list[int]:
            shards = shard_plan(
                len(source.urls),
                self.seed,
                pass_idx,
                self.rank,
                self.world_size,
                worker,
                num_workers,
                self.shard_policy if self.train else "error",
                shuffle=self.train,
            )
            if not shards and self.train:
                raise ValueError(
                    f"source '{source.name}' has {len(source.urls)} shards for {self.world_size} ranks x "
                    f"{num_workers} workers: every worker needs at least one. Lower data.num_workers, "
                    f"write more, smaller shards, or set data.shard_policy=resample."
                )
            return shards

        size = self.shuffle_buffer if self.train and self.shuffle_buffer > 1 else 0
        seed = derive(self.seed, "shuffle_buffer", self.rank, worker, index)
        return SourceReader(
            source.name,
            source.urls,
            shards_of_pass,
            pos,
            counter,
            buffer_size=size,
            seed=seed,
            endless=self.train,
        )

    # -- samples -> batches -------------------------------------------------------------------
    def _modalities(self, source: Source) -> list[str]:
        return source.modalities or [m for m in self.preprocess] + ["cls"]

    def _process(self, raw: dict, source: Source, aug_seed: int | None = None, pass_idx: int = 0) -> dict:
        modalities = self._modalities(source)
        if self.required is not None:
            required = self.required
        elif self.on_missing == "partial":
            required = []
        else:
            required = [m for m in modalities if m != "cls"]
        sample = decode_sample(
            raw,
            modalities,
            required,
            caption_field=self.caption_field,
            caption_keys=self.caption_keys,
            modality_keys=self.modality_keys,
            raw=[m for m, fn in self.preprocess.items() if getattr(fn, "takes_bytes", False)],
        )
        captions = list(sample.get("text") or [])
        texts = self._texts(raw, sample, pass_idx) if "text" in sample else {}
        cached = None
        if self.train and self.teacher_augmentations is not None:
            cached, aug_seed = self._teacher_cache(raw, sample, captions, pass_idx)
        with seeded(aug_seed):
            for m, fn in self.preprocess.items():
                if m in sample:
                    sample[m] = fn(sample[m])
        if texts:
            tokenize = self.preprocess["text"]
            for k, v in texts.items():
                sample[k] = [tokenize(t) for t in v] if k in (*_TEXT_LISTS, *_TRAIN_LISTS) else v
            for k in _TRAIN_LISTS:
                if self.train and k in sample:
                    sample[k] = torch.stack(sample[k])
        if not any(m in sample for m in self.preprocess):
            raise SampleError(
                f"sample '{raw.get('__key__')}' in {raw.get('__url__')} has none of {sorted(self.preprocess)}"
            )
        sample.pop("__url__", None)
        return sample | (cached or {})

    def _teacher_cache(
        self, raw: dict, sample: dict, captions: list[str], pass_idx: int
    ) -> tuple[dict[str, torch.Tensor] | None, int]:
        """The stored teacher embeddings of this pass's augmentation and caption (None while writing
        them: ``teacher_augmentations`` N > 0 and no ``teacher.npz`` yet), and the augmentation's seed."""
        key, data = raw.get("__key__"), raw.get(teacher_cache.MEMBER)
        if data is None and not self.teacher_augmentations:
            raise SampleError(
                f"sample '{key}' in {raw.get('__url__')} has no {teacher_cache.MEMBER} (distill.cached=true "
                "trains on shards written by `mmpretrain data teacher-embeddings`)"
            )
        cache = teacher_cache.decode(data) if data is not None else None
        count = self.teacher_augmentations or len(cache["image"])
        augmentation = pass_idx % count
        seed = teacher_cache.augmentation_seed(key, augmentation)
        if cache is None:
            return None, seed
        caption = captions.index(sample["text"]) if captions else 0
        return teacher_cache.sample_features(cache, augmentation, caption), seed

    def _texts(self, raw: dict, sample: dict, pass_idx: int) -> dict[str, Any]:
        """Training: ``text`` becomes the caption of this pass (and ``text_negatives`` [M] captions with
        ``text_negatives_mask`` when hard negatives train). Validation: ``text`` the first caption,
        and every other caption, negative (with its kind) and task label for the metrics."""
        captions, key = sample["text"], raw.get("__key__")
        meta = read_meta(raw) if (not self.train or self.negatives) and "text" in self.preprocess else {}
        if self.train:
            out = {}
            if self.captions_per_sample > 1:
                picked = pick_captions(captions, self.captions_per_sample, self.seed, key, pass_idx)
                sample["text"] = picked[0]
                out |= _padded("text_positives", picked[1:], self.captions_per_sample - 1)
            else:
                sample["text"] = pick_caption(captions, self.seed, key, pass_idx)
            if self.negatives:
                negs = pick_negatives(
                    list(meta.get("negatives") or []), self.negatives, self.seed, key, pass_idx
                )
                out |= _padded("text_negatives", negs, self.negatives)
            return out
        sample["text"] = captions[0]
        if "text" not in self.preprocess:
            return {}
        negatives = [str(n) for n in meta.get("negatives") or []]
        kinds = list(meta.get("negative_kinds") or [])
        out: dict[str, Any] = {
            "text_more": captions[1:],
            "probe_negatives": negatives,
            "probe_negatives_kind": [
                kind_index(kinds[i] if i < len(kinds) else "") for i in range(len(negatives))
            ],
        }
        for task, label in (meta.get("labels") or {}).items():
            out[f"label/{task}"] = int(label)
        return out

    def fill_values(self) -> dict[str, torch.Tensor]:
        """A zero tensor per modality this stream can yield (what absent rows are filled with)."""
        if self._fill is None:
            wanted = dict.fromkeys(
                m for s in self.sources for m in self._modalities(s) if m in self.preprocess
            )
            with seeded(0):  # a random augmentation of the blank must not move the caller's RNG
                blanks = {m: self.preprocess[m](BLANKS[m]()) for m in wanted if m in BLANKS}
                # a non-tensor (data.image_decode=gpu's EncodedImage) only says what the rows are
                self._fill = {m: torch.zeros_like(v) if torch.is_tensor(v) else v for m, v in blanks.items()}
        return self._fill

    def _batch_stream(
        self, worker: int, num_workers: int, position: StreamPosition | None = None
    ) -> Iterator[dict]:
        """Stream ``worker``'s batches from ``position`` on (the start when None). Each training batch
        carries ``__position__``: the stream's position after it, as JSON."""
        pos = (
            copy.deepcopy(position)
            if position is not None
            else StreamPosition.start(worker, len(self.sources))
        )
        pos.stream = worker
        counter = SkipCounter(self.on_error)
        readers = [self._reader(i, worker, num_workers, p, counter) for i, p in enumerate(pos.sources)]
        weights = [s.weight for s in self.sources]
        mix_rng = restore_rng(pos.mix_rng, derive(self.seed, "source_mix", self.rank, worker))
        live = list(range(len(readers)))
        batch: list[dict] = []
        while live:
            i = mix_rng.choices(live, weights=[weights[j] for j in live])[0] if len(live) > 1 else live[0]
            raw = readers[i].next()
            if raw is None:
                live.remove(i)
                continue
            pos.samples += 1
            aug_seed = derive(self.seed, "augment", self.rank, worker, pos.samples) if self.train else None
            try:
                batch.append(self._process(raw, self.sources[i], aug_seed, readers[i].pos.pass_idx))
            except Exception as exn:  # noqa: BLE001 - every decode/transform failure is a skip
                counter(SampleError(f"sample '{raw.get('__key__')}' in {raw.get('__url__')}: {exn}"))
                continue
            counter.ok()
            if len(batch) == self.batch_size:
                out = self._emit(batch, counter)
                if self.train:
                    pos.batches += 1
                    now = replace(pos, mix_rng=rng_state(mix_rng), sources=[r.position() for r in readers])
                    out["__position__"] = now.to_json()
                yield out
                batch = []
        if batch and not self.train:
            yield self._emit(batch, counter)

    def _emit(self, batch: list[dict], counter: SkipCounter) -> dict:
        ragged = {}
        if not self.train and "text" in self.preprocess:  # every val batch carries them, maybe empty
            example = self.fill_values().get("text")
            ragged = {
                k: ragged_rows([s.pop(k, []) for s in batch], example if k in _TEXT_LISTS else None)
                for k in _RAGGED
            }
        out = collate(batch, self.fill_values())
        for k, (values, owner) in ragged.items():
            out[k] = values
            if k in _TEXT_LISTS:
                out[f"{k}_owner"] = owner
        trim = getattr(self.preprocess.get("text"), "trim", None)  # the text tower's: padding columns off
        if trim is not None:
            for k in ("text", *_TRAIN_LISTS, *_TEXT_LISTS):
                if isinstance(out.get(k), torch.Tensor):
                    out[k] = trim(out[k])
        out["__skipped__"] = counter.take()  # a host int: no device copy, no read
        return out

    # -- batches -> the rank's epoch ------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        if not self.train:
            yield from self._batch_stream(worker, num_workers)
            return
        # This iteration serves the rank's batches [start, end): up to the next epoch boundary.
        epoch_len = self.batches_per_worker * num_workers
        start = self.start_batch if self._next_start is None else self._next_start
        end = (start // epoch_len + 1) * epoch_len
        self._next_start = end
        mine = range(start + worker, end, num_workers)  # the DataLoader's round-robin over workers
        needed = {j % num_workers for j in mine}
        self._streams = {s: v for s, v in self._streams.items() if s in needed}
        for j in mine:
            stream, k = j % num_workers, j // num_workers
            batch = next(self._stream_at(stream, k, num_workers))
            self._streams[stream] = (self._streams[stream][0], k + 1)
            if j + num_workers >= end and get_worker_info() is not None:
                # After a resume at a batch that is not a multiple of the workers, worker w serves
                # stream (start + w) % W until the epoch ends, then stream w: hand this stream's
                # position to whichever worker continues it (written before the batch leaves, so it
                # is there before the next epoch begins).
                self._handoff.put(stream, batch["__position__"])
            yield batch

    def _stream_at(self, stream: int, k: int, num_streams: int) -> Iterator[dict]:
        """``stream``'s generator about to produce its batch ``k``: the live one, or one opened at a
        saved position (a checkpoint's, or another worker's at an epoch boundary). Never a replay."""
        gen, at = self._streams.get(stream, (None, -1))
        if gen is None or at != k:
            saved = self._handoff.get(stream, k) or self.positions.get(stream)
            if saved is not None and not isinstance(saved, StreamPosition):
                saved = StreamPosition.from_json(saved)
            if saved is None and k == 0:
                saved = StreamPosition.start(stream, len(self.sources))
            if saved is None or saved.batches != k:
                raise RuntimeError(
                    f"no saved position of stream {stream} (rank {self.rank}) at its batch {k}"
                    + (f" (the checkpoint's is at {saved.batches})" if saved is not None else "")
                    + ": the checkpoint does not match this data layout. Resume with data.resume=approx."
                )
            gen = self._batch_stream(stream, num_streams, saved)
        self._streams[stream] = (gen, k)
        return gen


#: per-sample lists of tokenized captions (validation), flattened by the collate with their owner row
_TEXT_LISTS = ("text_more", "probe_negatives")
#: training's [M] more captions per sample (padded, with a ``<key>_mask``), stacked per sample
_TRAIN_LISTS = ("text_negatives", "text_positives")


def _padded(key: str, captions: list[str], m: int) -> dict[str, Any]:
    """``captions`` padded with empty captions to ``m``, and the mask of the real ones."""
    return {
        key: captions + [""] * (m - len(captions)),
        f"{key}_mask": torch.tensor([True] * len(captions) + [False] * (m - len(captions))),
    }


_RAGGED = (*_TEXT_LISTS, "probe_negatives_kind")
