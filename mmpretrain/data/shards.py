"""Finding shards: brace-expanded patterns, globs, and sample counts."""

from __future__ import annotations

import glob
import json
import os
import tarfile
from pathlib import Path

import braceexpand


class NoShardsError(FileNotFoundError):
    pass


def expand_shards(patterns: str | list[str]) -> list[str]:
    """Expand ``{000..009}`` braces and ``*`` globs; fail with the pattern when nothing matches."""
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        matched: list[str] = []
        for p in braceexpand.braceexpand(str(pattern)):
            p = os.path.expanduser(p)
            if any(c in p for c in "*?["):
                matched += sorted(glob.glob(p))
            elif "://" in p or p.startswith("pipe:") or os.path.exists(p):
                matched.append(p)
        if not matched:
            raise NoShardsError(
                f"shard pattern '{pattern}' matches no file. Check the path (brace ranges like "
                f"shard-{{000..009}}.tar and globs like *.tar are expanded), or build the demo data with "
                f"`mmpretrain data digits out=DIR` and pass data.root=DIR."
            )
        urls += matched
    return urls


def count_samples(urls: list[str]) -> int:
    """Samples in local shards: from a ``sizes.json`` beside them when present, else tar headers."""
    total = 0
    sizes_cache: dict[Path, dict] = {}
    for url in urls:
        path = Path(url)
        sizes_file = path.parent / "sizes.json"
        if sizes_file not in sizes_cache:
            sizes_cache[sizes_file] = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
        sizes = sizes_cache[sizes_file]
        if path.name in sizes:
            total += int(sizes[path.name])
            continue
        if not path.exists():
            raise ValueError(f"cannot count samples of remote shard {url}; set data.train_samples")
        keys = set()
        with tarfile.open(path) as tf:
            for member in tf:
                keys.add(member.name.split(".", 1)[0])
        total += len(keys)
    return total
