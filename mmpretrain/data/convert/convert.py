"""Your own data into our shard layout: ``mmpretrain data shards in=... out=DIR``.

Reads a table (CSV / TSV / parquet of ``filepath,caption[,label]``, open_clip's layout; the rows of
one file make one sample with all their captions), a folder
of media files with sidecar captions (``x.jpg`` + ``x.txt`` or ``x.json``; a class per sub-folder
with ``labels=folders``) or a folder of webdataset tars (img2dataset's output), and writes what
``data=shards`` reads: ``out/{train,val}/<split>-NNNNNN.tar``, ``sizes.json`` per split and, when
there are labels, ``classnames.txt`` + ``templates.txt`` with ``cls`` = the class's line number.
A sample holds ``txt`` = its first caption and, when it has several, ``json`` = ``{"caption": [all]}``
(what :func:`~mmpretrain.data.stream.decode.decode_captions` reads by default). A table with
``question`` and ``answer`` columns (``question_key``/``answer_key``; its caption column then
optional) gives each file's questions as the json's ``qa`` list, every row one question, its cell's
answers split at ``answer_separator`` (``|``: ``yes|yes|no|...``, VQA v2's ten annotators) and the
``question_type``/``answer_type`` columns when the table has them.

Every step is deterministic (the order of the input, the split by a hash of each row's path), so a
rerun assigns the same rows to the same shards: a shard whose record in ``out/.convert/`` matches
its rows is kept as it is, the rest are written to a temporary name and renamed. Rows that cannot
be converted are counted per reason and listed in ``out/skipped.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmpretrain.data.convert.sources import MEDIA, Options, Row, read_rows

DEFAULT_TEMPLATES = ["a photo of a {}."]
MIN_SHARDS = 16  # a split this small still feeds 4 ranks x 4 loader workers (each needs a shard)
RECORDS = ".convert"  # out/.convert/<shard>.json: what each finished shard holds


def convert(
    out: str | Path,
    src: str | Path,
    val: str | Path | None = None,
    val_fraction: float = 0.05,
    shard_size: int = 1000,
    workers: int | None = None,
    templates: list[str] | None = None,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Write ``out/train``, ``out/val`` (+ prompt files) from ``src``; returns ``out``."""
    opts = Options(**options)
    out = Path(out)
    rows = read_rows(Path(src), opts)
    if val is not None:
        splits = {"train": rows, "val": read_rows(Path(val), opts)}
    else:
        splits = split_rows(rows, val_fraction)
    classnames = class_list(splits, opts)
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for split, split_rows_ in splits.items():
        tasks += shard_tasks(out, split, split_rows_, shard_size, classnames)
    results = run_tasks(tasks, workers, progress)
    write_outputs(out, splits, results, classnames, templates or DEFAULT_TEMPLATES)
    report(out, splits, results)
    return out


# -- what goes where ----------------------------------------------------------------------------
def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by ``text`` (the same on every machine and run)."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16) / 16**15


def split_rows(rows: list[Row], val_fraction: float) -> dict[str, list[Row]]:
    """Val = the rows whose path hashes below ``val_fraction`` (at least one when the fraction is > 0)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: give a fraction in [0, 1)")
    hashes = [_unit_hash(r.source) for r in rows]
    is_val = [h < val_fraction for h in hashes]
    if val_fraction > 0 and not any(is_val) and len(rows) > 1:
        is_val[min(range(len(rows)), key=hashes.__getitem__)] = True
    return {
        "train": [r for r, v in zip(rows, is_val) if not v],
        "val": [r for r, v in zip(rows, is_val) if v],
    }


def class_list(splits: dict[str, list[Row]], opts: Options) -> list[str] | None:
    """The classes, in ``cls`` order: ``classnames=FILE``, else every label value sorted (numerically
    when all are integers). None when no row has a label."""
    if opts.classnames:
        return [line.strip() for line in Path(opts.classnames).read_text().splitlines() if line.strip()]
    values = {r.label for rows in splits.values() for r in rows if r.label}
    if not values and not opts.label_key and opts.labels != "folders":
        return None
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        return sorted(values, key=int)
    return sorted(values)


@dataclass(frozen=True)
class ShardTask:
    out: str
    split: str
    name: str  # train-000000.tar
    rows: tuple[Row, ...]
    classes: dict[str, int] | None

    def fingerprint(self) -> str:
        """What the shard is made of: its rows (not where the input lies: a rerun from another
        directory or with the input moved keeps the shards) and the class numbering."""
        rows = [{k: v for k, v in asdict(r).items() if k != "path"} for r in self.rows]
        return hashlib.sha1(json.dumps([self.classes, rows], sort_keys=True).encode()).hexdigest()


def shard_tasks(
    out: Path, split: str, rows: list[Row], shard_size: int, classnames: list[str] | None
) -> list[ShardTask]:
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: give a positive number of samples per tar")
    classes = {c: i for i, c in enumerate(classnames)} if classnames is not None else None
    tasks = [
        ShardTask(str(out), split, f"{split}-{i:06d}.tar", tuple(rows[a:b]), classes)
        for i, (a, b) in enumerate(shard_bounds(len(rows), shard_size))
    ]
    wanted = {t.name for t in tasks}
    for tmp in (out / split).glob(f".{split}-*.tmp"):  # a shard an interrupted run was writing
        tmp.unlink()
    for old in (out / split).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if old.name not in wanted:  # left by an earlier run with more rows or a smaller shard_size
            old.unlink()
            (out / RECORDS / f"{old.name}.json").unlink(missing_ok=True)
    return tasks


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each shard of ``n`` rows: ``shard_size`` each, except that fewer than
    ``MIN_SHARDS * shard_size`` rows make ``min(MIN_SHARDS, n)`` shards of near-equal size."""
    if n >= MIN_SHARDS * shard_size:
        return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]
    k = min(MIN_SHARDS, n)
    return [(j * n // k, (j + 1) * n // k) for j in range(k)]


# -- writing one shard (in a worker process) ----------------------------------------------------
def _record_path(out: Path, task: ShardTask) -> Path:
    return out / RECORDS / f"{task.name}.json"


def finished(task: ShardTask) -> dict | None:
    """The record of a shard a previous run finished from the same rows, else None."""
    out = Path(task.out)
    try:
        record = json.loads(_record_path(out, task).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != task.fingerprint():
        return None
    if record["samples"] and not (out / task.split / task.name).exists():
        return None
    return record


def write_shard(task: ShardTask) -> dict:
    """Write one tar (temporary name, then renamed; none when no row is usable) and its record;
    return the record."""
    from mmpretrain.data.convert.writing import write_json_atomic
    from mmpretrain.data.convert.writing import write_shard as write_tar

    record = finished(task)
    if record is not None:
        return record | {"reused": True}
    out = Path(task.out)
    (out / task.split).mkdir(parents=True, exist_ok=True)
    (out / RECORDS).mkdir(parents=True, exist_ok=True)
    skipped: list[dict] = []

    def samples():
        for row in task.rows:
            sample, why = build_sample(row, task.classes)
            if sample is None:
                skipped.append(
                    {"split": task.split, "source": row.source, "reason": why[0], "detail": why[1]}
                )
            else:
                yield sample

    written = write_tar(out / task.split / task.name, samples())
    if not written:  # every row skipped: no tar (a loader worker given only empty shards has nothing)
        (out / task.split / task.name).unlink()
    record = {"fingerprint": task.fingerprint(), "samples": written, "skipped": skipped}
    write_json_atomic(_record_path(out, task), record)
    return record | {"reused": False}


def build_sample(row: Row, classes: dict[str, int] | None) -> tuple[dict | None, tuple[str, str]]:
    """``(sample, ("", ""))`` or ``(None, (reason, detail))``."""
    from mmpretrain.data.stream.decode import decode_audio, decode_image

    if row.problem is not None:
        return None, row.problem
    captions = [c.strip() for c in row.captions if c and c.strip()]
    if not captions and not row.qa:
        return None, ("empty caption", "no caption text")
    sample: dict[str, Any] = {"__key__": row.key}
    if captions:
        sample["txt"] = captions[0]
    meta: dict[str, Any] = {"caption": captions} if len(captions) > 1 else {}
    if row.qa:
        meta["qa"] = [
            {"question": q, "answers": list(a)}
            | ({"question_type": qt} if qt else {})
            | ({"answer_type": at} if at else {})
            for q, a, qt, at in row.qa
        ]
    if meta:
        sample["json"] = json.dumps(meta, ensure_ascii=False).encode()
    if classes is not None:
        if row.label not in classes:
            return None, ("unknown label", f"label {row.label!r} is not one of the {len(classes)} classes")
        sample["cls"] = str(classes[row.label])
    ext = row.ext
    if ext not in MEDIA:
        return None, ("unsupported format", f".{ext}: supported are {', '.join(sorted(MEDIA))}")
    try:
        data = row.read()
    except FileNotFoundError as e:
        return None, ("missing file", str(e))
    try:
        if MEDIA[ext] == "image":
            decode_image(data)
        else:
            decode_audio(data, ext)
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
        detail = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(e).__name__}: {e}")
        return None, ("corrupt file", detail)
    sample[ext] = data
    return sample, ("", "")


def run_tasks(tasks: list[ShardTask], workers: int | None, progress: bool) -> list[dict]:
    """Write the shards, ``workers`` processes at a time, with a progress bar; records in task order."""
    from mmpretrain.data.convert.writing import parallel_map

    records = parallel_map(write_shard, tasks, workers, progress=progress)
    return [r | {"split": t.split, "name": t.name, "rows": len(t.rows)} for r, t in zip(records, tasks)]


# -- what the run leaves beside the shards --------------------------------------------------------
def write_outputs(
    out: Path,
    splits: dict[str, list[Row]],
    results: list[dict],
    classnames: list[str] | None,
    templates: list[str],
) -> None:
    """Prompt files, ``skipped.jsonl``, then ``sizes.json`` of each split (last: it marks a split done)."""
    from mmpretrain.data.convert.writing import write_prompt_files, write_sizes, write_text_atomic

    if classnames is not None:
        write_prompt_files(out, classnames, templates)
    skipped = [s for r in results for s in r["skipped"]]
    write_text_atomic(out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
    for split in splits:
        sizes = {r["name"]: r["samples"] for r in results if r["split"] == split and r["samples"]}
        (out / split).mkdir(parents=True, exist_ok=True)
        write_sizes(out / split, sizes)


def report(out: Path, splits: dict[str, list[Row]], results: list[dict]) -> None:
    """A table per split: input rows, samples (a file's rows make one), samples written, shards and
    their size, shards reused, and every reason samples were skipped."""
    from rich.console import Console
    from rich.table import Table

    reasons = sorted({s["reason"] for r in results for s in r["skipped"]})
    table = Table(title=f"converted into {out}")
    for col in ("split", "rows", "samples", "written", "shards", "shard size", "reused", *reasons):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, rows in splits.items():
        split_results = [r for r in results if r["split"] == split]
        skipped = [s["reason"] for r in split_results for s in r["skipped"]]
        sizes = sorted({r["rows"] for r in split_results})
        table.add_row(
            split,
            str(sum(max(len(r.captions), len(r.qa), 1) for r in rows)),
            str(len(rows)),
            str(sum(r["samples"] for r in split_results)),
            str(sum(bool(r["samples"]) for r in split_results)),
            "-".join(map(str, dict.fromkeys(sizes[:1] + sizes[-1:]))),  # smallest-largest
            str(sum(r["reused"] for r in split_results)),
            *(str(skipped.count(k)) for k in reasons),
        )
    console = Console(width=120)
    console.print(table)
    n_skipped = sum(len(r["skipped"]) for r in results)
    if n_skipped:
        console.print(
            f"skipped {n_skipped} samples; each is listed with its reason in {out / 'skipped.jsonl'}"
        )
    for split in splits:
        if not any(r["samples"] for r in results if r["split"] == split):
            console.print(
                f"[bold]warning[/]: split '{split}' has no sample (data=shards needs {out}/{split}/*.tar)"
            )
