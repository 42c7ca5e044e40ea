"""`mmpretrain data shards`: the user's own data (tables, folders, img2dataset tars) into our shard layout."""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpretrain.data.convert.convert import convert
from mmpretrain.data.stream.decode import decode_sample
from mmpretrain.data.stream.shards import count_samples, expand_shards
from mmpretrain.data.stream.tar_reader import read_samples

CONSOLE_SCRIPT = Path(sys.executable).parent / "mmpretrain"


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 17 % 256, i * 5 % 256, 9)).save(buf, format="PNG")
    return buf.getvalue()


def jpg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 17 % 256, 40, 9)).save(buf, format="JPEG")
    return buf.getvalue()


def wav(i: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.sin(np.arange(800) * (i + 1) / 50).astype(np.float32), 8000, format="WAV")
    return buf.getvalue()


def samples_of(root: Path, split: str) -> list[dict]:
    return [s for tar in sorted((root / split).glob("*.tar")) for _, _, s in read_samples(str(tar))]


def write_table(path: Path, rows: list[dict], sep: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=sep)
        w.writeheader()
        w.writerows(rows)
    return path


def image_table(
    tmp: Path, n: int = 20, sep: str = ",", name: str = "data.csv"
) -> tuple[Path, dict[str, bytes]]:
    (tmp / "img").mkdir(exist_ok=True)
    rows, files = [], {}
    for i in range(n):
        data = png(i)
        (tmp / "img" / f"{i}.png").write_bytes(data)
        files[f"caption {i}"] = data
        rows.append(
            {"filepath": f"img/{i}.png", "title": f"caption {i}", "label": ["cat", "dog", "emu"][i % 3]}
        )
    return write_table(tmp / name, rows, sep), files


def test_csv_round_trip_keeps_bytes_captions_and_classes(tmp_path):
    table, files = image_table(tmp_path)
    out = convert(
        tmp_path / "out", table, label_key="label", val_fraction=0.2, shard_size=6, workers=1, progress=False
    )
    train, val = samples_of(out, "train"), samples_of(out, "val")
    assert len(train) + len(val) == 20 and 1 <= len(val) < 10
    assert (out / "classnames.txt").read_text() == "cat\ndog\nemu\n"
    assert (out / "templates.txt").read_text() == "a photo of a {}.\n"
    for s in train + val:
        caption = s["txt"].decode()
        assert s["png"] == files[caption]  # copied as is
        i = int(caption.split()[1])
        assert int(s["cls"]) == i % 3
    sizes = json.loads((out / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(train) and all(name.startswith("train-") for name in sizes)
    assert max(sizes.values()) <= 6
    assert count_samples(expand_shards(f"{out}/val/*.tar")) == len(val)
    assert (out / "skipped.jsonl").read_text() == ""


def test_tsv_with_other_columns_and_a_separate_val_table(tmp_path):
    table, _ = image_table(tmp_path, n=8, sep="\t", name="train.tsv")
    rows = [{"path": f"img/{i}.png", "text": f"caption {i}", "label": "cat"} for i in range(3)]
    write_table(tmp_path / "val.tsv", rows, sep="\t")
    with open(table) as f:  # the same layout with other column names
        lines = f.read().replace("filepath\ttitle", "path\ttext", 1)
    table.write_text(lines)
    out = convert(
        tmp_path / "out",
        table,
        val=tmp_path / "val.tsv",
        img_key="path",
        caption_key="text",
        label_key="label",
        workers=1,
        progress=False,
    )
    assert len(samples_of(out, "train")) == 8 and len(samples_of(out, "val")) == 3


def test_a_missing_column_names_the_columns_and_the_option(tmp_path):
    table, _ = image_table(tmp_path, n=2)
    with pytest.raises(
        ValueError, match=r"no column 'caption'.*\['filepath', 'title', 'label'\].*caption_key="
    ):
        convert(tmp_path / "out", table, caption_key="caption", workers=1, progress=False)


def test_clear_errors_for_a_wrong_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "out", tmp_path / "nope.csv", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no rows"):
        convert(tmp_path / "out", tmp_path / "empty", progress=False)
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unknown format '.xlsx'"):
        convert(tmp_path / "out", tmp_path / "data.xlsx", progress=False)


def test_folder_with_sidecars_and_a_class_per_folder(tmp_path):
    src = tmp_path / "src"
    for label in ("birds", "cars"):
        (src / label / "deeper").mkdir(parents=True)
    (src / "birds" / "a.JPG").write_bytes(jpg(1))
    (src / "birds" / "a.txt").write_text("a bird\n")
    (src / "birds" / "deeper" / "b.jpeg").write_bytes(jpg(2))
    (src / "birds" / "deeper" / "b.json").write_text(json.dumps({"caption": "another bird", "url": "x"}))
    (src / "cars" / "c.png").write_bytes(png(3))
    (src / "cars" / "c.txt").write_text("a car")
    (src / "cars" / "d.wav").write_bytes(wav(4))
    (src / "cars" / "d.txt").write_text("an engine")
    (src / "cars" / "e.png").write_bytes(png(5))  # no caption: skipped
    (src / "loose.png").write_bytes(png(6))  # no class folder: skipped
    (src / "loose.txt").write_text("no class")
    (src / "cars" / "f.png").write_bytes(png(7))
    (src / "cars" / "f.json").write_text('{"caption": "cut')  # a bad json: skipped
    out = convert(tmp_path / "out", src, labels="folders", val_fraction=0.0, workers=1, progress=False)
    got = {s["txt"].decode(): s for s in samples_of(out, "train")}
    assert set(got) == {"a bird", "another bird", "a car", "an engine"}
    assert got["a bird"]["jpg"] == jpg(1)  # .JPG -> jpg
    assert got["another bird"]["jpeg"] == jpg(2)  # .jpeg stays jpeg
    assert got["an engine"]["wav"] == wav(4)
    assert {k: int(s["cls"]) for k, s in got.items()} == {
        "a bird": 0,
        "another bird": 0,
        "a car": 1,
        "an engine": 1,
    }
    assert (out / "classnames.txt").read_text() == "birds\ncars\n"
    skipped = {
        json.loads(line)["source"]: json.loads(line)["reason"]
        for line in (out / "skipped.jsonl").read_text().splitlines()
    }
    assert skipped == {"cars/e.png": "empty caption", "cars/f.png": "bad json", "loose.png": "unknown label"}
    decoded = decode_sample(got["an engine"], ["audio", "text", "cls"], required=["audio"])
    assert decoded["audio"][1] == 8000 and decoded["cls"] == 1


def test_a_corrupt_image_is_counted_reported_and_not_written(tmp_path, capsys, monkeypatch):
    table, _ = image_table(tmp_path, n=6)
    (tmp_path / "img" / "3.png").write_bytes(png(3)[:40])  # truncated
    out = convert(tmp_path / "out", table, val_fraction=0.0, workers=1)
    captions = {s["txt"].decode() for s in samples_of(out, "train")}
    assert "caption 3" not in captions and len(captions) == 5
    [line] = (out / "skipped.jsonl").read_text().splitlines()
    assert json.loads(line)["source"] == "img/3.png" and json.loads(line)["reason"] == "corrupt file"
    printed = capsys.readouterr().out
    assert "corrupt file" in printed and "skipped.jsonl" in printed
    sizes = json.loads((out / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == 5 and min(sizes.values()) == 1  # 6 shards of 1 row: no empty tar
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == sorted(sizes)
    from mmpretrain.data.convert import sources

    reads = []
    monkeypatch.setattr(sources.Row, "read", lambda row: reads.append(row.source))
    convert(tmp_path / "out", table, val_fraction=0.0, workers=1)
    assert reads == []  # a rerun knows the shard without a tar from its record


def test_a_rerun_keeps_finished_shards_and_rewrites_lost_ones_identically(tmp_path):
    table, _ = image_table(tmp_path, n=30)
    out = convert(
        tmp_path / "out", table, label_key="label", val_fraction=0.1, shard_size=5, workers=1, progress=False
    )
    tars = sorted(out.glob("*/*.tar"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tars}
    tars[1].unlink()  # as if the first run died before this shard
    (out / "train" / "sizes.json").unlink()
    convert(out, table, label_key="label", val_fraction=0.1, shard_size=5, workers=2, progress=False)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("*/*.tar"))}
    assert set(after) == set(before)
    assert all(after[p][1] == before[p][1] for p in tars)  # same bytes, also from the worker processes
    assert [p for p in tars if after[p][0] != before[p][0]] == [tars[1]]  # only the lost shard was written
    assert sum(json.loads((out / "train" / "sizes.json").read_text()).values()) == len(
        samples_of(out, "train")
    )


def test_a_csv_saved_by_excel_with_a_byte_order_mark(tmp_path):
    table, files = image_table(tmp_path, n=4)
    table.write_bytes(codecs.BOM_UTF8 + table.read_bytes())  # Excel's "CSV UTF-8": BOM + CRLF lines
    out = convert(tmp_path / "out", table, label_key="label", val_fraction=0.0, workers=1, progress=False)
    assert {s["txt"].decode() for s in samples_of(out, "train")} == set(files)
    assert (out / "classnames.txt").read_text() == "cat\ndog\nemu\n"
    table.write_text(table.read_text(encoding="utf-8-sig").replace("caption 1", "café 1"), encoding="cp1252")
    with pytest.raises(ValueError, match="is not UTF-8 text.*'CSV UTF-8'"):  # Excel's "CSV": cp1252
        convert(tmp_path / "out", table, workers=1, progress=False)
    table.write_text(table.read_text(encoding="cp1252").replace(",", ";"), encoding="utf-8")
    with pytest.raises(ValueError, match="no column 'filepath'.*or separator=';'"):  # Excel in some locales
        convert(tmp_path / "out", table, workers=1, progress=False)


# -- shard sizes --------------------------------------------------------------------------------
def test_shard_bounds_keep_shard_size_until_a_split_would_have_under_16_shards():
    from mmpretrain.data.convert.convert import shard_bounds

    assert shard_bounds(16_000, 1000) == [(a, a + 1000) for a in range(0, 16_000, 1000)]
    assert shard_bounds(16_500, 1000)[-1] == (16_000, 16_500)  # a large split: shard_size, then the rest
    small = shard_bounds(3000, 1000)
    assert len(small) == 16 and {b - a for a, b in small} == {187, 188}
    assert [a for a, _ in small[1:]] == [b for _, b in small[:-1]] and small[-1][1] == 3000
    assert shard_bounds(5, 1000) == [(i, i + 1) for i in range(5)]
    assert shard_bounds(0, 1000) == []


def test_a_small_set_with_default_options_has_a_shard_for_every_loader_worker(tmp_path):
    """3,000 rows at the default shard_size (1000) made 3 train shards, and `mmpretrain train
    data=shards` refused them: 1 rank x 4 loader workers need 4."""
    from mmpretrain.data.stream.position import shard_plan

    table, _ = image_table(tmp_path, n=3000)
    out = convert(tmp_path / "out", table, progress=False)
    sizes = {split: json.loads((out / split / "sizes.json").read_text()) for split in ("train", "val")}
    assert len(sizes["train"]) == len(sizes["val"]) == 16
    assert sum(sizes["train"].values()) + sum(sizes["val"].values()) == 3000
    assert max(sizes["train"].values()) - min(sizes["train"].values()) <= 1
    for world in (1, 4):  # 1 or 4 ranks x 4 workers, every pass
        plans = [
            shard_plan(16, 0, p, r, world, w, 4) for p in range(3) for r in range(world) for w in range(4)
        ]
        assert all(plans)
    (tmp_path / "tiny").mkdir()
    tiny, _ = image_table(tmp_path / "tiny", n=5)
    out = convert(tmp_path / "tiny_out", tiny, progress=False)  # 1 val sample, a shard per train sample
    train, val = samples_of(out, "train"), samples_of(out, "val")
    assert len(val) == 1 and len(train) == 4 and len(list((out / "train").glob("*.tar"))) == 4


def test_parquet_table(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    image_table(tmp_path, n=4)
    rows = {"filepath": [f"img/{i}.png" for i in range(4)], "title": [f"caption {i}" for i in range(4)]}
    pq.write_table(pa.table(rows), tmp_path / "data.parquet")
    out = convert(tmp_path / "out", tmp_path / "data.parquet", val_fraction=0.0, workers=1, progress=False)
    assert len(samples_of(out, "train")) == 4


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    image_table(tmp_path, n=1)
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        convert(tmp_path / "out", tmp_path / "data.parquet", workers=1, progress=False)


# -- img2dataset's output ------------------------------------------------------------------------
def write_img2dataset(root: Path, shards: int = 3, per_shard: int = 12) -> int:
    """What img2dataset writes with output_format=webdataset: NNNNN.tar holding, per sample, a
    zero-padded key (shard id + index in the shard) with .jpg, .txt and .json, and beside each tar
    NNNNN.parquet (the metadata table) and NNNNN_stats.json."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                meta = {
                    "url": f"https://example.com/{key}.jpg",
                    "caption": f"photo {s} {j}",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": 8,
                    "height": 8,
                    "original_width": 8,
                    "original_height": 8,
                    "exif": None,
                    "sha256": "0" * 64,
                }
                for ext, data in (
                    ("jpg", jpg(s * 100 + j)),
                    ("txt", meta["caption"].encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        (root / f"{s:05d}.parquet").write_bytes(b"PAR1 not read by us PAR1")
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return shards * per_shard


def test_a_corrupt_tar_and_a_bad_json_are_counted_and_the_rest_converted(tmp_path):
    root = tmp_path / "i2d"
    write_img2dataset(root)
    cut = root / "00001.tar"
    with tarfile.open(cut) as tf:
        jpg7 = next(m for m in tf.getmembers() if m.name == "000010006.jpg")
    cut.write_bytes(cut.read_bytes()[: jpg7.offset_data + jpg7.size // 2])  # cut inside the 7th sample
    with tarfile.open(root / "00002.tar", "w") as tf:
        for j in range(12):
            key, meta = f"00002{j:04d}", json.dumps({"caption": f"photo 2 {j}"}).encode()
            members = {"jpg": jpg(200 + j), "txt": f"photo 2 {j}".encode(), "json": meta}
            if j in (3, 4):
                members["json"] = b'{"caption": "photo'  # cut short
            if j == 3:
                del members["txt"]  # and the caption is in it only
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    out = convert(tmp_path / "out", root, val_fraction=0.0, workers=1, progress=False)
    written = {s["txt"].decode(): s["jpg"] for s in samples_of(out, "train")}
    expected = (
        [(0, j) for j in range(12)] + [(1, j) for j in range(6)] + [(2, j) for j in range(12) if j != 3]
    )
    assert written == {f"photo {s} {j}": jpg(s * 100 + j) for s, j in expected}
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    reasons = {(s["source"], s["reason"]) for s in skipped}
    assert ("00001.tar", "corrupt tar") in reasons and ("00002.tar/000020003", "bad json") in reasons
    # anything else: the fault reported again, or what the reader hands on of the sample cut there
    assert {src for src, _ in reasons} <= {"00001.tar", "00001.tar/000010006", "00002.tar/000020003"}
    assert sum(json.loads((out / "train" / "sizes.json").read_text()).values()) == len(expected)


def test_img2dataset_output_is_read_directly_and_counted_without_sizes_json(tmp_path):
    root = tmp_path / "i2d"
    n = write_img2dataset(root)
    urls = expand_shards(f"{root}/*.tar")
    assert [Path(u).name for u in urls] == ["00000.tar", "00001.tar", "00002.tar"]  # no .parquet, no stats
    assert count_samples(urls) == n  # from the tar headers (then remembered in sizes.json)
    assert json.loads((root / "sizes.json").read_text()) == {
        "00000.tar": 12,
        "00001.tar": 12,
        "00002.tar": 12,
    }
    samples = [s for u in urls for _, _, s in read_samples(u)]
    assert samples[0]["__key__"] == "000000000"
    decoded = decode_sample(samples[13], ["image", "text"], required=["image", "text"])
    assert decoded["text"] == ["photo 1 1"] and decoded["image"].size == (8, 8)  # text: the list of captions


def test_img2dataset_output_can_be_resharded_and_split(tmp_path):
    root = tmp_path / "i2d"
    n = write_img2dataset(root)
    out = convert(tmp_path / "out", root, val_fraction=0.25, shard_size=10, workers=1, progress=False)
    train, val = samples_of(out, "train"), samples_of(out, "val")
    assert len(train) + len(val) == n and val
    assert not (out / "classnames.txt").exists()
    assert {s["txt"].decode() for s in train + val} == {f"photo {s} {j}" for s in range(3) for j in range(12)}


# -- through the installed console script ------------------------------------------------------------
SMALL_TEXT = [
    "model.towers.text.config.text_cfg.width=32",
    "model.towers.text.config.text_cfg.heads=2",
    "model.towers.text.config.text_cfg.layers=1",
    "export_at_end=false",
    "callbacks.plots=null",
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [str(CONSOLE_SCRIPT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_converted_table_trains_through_the_console_script(tmp_path):
    table, _ = image_table(tmp_path, n=64)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _run(
        [
            "data",
            "shards",
            f"in={table}",
            f"out={tmp_path / 'out'}",
            "label_key=label",
            "val_fraction=0.25",
            "workers=2",
            f"hydra.run.dir={tmp_path / 'd'}",
        ],
        elsewhere,
    )
    assert "written" in proc.stdout
    run = tmp_path / "run"
    _run(
        [
            "train",
            "data=shards",
            f"data.root={tmp_path / 'out'}",
            "debug=fast",
            "data.num_workers=4",  # the default loader workers: 48 rows at the default shard_size feed them
            f"hydra.run.dir={run}",
            *SMALL_TEXT,
        ],
        elsewhere,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped_samples"] == 0 and "val/zeroshot_top1/image_text" in metrics


@pytest.mark.slow
def test_img2dataset_output_trains_through_the_console_script(tmp_path):
    root = tmp_path / "i2d"
    write_img2dataset(root, shards=3, per_shard=40)  # 80 train samples: 5 batches, validation after step 4
    run = tmp_path / "run"
    _run(
        [
            "train",
            "data=shards",
            f"data.root={root}",
            f"data.sources.main.shards='{root}/{{00000..00001}}.tar'",
            f"data.val.shards={root}/00002.tar",
            "optimized_metric=val/retrieval_R@1/image_to_text",
            "debug=fast",
            f"hydra.run.dir={run}",
            *SMALL_TEXT,
        ],
        tmp_path,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped_samples"] == 0 and metrics["train/loss"] > 0
    assert "val/retrieval_R@1/image_to_text" in metrics  # no classnames.txt: retrieval only, no zero-shot
    assert not any(k.startswith("val/zeroshot") for k in metrics)
    # the train shards were counted from their tar headers, and remembered
    assert json.loads((root / "sizes.json").read_text()) == {f"{s:05d}.tar": 40 for s in range(2)}


def test_the_data_command_passes_its_options(tmp_path):
    from mmpretrain.commands.data import data
    from mmpretrain.data.builders import options
    from tests.conftest import compose_config

    table, _ = image_table(tmp_path, n=6)
    out = tmp_path / "out"
    cfg = compose_config(
        "build_data",
        [
            "name=shards",
            f"in={table}",
            f"out={out}",
            "label_key=label",
            "shard_size=2",
            "workers=1",
            "val_fraction=0.4",
        ],
    )
    assert data(cfg) == out
    assert len(list(out.glob("train/train-*.tar"))) >= 2 and (out / "classnames.txt").exists()
    with pytest.raises(ValueError, match="needs in="):
        options("shards", compose_config("build_data", ["name=shards", f"out={out}"]))
    assert options("digits", compose_config("build_data", [])) == {
        "seed": 0
    }  # null: the builder's default size
    assert options("digits", compose_config("build_data", ["image_size=16"])) == {"seed": 0, "image_size": 16}
    scenes = options("scenes", compose_config("build_data", ["name=scenes", "train=10", "val=4"]))
    assert scenes == {"seed": 0, "train": 10, "val": 4, "shard_size": 1000}


def test_a_rerun_of_a_finished_conversion_reads_no_media(tmp_path, monkeypatch):
    """Cost: finished shards are recognised from their records, so a rerun opens none of the media files."""
    from mmpretrain.data.convert import sources

    table, _ = image_table(tmp_path, n=12)
    convert(tmp_path / "out", table, shard_size=4, workers=1, progress=False)
    reads = []
    original = sources.Row.read
    monkeypatch.setattr(sources.Row, "read", lambda row: reads.append(row.source) or original(row))
    monkeypatch.chdir(tmp_path)  # the same table named from elsewhere: the same rows
    convert(tmp_path / "out", "data.csv", shard_size=4, workers=1, progress=False)
    assert reads == []
    (tmp_path / "out" / "train" / "train-000000.tar").unlink()
    convert(tmp_path / "out", table, shard_size=4, workers=1, progress=False)
    sizes = json.loads((tmp_path / "out" / "train" / "sizes.json").read_text())
    assert len(reads) == sizes["train-000000.tar"]  # the one lost shard
