"""The scenes builder: reproducible parallel shards, captions true of their image, hard negatives false
of it (by a checker of its own that reads the words, not the builder's structures), a compositional
split, resumable builds, and shards the project's reader and trainer take as they are."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from mmpretrain.data import ShardStream, Source
from mmpretrain.data.synthetic.scenes import build_scenes
from mmpretrain.data.synthetic.scenes.grammar import (
    COLOR_WORDS,
    COUNT_WORDS,
    RELATION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
)

TINY = {"train": 40, "val": 20, "test": 20, "shard_size": 10, "image_size_min": 64, "image_size_max": 96}


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    return build_scenes(tmp_path_factory.mktemp("scenes") / "s", workers=2, **TINY)


def samples(root: Path, split: str) -> list[dict]:
    urls = sorted(str(p) for p in (root / split).glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False))


# -- an independent reader of the captions -----------------------------------------------------
def _words(table: dict) -> dict[str, str]:
    """word -> canonical value, for flat ``{value: [word, ...]}`` tables."""
    return {w: k for k, ws in table.items() for w in ws}


COLOR = _words(COLOR_WORDS)
SIZE = _words(SIZE_WORDS)
SHAPE = {w: k for k, pairs in SHAPE_WORDS.items() for pair in pairs for w in pair}
COUNT = {w: n for n, ws in COUNT_WORDS.items() for w in ws} | {"an": 1, "another": 1}
REL = sorted(((w, k) for k, ws in RELATION_WORDS.items() for w in ws), key=lambda p: -len(p[0]))


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


PHRASE = re.compile(rf"\b({_alt(COUNT)}) (?:({_alt(SIZE)}) )?({_alt(COLOR)}) ({_alt(SHAPE)})\b")


def read_caption(text: str) -> tuple[list[dict], tuple[int, str, int] | None]:
    """Noun groups [{n, color, shape, size}] and the relation (group, rel, group) the words state."""
    found = list(PHRASE.finditer(text))
    assert found, text
    groups, spans = [], []
    for m in found:
        count, size, color, shape = m.groups()
        if count == "another":  # "a red circle, another red circle": one group of two
            groups[-1]["n"] += 1
            spans[-1] = (spans[-1][0], m.end())
            continue
        groups.append(
            {"n": COUNT[count], "size": SIZE.get(size), "color": COLOR[color], "shape": SHAPE[shape]}
        )
        spans.append((m.start(), m.end()))
    relation = None
    if len(spans) >= 2:
        between = text[spans[0][1] : spans[1][0]]
        for word, rel in REL:
            if re.search(rf"\b{re.escape(word)}\b", between):
                relation = (0, rel, 1)
                break
    return groups, relation


def is_true(text: str, objects: list[dict], margin: float) -> bool:
    groups, relation = read_caption(text)
    for g in groups:
        members = [o for o in objects if o["color"] == g["color"] and o["shape"] == g["shape"]]
        if len(members) != g["n"] or (g["size"] and any(o["size"] != g["size"] for o in members)):
            return False
    if relation is None:
        return True
    a, rel, b = relation
    left = [o for o in objects if (o["color"], o["shape"]) == (groups[a]["color"], groups[a]["shape"])]
    right = [o for o in objects if (o["color"], o["shape"]) == (groups[b]["color"], groups[b]["shape"])]
    gap = {
        "left": lambda p, q: q["x"] - p["x"],
        "right": lambda p, q: p["x"] - q["x"],
        "above": lambda p, q: q["y"] - p["y"],
        "below": lambda p, q: p["y"] - q["y"],
    }[rel]
    return all(gap(p, q) > margin for p in left for q in right)


# -- tests -------------------------------------------------------------------------------------
def test_byte_identical_for_a_seed_whatever_the_workers_and_seeds_differ(scenes_root, tmp_path):
    one = build_scenes(tmp_path / "one", workers=1, **TINY)
    other_seed = build_scenes(tmp_path / "seed1", workers=2, seed=1, **TINY)
    for split in ("train", "val", "test_compositional"):
        names = sorted(p.name for p in (scenes_root / split).glob("*.tar"))
        assert names == sorted(p.name for p in (one / split).glob("*.tar")) and len(names) >= 2
        for name in names:
            assert (scenes_root / split / name).read_bytes() == (one / split / name).read_bytes()
            assert (scenes_root / split / name).read_bytes() != (other_seed / split / name).read_bytes()
    assert json.loads((scenes_root / "train" / "sizes.json").read_text()) == {
        f"train-{k:04d}.tar": 10 for k in range(4)
    }


def test_captions_are_distinct_and_describe_every_object(scenes_root):
    images_seen = set()
    for split in ("train", "val", "test_compositional"):
        for s in samples(scenes_root, split):
            meta = json.loads(s["json"])
            captions, objects = meta["captions"], meta["objects"]
            assert len(captions) == 5 and len(set(captions)) == 5
            assert s["txt"].decode() == captions[0]
            pairs = {(o["color"], o["shape"]) for o in objects}
            for c in captions:
                groups, _ = read_caption(c)
                assert {(g["color"], g["shape"]) for g in groups} == pairs, (c, objects)
                assert is_true(c, objects, margin=0.0), (c, objects)
            assert 1 <= len(objects) <= 4
            labels = meta["labels"]
            assert labels["count"] == len(objects) - 1 == int(s["cls"])
            assert (labels["color"] >= 0) == (labels["shape"] >= 0) == (len(objects) == 1)
            img = Image.open(io.BytesIO(s["jpg"]))
            assert img.format == "JPEG" and 64 <= img.size[0] <= 96
            images_seen.add(s["jpg"])
    assert len(images_seen) == 80


def test_every_negative_is_false_for_its_scene_and_unlike_its_captions(scenes_root):
    kinds_seen = set()
    for split in ("train", "val", "test_compositional"):
        for s in samples(scenes_root, split):
            meta = json.loads(s["json"])
            objects, negatives, kinds = meta["objects"], meta["negatives"], meta["negative_kinds"]
            assert len(negatives) == len(kinds) == len(set(kinds))
            for text, kind in zip(negatives, kinds):
                assert text not in meta["captions"]
                # False even when near-ties count as true (the margin the other way).
                assert not is_true(text, objects, margin=-0.06), (kind, text, objects)
            distinct = {(o["color"], o["shape"]) for o in objects}
            if len(objects) == 1:
                assert not {"replace_rel", "swap_obj", "swap_att"} & set(kinds)
            assert {"replace_obj", "replace_att", "add_obj"} <= set(kinds)
            if len({c for c, _ in distinct}) >= 2 and "swap_att" in kinds:
                # Colours bound to the wrong shapes, or (same shapes) the relation now wrong.
                groups, relation = read_caption(negatives[kinds.index("swap_att")])
                assert {(g["color"], g["shape"]) for g in groups} != distinct or relation is not None
            kinds_seen |= set(kinds)
    assert kinds_seen == {
        "replace_obj",
        "replace_att",
        "replace_rel",
        "swap_obj",
        "swap_att",
        "add_obj",
        "add_att",
    }


def test_compositional_split_holds_exactly_the_heldout_pairs(scenes_root):
    heldout = {tuple(p) for p in json.loads((scenes_root / "heldout_pairs.json").read_text())}
    assert 0.1 < len(heldout) / 120 < 0.2
    for split in ("train", "val"):
        for s in samples(scenes_root, split):
            meta = json.loads(s["json"])
            assert not {(o["color"], o["shape"]) for o in meta["objects"]} & heldout
            named = {
                (g["color"], g["shape"])
                for t in meta["captions"] + meta["negatives"]
                for g in read_caption(t)[0]
            }
            assert not named & heldout  # not even a negative names a held-out pair
    for s in samples(scenes_root, "test_compositional"):
        assert {(o["color"], o["shape"]) for o in json.loads(s["json"])["objects"]} & heldout


def test_task_files_match_the_digits_format(scenes_root):
    assert (scenes_root / "classnames.txt").read_text().split("\n")[:4] == ["one", "two", "three", "four"]
    for task, n in (("color", 12), ("shape", 10), ("count", 4)):
        assert len((scenes_root / "tasks" / task / "classnames.txt").read_text().splitlines()) == n
        templates = (scenes_root / "tasks" / task / "templates.txt").read_text().splitlines()
        assert templates and all(t.count("{}") == 1 for t in templates)
    assert (scenes_root / "templates.txt").read_text() == (
        scenes_root / "tasks" / "count" / "templates.txt"
    ).read_text()


def test_rerun_skips_finished_shards_and_rewrites_missing_ones(tmp_path):
    root = build_scenes(tmp_path / "s", workers=1, **TINY)
    shards = sorted(root.glob("*/*.tar"))
    before = {p: p.stat().st_mtime_ns for p in shards}
    lost = shards[1].read_bytes()
    shards[1].unlink()
    build_scenes(root, workers=2, **TINY)
    assert shards[1].read_bytes() == lost
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != shards[1])
    assert not list(root.glob("*/*.tmp"))
    with pytest.raises(ValueError, match="built with"):
        build_scenes(root, workers=1, **(TINY | {"train": 50}))


def test_shards_read_back_through_the_project_stream(scenes_root):
    """As data=scenes reads them: training draws one of each scene's five json captions, validation
    embeds all five (the first as ``text``)."""
    urls = sorted(str(p) for p in (scenes_root / "val").glob("*.tar"))
    meta = [json.loads(s["json"]) for s in samples(scenes_root, "val")]
    every = [c for m in meta for c in m["captions"]]
    negatives = {n for m in meta for n in m["negatives"]}
    for train in (True, False):
        texts = []
        preprocess = {
            "image": lambda img: torch.tensor(img.size, dtype=torch.float32),
            "text": lambda t, seen=texts: (seen.append(t), torch.tensor([len(t)]))[1],
        }
        stream = ShardStream(
            [Source("scenes", urls, modalities=["image", "text", "cls"])],
            preprocess,
            batch_size=5,
            train=train,
            caption_field="captions",
            caption_keys=["json"],
            **({"batches_per_worker": 4} if train else {}),
        )
        batches = list(stream)
        assert sum(len(b["cls"]) for b in batches) == 20
        shown = [t for t in texts if t]
        if train:  # one caption per scene
            assert len(shown) == 20 and set(shown) <= set(every)
        else:  # all five of every scene, and its negatives for the compositional probe
            assert sorted(t for t in shown if t not in negatives) == sorted(every)
            assert negatives <= set(shown)


@pytest.mark.slow
def test_train_on_scenes_through_the_console_script(scenes_root, tmp_path):
    from tests.integration.test_launch import run_cli

    run = tmp_path / "run"
    run_cli(
        [
            "train",
            "experiment=scenes_clip",
            "debug=fast",
            f"data.root={scenes_root}",
            f"hydra.run.dir={run}",
            "export_at_end=false",
            "data.batch_size=8",
            "callbacks.plots=null",
        ],
        cwd=tmp_path / "elsewhere",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped_samples"] == 0 and metrics["train/loss"] > 0
    assert "val/zeroshot_top1/image_text" in metrics


def test_cli_builds_with_split_sizes(tmp_path):
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [
        sys.executable,
        "-m",
        "mmpretrain.cli",
        "data",
        "scenes",
        f"out={tmp_path}/s",
        "train=12",
        "val=6",
        "test=6",
        "workers=1",
        "image_size_min=48",
        "image_size_max=48",
        f"hydra.run.dir={tmp_path}/h",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "s" / "train" / "sizes.json").read_text()) == {"train-0000.tar": 12}
    assert Image.open(io.BytesIO(samples(tmp_path / "s", "val")[0]["jpg"])).size == (48, 48)
