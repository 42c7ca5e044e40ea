"""Finding shards: sources, brace-expanded patterns and globs, sample counts and their ``sizes.json``."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import torch

from mmpretrain.data.stream.tar_reader import count_shard
from mmpretrain.io import write_text_atomic
from mmpretrain.runtime import distributed

log = logging.getLogger(__name__)


class NoShardsError(FileNotFoundError):
    pass


class MissingShardsError(NoShardsError):
    """Some of the local shards a pattern names explicitly do not exist."""


@dataclass
class Source:
    name: str
    urls: list[str]
    weight: float = 1.0
    modalities: list[str] = field(default_factory=list)


def check_shard_counts(sources: list[Source], world_size: int, num_workers: int, shard_policy: str) -> None:
    """Fail before training (on every rank alike, so no rank waits in a collective) when a source
    has fewer shards than ranks x workers and ``shard_policy`` is ``error``."""
    slots = world_size * max(1, num_workers)
    for source in sources:
        if shard_policy == "error" and len(source.urls) < slots:
            raise ValueError(
                f"source '{source.name}' has {len(source.urls)} shards for {world_size} ranks x "
                f"{max(1, num_workers)} workers = {slots} readers: every reader needs at least one shard. "
                "Lower data.num_workers, write more, smaller shards, or set data.shard_policy=resample "
                "(each reader samples shards with replacement)."
            )


def expand_shards(patterns: str | list[str], missing: str = "error") -> list[str]:
    """Expand ``{000..009}`` braces and ``*`` globs; fail with the pattern when nothing matches.

    A glob names what exists; a brace range or a plain path names shards that should. When some of those
    (local ones) are missing, a partial download would train on part of the data: that fails
    (:class:`MissingShardsError`), or under ``missing="warn"`` leaves them out with a warning."""
    if missing not in ("error", "warn"):
        raise ValueError(f"data.missing_shards must be 'error' or 'warn', not '{missing}'")
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    named, absent = 0, []  # local shards named explicitly; those of them missing
    for pattern in patterns:
        matched, missed = [], []
        for p in braceexpand.braceexpand(str(pattern)):
            p = os.path.expanduser(p)
            if any(c in p for c in "*?["):
                matched += sorted(glob.glob(p))
            elif "://" in p or p.startswith("pipe:"):
                matched.append(p)
            else:
                named += 1
                (matched if os.path.exists(p) else missed).append(p)
        if not matched and not missed:  # a glob that matches nothing
            raise NoShardsError(_matches_nothing(pattern))
        urls += matched
        absent += missed
    if not urls:
        raise NoShardsError(_matches_nothing(patterns[0]))
    if absent:
        message = (
            f"{len(absent)} of the {named} shards named by {patterns} are missing "
            f"({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''})"
        )
        if missing == "error":
            raise MissingShardsError(
                f"{message}: a partial download? Fetch them, or set data.missing_shards=warn to train "
                f"on the {named - len(absent)} present."
            )
        log.warning(
            "%s: training on the %d present (data.missing_shards=warn).", message, named - len(absent)
        )
    return urls


def _matches_nothing(pattern: str) -> str:
    return (
        f"shard pattern '{pattern}' matches no file. Check the path (brace ranges like "
        f"shard-{{000..009}}.tar and globs like *.tar are expanded), or build the demo data with "
        f"`mmpretrain data digits out=DIR` and pass data.root=DIR."
    )


def count_samples(urls: list[str]) -> int:
    """Samples in local shards: from a ``sizes.json`` beside them when present, else tar headers.

    Shards missing from ``sizes.json`` are counted once, not on every rank: under
    ``torch.distributed`` each rank reads the tar headers of its share of them and one all-reduce
    shares the counts (so every rank must call this with the same urls, as the datamodule does).
    Rank 0 then adds the new counts to ``sizes.json`` (a temporary file renamed over it) when the
    folder is writable, so the next run reads them instead.
    """
    paths = [Path(u) for u in urls]
    sizes_by_dir = {d: _read_sizes(d / "sizes.json") for d in dict.fromkeys(p.parent for p in paths)}
    known = [sizes_by_dir[p.parent].get(p.name) for p in paths]
    missing = [i for i, k in enumerate(known) if k is None]
    for i in missing:
        if not paths[i].exists():
            raise ValueError(f"cannot count samples of remote shard {urls[i]}; set data.train_samples")
    # -1: not counted here. Ranks may disagree on what sizes.json held (another run writing it),
    # so the vector covers every url and max takes any rank's count: one collective, always.
    counts = torch.tensor([-1 if k is None else int(k) for k in known], dtype=torch.long)
    for i in missing[distributed.share(len(missing))]:
        counts[i] = _count_tar(paths[i])
    counts = distributed.all_reduce_max(counts)
    if missing and distributed.rank() == 0:
        for d in dict.fromkeys(paths[i].parent for i in missing):
            new = {p.name: int(c) for p, c in zip(paths, counts.tolist()) if p.parent == d}
            write_sizes(d, new)
    return int(counts.sum())


def _count_tar(path: Path) -> int:
    """The samples of one shard, with a warning when some cannot be read whole (training skips them)."""
    lost: list[Exception] = []
    n = count_shard(str(path), on_error=lost.append)
    if lost:
        reasons = Counter(getattr(exn, "reason", type(exn).__name__) for exn in lost)
        log.warning(
            "%s: %d samples cannot be read whole and will be skipped: %s", path, len(lost), dict(reasons)
        )
    return n


def _read_sizes(path: Path) -> dict[str, int]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def write_sizes(split_dir: str | Path, sizes: dict[str, int]) -> None:
    """Record sample counts in ``split_dir/sizes.json`` (shard file name -> samples), the one writer of
    that file: ``sizes`` is merged into what the file holds, entries of shards no longer in the folder
    are dropped, and the file is replaced atomically. A read-only folder is left as it is (the counts
    are then taken from the tar headers at each run)."""
    path = Path(split_dir) / "sizes.json"
    merged = {name: n for name, n in (_read_sizes(path) | sizes).items() if (path.parent / name).exists()}
    try:
        write_text_atomic(path, json.dumps(dict(sorted(merged.items())), indent=1))
    except OSError:
        pass


def shards_fingerprint(urls: list[str]) -> str:
    """What identifies a source's shard list: a hash of every shard's name and size, in order (the size
    of a remote shard is not looked up: its url alone)."""
    h = hashlib.sha1()
    for url in urls:
        size = os.stat(url).st_size if os.path.exists(url) else "?"
        h.update(f"{os.path.basename(url)}\0{size}\n".encode())
    return h.hexdigest()[:16]
