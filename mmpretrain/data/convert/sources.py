"""The rows of a user's dataset, before conversion: a table, a folder with sidecars, or tars.

A :class:`Row` names one media file (or one sample of a tar) with every caption and the label found
for it: the rows of a table that name the same file (COCO, Flickr: one row per caption) make ONE
row, its captions in table order. Nothing is opened or checked here beyond reading the table, the
sidecar captions and the tars; what the listing finds unusable (a corrupt tar, a bad json, labels
that disagree) becomes a row carrying its ``problem``, so the converter reports it with its reason
instead of stopping.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

# Our key conventions (decode.py): the field name of each media extension, by modality.
MEDIA = {
    "jpg": "image",
    "jpeg": "image",
    "png": "image",
    "webp": "image",
    "flac": "audio",
    "wav": "audio",
    "mp3": "audio",
}
TABLES = (".csv", ".tsv", ".parquet")


@dataclass(frozen=True)
class Options:
    img_key: str = "filepath"
    caption_key: str = "title"
    label_key: str | None = None
    separator: str = "auto"
    labels: str | None = None  # "folders": a class per sub-folder of a folder input
    classnames: str | None = None  # a file fixing the classes (one a line); else the sorted label values
    question_key: str = "question"  # VQA: read when the table has it and answer_key
    answer_key: str = "answer"
    answer_separator: str = "|"  # several annotators' answers in one cell: "yes|yes|no"


@dataclass(frozen=True)
class Row:
    key: str  # the sample's key in the tar: a slug of ``source`` + a short hash (unique, no dots)
    source: str  # where it comes from, as the user named it (reports, the train/val hash)
    path: str  # the file to read (a tar for tar input)
    ext: str  # normalised extension: the sample's field name (.JPG -> jpg)
    captions: tuple[str | None, ...]  # one per input row naming the file, in input order
    label: str | None = None
    offset: int | None = None  # tar input: the sample's header offset in ``path``
    problem: tuple[str, str] | None = None  # (reason, detail): found unusable while listing
    qa: tuple[tuple[str, tuple[str, ...], str | None, str | None], ...] = ()  # (question, answers, types)

    def read(self) -> bytes:
        if self.offset is None:
            return Path(self.path).read_bytes()
        from mmpretrain.data.stream.tar_reader import read_sample_at

        return read_sample_at(self.path, self.offset)[self.ext]


def sample_key(source: str) -> str:
    """A tar key for ``source``: a slug of it and a short hash (unique, no dots)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", source).strip("_")[-60:]
    return f"{slug}-{hashlib.sha1(source.encode()).hexdigest()[:10]}"


def media_ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in Path(name).name else ""


def read_rows(src: Path, opts: Options) -> list[Row]:
    """Every row of ``src`` (a table file, a media folder, or a folder of ``.tar`` shards), in a fixed
    order."""
    if not src.exists():
        raise FileNotFoundError(f"in={src} does not exist (give a .csv/.tsv/.parquet table or a folder)")
    if src.is_file():
        if src.suffix.lower() not in TABLES:
            raise ValueError(
                f"in={src}: unknown format '{src.suffix}'; give a table ({', '.join(TABLES)}), a folder of "
                f"media files with .txt/.json captions, or a folder of webdataset .tar shards"
            )
        rows = read_table(src, opts)
    elif any(src.glob("*.tar")) and not any(
        p.is_file() and media_ext(p.name) in MEDIA for p in src.rglob("*")
    ):
        rows = read_tars(src)
    else:
        rows = read_folder(src, opts)
    if not rows:
        raise ValueError(
            f"in={src} holds no rows: no table row, and no media file "
            f"({', '.join('.' + e for e in MEDIA)}) found recursively"
        )
    return rows


# -- tables ------------------------------------------------------------------------------------------
def read_table(path: Path, opts: Options) -> list[Row]:
    """One row per media file: the table's rows naming it (the same path once normalised) give its
    captions in table order and its label (they must agree: else the row's problem says so)."""
    columns, records = _table_records(path, opts.separator)
    questions = opts.question_key in columns and opts.answer_key in columns
    wanted = {"img_key": opts.img_key}
    if not questions or opts.caption_key in columns:  # a VQA table needs no caption
        wanted["caption_key"] = opts.caption_key
    if opts.label_key:
        wanted["label_key"] = opts.label_key
    for option, column in wanted.items():
        if column not in columns:
            other = next((s for s in ";\t," if len(columns) == 1 and s in columns[0]), None)
            hint = f" or separator='{other}'" if other else ""  # Excel writes ';' in some locales
            raise ValueError(
                f"table {path} has no column '{column}' ({option}={column}); its columns are {columns}. Set "
                f"{option}=<one of them>{hint}"
            )
    groups: dict[str, dict] = {}  # one per media file (its normalised path), in order of first appearance
    for i, rec in enumerate(records, 1):
        name = str(rec[opts.img_key] or "").strip()
        file = Path(name) if Path(name).is_absolute() else path.parent / name
        # a row without a file name is a group of its own, reported as such
        group = groups.setdefault(
            os.path.normpath(file) if name else f"\0{i}",
            {
                "name": name or f"{path.name} row {i}",
                "file": file if name else "",
                "captions": [],
                "labels": [],
                "qa": [],
                "problem": None,
            },
        )
        if "caption_key" in wanted:
            caption = rec[opts.caption_key]
            group["captions"].append(None if caption is None else str(caption))
        if questions:
            entry, problem = _question(rec, opts, i)
            if entry is not None:
                group["qa"].append(entry)
            group["problem"] = group["problem"] or problem
        label = rec[opts.label_key] if opts.label_key else None
        if label is not None and str(label).strip():
            group["labels"].append(str(label).strip())
    rows = []
    for g in groups.values():
        labels = sorted(set(g["labels"]))
        problem = None
        if not g["file"]:
            problem = ("missing file", f"empty {opts.img_key} cell")
        elif len(labels) > 1:
            problem = ("conflicting labels", f"the rows of {g['name']} give the labels {labels}")
        elif g["problem"]:
            problem = g["problem"]
        rows.append(
            Row(
                key=sample_key(g["name"]),
                source=g["name"],
                path=str(g["file"]),
                ext=media_ext(g["name"]),
                captions=tuple(g["captions"]),
                label=labels[0] if len(labels) == 1 else None,
                problem=problem,
                qa=tuple(g["qa"]),
            )
        )
    return rows


def _question(rec: dict, opts: Options, i: int) -> tuple[tuple | None, tuple[str, str] | None]:
    """A table row's ``(question, answers, question_type, answer_type)`` (None without a question),
    or the problem that makes its file's sample unusable (a question without an answer)."""
    question = str(rec.get(opts.question_key) or "").strip()
    cell = str(rec.get(opts.answer_key) or "")
    answers = tuple(a.strip() for a in cell.split(opts.answer_separator) if a.strip())
    if not question:
        return None, None if not answers else (
            "answer without question",
            f"row {i} has an answer, no question",
        )
    if not answers:
        return None, ("question without answer", f"row {i}: '{question}' has no {opts.answer_key}")
    types = tuple(str(rec.get(k) or "").strip() or None for k in ("question_type", "answer_type"))
    return (question, answers, *types), None


def _table_records(path: Path, separator: str) -> tuple[list[str], list[dict]]:
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                f"reading {path} needs pyarrow: `pip install pyarrow` (or `pip install "
                "'mmpretrain[parquet]'`), or save the table as .csv/.tsv"
            ) from None
        table = pq.read_table(path)
        return list(table.column_names), table.to_pylist()
    sep = {"auto": "\t" if path.suffix.lower() == ".tsv" else ",", "tab": "\t", "\\t": "\t"}.get(
        separator, separator
    )
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte order mark
        reader = csv.DictReader(f, delimiter=sep)
        try:
            records = list(reader)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"table {path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8 (Excel: "
                f"'CSV UTF-8')"
            ) from None
        return list(reader.fieldnames or []), records


# -- a folder of media files with sidecar captions ------------------------------------------------------
def read_folder(root: Path, opts: Options) -> list[Row]:
    if opts.labels not in (None, "folders"):
        raise ValueError(
            f"labels={opts.labels}: choose labels=folders (a class per sub-folder) or leave it unset"
        )
    rows = []
    for file in sorted(p for p in root.rglob("*") if p.is_file() and media_ext(p.name) in MEDIA):
        rel = file.relative_to(root).as_posix()
        label = None
        if opts.labels == "folders" and "/" in rel:
            label = rel.split("/", 1)[0]
        stem = file.with_suffix("")
        txt, js = (stem.with_name(stem.name + ext) for ext in (".txt", ".json"))
        captions, problem = text_captions(
            txt.read_bytes() if txt.exists() else None,
            js.read_bytes() if js.exists() else None,
            stem.name,
            opts.caption_key,
        )
        rows.append(
            Row(
                key=sample_key(rel),
                source=rel,
                path=str(file),
                ext=media_ext(file.name),
                captions=captions,
                label=label,
                problem=problem,
            )
        )
    return rows


def text_captions(
    txt: bytes | None, js: bytes | None, stem: str, caption_key: str = "caption"
) -> tuple[tuple[str | None, ...], tuple[str, str] | None]:
    """``(captions, problem)`` of a sample's ``stem.txt`` and ``stem.json``, read as
    :func:`~mmpretrain.data.stream.decode.decode_captions` does by default: a json whose ``caption``
    (else ``caption_key``) field is a list gives all of them, else the txt, else that field. A bad
    json is a problem only when the caption has to come from it."""
    value, problem = None, None
    if js is not None:
        try:
            obj = json.loads(js)
            if not isinstance(obj, dict):
                raise ValueError(f"a json {type(obj).__name__}, not an object")
            value = obj.get("caption") if obj.get("caption") is not None else obj.get(caption_key)
        except ValueError as e:  # UnicodeDecodeError too
            problem = ("bad json", f"{stem}.json: {e}")
    if isinstance(value, list):
        return tuple(str(c) for c in value), None
    if txt is not None:
        try:
            return (txt.decode("utf-8"),), None
        except UnicodeDecodeError as e:
            return (None,), ("bad caption", f"{stem}.txt: {e}")
    return (None if value is None else str(value),), problem


# -- webdataset tars (img2dataset's output) ---------------------------------------------------------------
def read_tars(root: Path) -> list[Row]:
    """One row per sample of ``root/*.tar`` that has a media field, the caption from ``txt`` or json
    ``caption``; and one per fault a corrupt tar reports (its samples from the fault on are lost)."""
    from mmpretrain.data.stream.tar_reader import read_samples

    rows = []
    for tar in sorted(root.glob("*.tar")):
        faults: list[Exception] = []
        for start, _, sample in read_samples(str(tar), on_error=faults.append):
            ext = next((e for e in MEDIA if e in sample), None)
            if ext is not None:
                rows.append(_tar_row(tar, start, sample, ext))
        for i, exc in enumerate(faults):
            rows.append(
                Row(
                    key=sample_key(f"{tar.name}\0fault {i}"),
                    source=tar.name,
                    path=str(tar),
                    ext="",
                    captions=(),
                    problem=("corrupt tar", f"{type(exc).__name__}: {exc}"),
                )
            )
    return rows


def _tar_row(tar: Path, start: int, sample: dict, ext: str) -> Row:
    key = sample["__key__"]
    source = f"{tar.name}/{key}"
    captions, problem = text_captions(sample.get("txt"), sample.get("json"), key)
    label = None
    if "cls" in sample:
        try:
            label = sample["cls"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            problem = problem or ("bad label", f"{key}.cls: {e}")
    return Row(sample_key(source), source, str(tar), ext, captions, label, start, problem)
