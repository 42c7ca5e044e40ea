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

from mmpretrain import storage
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

    A glob names what exists; a brace range or a plain path names shards that should. Shards in a store
    (``s3://`` and any fsspec URL) are checked against one listing of each folder. When some of those
    (local or in a store) are missing, a partial download would train on part of the data: that fails
    (:class:`MissingShardsError`), or under ``missing="warn"`` leaves them out with a warning."""
    if missing not in ("error", "warn"):
        raise ValueError(f"data.missing_shards must be 'error' or 'warn', not '{missing}'")
    if isinstance(patterns, str):
        patterns = [patterns]
    _folders.clear()  # a store's folders are listed afresh by each expansion
    urls: list[str] = []
    named, absent = 0, []  # local shards named explicitly; those of them missing
    for pattern in patterns:
        matched, missed = [], []
        for p in braceexpand.braceexpand(str(pattern)):
            p = os.path.expanduser(p)
            if any(c in p for c in "*?["):
                matched += storage.glob(p) if storage.is_remote(p) else sorted(glob.glob(p))
            elif storage.is_remote(p):
                named += 1
                (matched if _listed(p) is not None else missed).append(p)
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


def _listed(url: str) -> dict | None:
    """The listing details of a shard in a store (its folder listed once per process), None if absent."""
    head, name = url.rstrip("/").rsplit("/", 1)
    return _folder(head).get(name)


_folders: dict[str, dict[str, dict]] = {}


def _folder(url: str) -> dict[str, dict]:
    if url not in _folders:
        _folders[url] = storage.listing(url)
    return _folders[url]


def _matches_nothing(pattern: str) -> str:
    return (
        f"shard pattern '{pattern}' matches no file. Check the path (brace ranges like "
        f"shard-{{000..009}}.tar and globs like *.tar are expanded), or build the demo data with "
        f"`mmpretrain data digits out=DIR` and pass data.root=DIR."
    )


def count_samples(urls: list[str]) -> int:
    """Samples in shards (local or in a store): from a ``sizes.json`` beside them when present, else
    tar headers (ranged reads of a stored shard's headers).

    Shards missing from ``sizes.json`` are counted once, not on every rank: under
    ``torch.distributed`` each rank reads the tar headers of its share of them and one all-reduce
    shares the counts (so every rank must call this with the same urls, as the datamodule does).
    Rank 0 then adds the new counts to ``sizes.json`` (written atomically, uploaded to a store) when the
    folder is writable, so the next run reads them instead.
    """
    parents = [_parent(u) for u in urls]
    sizes_by_dir = {d: _read_sizes(d) for d in dict.fromkeys(parents)}
    known = [sizes_by_dir[d].get(_name(u)) for d, u in zip(parents, urls)]
    missing = [i for i, k in enumerate(known) if k is None]
    for i in missing:
        if not storage.is_remote(urls[i]) and not os.path.exists(urls[i]):
            raise ValueError(f"cannot count samples of remote shard {urls[i]}; set data.train_samples")
    # -1: not counted here. Ranks may disagree on what sizes.json held (another run writing it),
    # so the vector covers every url and max takes any rank's count: one collective, always.
    counts = torch.tensor([-1 if k is None else int(k) for k in known], dtype=torch.long)
    for i in missing[distributed.share(len(missing))]:
        counts[i] = _count_tar(urls[i] if storage.is_remote(urls[i]) else Path(urls[i]))
    counts = distributed.all_reduce_max(counts)
    if missing and distributed.rank() == 0:
        for d in dict.fromkeys(parents[i] for i in missing):
            new = {_name(u): int(c) for u, p, c in zip(urls, parents, counts.tolist()) if p == d}
            write_sizes(d, new)
    return int(counts.sum())


def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if storage.is_remote(url) else str(Path(url).parent)


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1] if storage.is_remote(url) else Path(url).name


def _count_tar(path: str | Path) -> int:
    """The samples of one shard (a local path or a store URL), with a warning when some cannot be read
    whole (training skips them)."""
    lost: list[Exception] = []
    n = count_shard(str(path), on_error=lost.append)
    if lost:
        reasons = Counter(getattr(exn, "reason", type(exn).__name__) for exn in lost)
        log.warning(
            "%s: %d samples cannot be read whole and will be skipped: %s", path, len(lost), dict(reasons)
        )
    return n


def _read_sizes(folder: str | Path) -> dict[str, int]:
    """The ``sizes.json`` of a shard folder (local or in a store); empty when there is none."""
    if storage.is_remote(folder):
        data = storage.read_bytes(storage.join(str(folder), "sizes.json"))
        return json.loads(data) if data is not None else {}
    try:
        return json.loads((Path(folder) / "sizes.json").read_text())
    except FileNotFoundError:
        return {}


def write_sizes(split_dir: str | Path, sizes: dict[str, int]) -> None:
    """Record sample counts in ``split_dir/sizes.json`` (shard file name -> samples), the one writer of
    that file: ``sizes`` is merged into what the file holds, entries of shards no longer in the folder
    are dropped, and the file is replaced atomically (in a store: uploaded atomically). A read-only
    folder or bucket is left as it is (the counts are then taken from the tar headers at each run)."""
    if storage.is_remote(split_dir):
        folder = str(split_dir)
        present = storage.listing(folder)
        merged = {name: n for name, n in (_read_sizes(folder) | sizes).items() if name in present}
        try:
            storage.put_bytes(
                storage.join(folder, "sizes.json"),
                json.dumps(dict(sorted(merged.items())), indent=1).encode(),
            )
        except OSError as exc:
            log.warning("could not write %s/sizes.json (%s): counts come from the tar headers", folder, exc)
        return
    path = Path(split_dir) / "sizes.json"
    merged = {
        name: n for name, n in (_read_sizes(split_dir) | sizes).items() if (path.parent / name).exists()
    }
    try:
        write_text_atomic(path, json.dumps(dict(sorted(merged.items())), indent=1))
    except OSError:
        pass


def shards_fingerprint(urls: list[str]) -> str:
    """What identifies a source's shard list: a hash of every shard's name and size, in order (a stored
    shard's size from its folder's listing; that of a streamed one is not looked up: its url alone)."""
    h = hashlib.sha1()
    for url in urls:
        if storage.is_remote(url):
            size = (_listed(url) or {}).get("size", "?")
        else:
            size = os.stat(url).st_size if os.path.exists(url) else "?"
        h.update(f"{os.path.basename(url)}\0{size}\n".encode())
    return h.hexdigest()[:16]
