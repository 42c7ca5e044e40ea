"""Writing bundled data: atomic, reproducible webdataset shards, their ``sizes.json``, prompt files.

Every builder of ``mmpretrain data NAME`` writes through these, so shards are plain ustar with a
fixed member time (the same seed gives byte-identical files) and a shard only ever appears under
its final name once complete (written to a temporary name, then renamed).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import webdataset as wds

from mmpretrain.data.stream.shards import write_sizes
from mmpretrain.io import atomic_write, write_text_atomic

SHARD_MTIME = 1_700_000_000  # 2023-11-14: fixed member time of the shards we write


def write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write ``samples`` to ``path`` atomically (a temporary name of this process, renamed); the
    number written."""

    def write(tmp: str) -> int:
        n = 0
        # An integer mtime keeps the members plain ustar (webdataset's default float time adds a pax
        # header to each), and a fixed one makes the same seed give byte-identical shards.
        with wds.TarWriter(tmp, mtime=SHARD_MTIME) as sink:
            for sample in samples:
                sink.write(sample)
                n += 1
        return n

    return atomic_write(path, write)


def write_prompt_files(out: Path, classnames: list[str], templates: list[str]) -> None:
    """``classnames.txt`` (in label order) and ``templates.txt`` (``{}``: the class name) for zero-shot."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "classnames.txt", "\n".join(classnames) + "\n")
    write_text_atomic(out / "templates.txt", "\n".join(templates) + "\n")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def parallel_map(
    fn: Callable[[Any], Any],
    tasks: list,
    workers: int | None = None,
    label: str = "writing shards",
    total: int | None = None,
    weight: Callable[[Any], int] | None = None,
    progress: bool = True,
) -> list:
    """``fn(task)`` for every task, ``workers`` processes at a time (in this process for one), with
    a progress bar advanced by ``weight(result)`` (1 a task by default) up to ``total`` (default: the
    number of tasks); the results in task order. The pool forks before the bar starts its refresh
    thread. ``fn`` must be a module-level function (it is pickled to the workers)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    results: list = [None] * len(tasks)
    columns = [
        TextColumn(f"{label} ({workers} workers)"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    ]
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        with Progress(*columns, disable=not progress) as bar:
            job = bar.add_task(label, total=len(tasks) if total is None else total)
            indexed = _Indexed(fn)
            done = pool.imap_unordered(indexed, enumerate(tasks)) if pool else map(indexed, enumerate(tasks))
            for i, result in done:
                results[i] = result
                bar.advance(job, weight(result) if weight else 1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return results


class _Indexed:
    """``(i, task) -> (i, fn(task))``: picklable, so the pool can run it."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, item: tuple[int, Any]) -> tuple[int, Any]:
        return item[0], self.fn(item[1])


# -- a split-sharded build (scenes, moving digits): plan, claim, write in parallel, finish -------------
def claim_build(out: Path, record: str, options: dict[str, Any], what: str) -> None:
    """Record the build options in ``out/record``; refuse to mix shards built with other options."""
    path = out / record
    if path.exists():
        before = json.loads(path.read_text())
        if before != options:
            raise ValueError(
                f"{out} holds {what} built with {before}, not {options}: choose another out= (or delete it)"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(options, indent=1))


def plan_shards(
    out: Path, counts: dict[str, int], shard_size: int
) -> tuple[list[tuple[str, str, int, int]], dict[str, dict[str, int]]]:
    """``(path, split, start, stop)`` of every shard not written yet (``split/split-0000.tar`` ...,
    ``shard_size`` items each), and the size of every shard per split (for ``sizes.json``)."""
    pending, sizes = [], {}
    for split, count in counts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        sizes[split] = {}
        for k in range(-(-count // shard_size)):
            start, stop = k * shard_size, min((k + 1) * shard_size, count)
            path = out / split / f"{split}-{k:04d}.tar"
            sizes[split][path.name] = stop - start
            if not path.exists():
                pending.append((str(path), split, start, stop))
    return pending, sizes


def finish_build(
    out: Path,
    sizes: dict[str, dict[str, int]],
    tasks: dict[str, tuple[list[str], list[str]]],
    top_task: str,
    pending: list[tuple],
    started: float,
    what: str,
) -> None:
    """``sizes.json`` per split, ``tasks/<task>/`` prompt files with ``top_task``'s at the root, and
    the one-line report of what was written."""
    for split, split_sizes in sizes.items():
        write_sizes(out / split, split_sizes)
    for task, (classnames, templates) in tasks.items():
        write_prompt_files(out / "tasks" / task, classnames, templates)
    write_prompt_files(out, *tasks[top_task])
    written = sum(t[3] - t[2] for t in pending)
    kept = sum(len(v) for v in sizes.values()) - len(pending)
    print(
        f"{what}: {written} written in {len(pending)} shards in {time.perf_counter() - started:.1f} s "
        f"({kept} shards already there) -> {out}"
    )


def splits_built(root: str | Path, splits: Iterable[str]) -> bool:
    root = Path(root)
    return (root / "classnames.txt").exists() and all((root / s / "sizes.json").exists() for s in splits)
