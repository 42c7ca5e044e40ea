"""Tables with one row per caption (COCO, Flickr: 5 rows per image): `mmpretrain data shards` makes one
sample per image holding all its captions, so validation scores the papers' protocol (an image is
never its own distractor) and training draws one caption per pass."""

from __future__ import annotations

import json
import re

import torch

from mmpretrain.data import ShardStream, Source, expand_shards
from mmpretrain.data.convert.convert import convert
from mmpretrain.data.stream.decode import decode_captions
from mmpretrain.evaluation.retrieval import rows_multi_caption_retrieval
from tests.unit.test_convert import _run, png, samples_of, write_table

IMAGES, PER_IMAGE = 200, 5


def coco_table(tmp, images=IMAGES, columns=("filepath", "title"), name="coco.csv"):
    """``images`` PNGs, each named by 5 rows in turn (COCO's captions file, flattened as users hold it)."""
    (tmp / "img").mkdir(exist_ok=True)
    for i in range(images):
        (tmp / "img" / f"{i}.png").write_bytes(png(i))
    img, cap = columns
    rows = [
        {img: f"img/{i}.png", cap: f"image {i} caption {c}"} for c in range(PER_IMAGE) for i in range(images)
    ]
    return write_table(tmp / name, rows)


# a "perfect model": an image embeds as the one-hot of its identity (its colour), a caption as the
# one-hot of the image it names
COLOUR = {(i * 17 % 256, i * 5 % 256): i for i in range(IMAGES)}  # png(i)'s colour
PREPROCESS = {
    "image": lambda img: torch.tensor(COLOUR[img.getpixel((0, 0))[:2]]),
    "text": lambda t: torch.tensor([int(x) for x in re.findall(r"\d+", t)]),  # [image, caption]
}


def one_hot(ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(ids, IMAGES).float()


def val_batches(out):
    stream = ShardStream(
        [Source("val", expand_shards(f"{out}/val/*.tar"))], PREPROCESS, batch_size=4, train=False
    )
    return list(iter(stream))


def test_a_coco_table_validates_one_sample_per_image_and_a_perfect_model_scores_1(tmp_path):
    out = convert(tmp_path / "out", coco_table(tmp_path), progress=False)  # default options
    batches = val_batches(out)
    ids = torch.cat([b["image"] for b in batches])
    assert len(ids) >= 2 and len(set(ids.tolist())) == len(ids)  # one sample per image
    first = torch.cat([b["text"] for b in batches])
    more = torch.cat([b["text_more"] for b in batches])
    offsets = torch.tensor([0] + [len(b["image"]) for b in batches]).cumsum(0)
    owner = torch.cat([b["text_more_owner"] + offsets[j] for j, b in enumerate(batches)])
    assert first.tolist() == [[i, 0] for i in ids.tolist()]  # `text`: the first caption
    assert sorted(more.tolist()) == sorted([i, c] for i in ids.tolist() for c in range(1, PER_IMAGE))
    assert (more[:, 0] == ids[owner]).all()  # each other caption with its image

    every = torch.ones(len(ids), dtype=torch.bool)
    scores = rows_multi_caption_retrieval(
        one_hot(ids), one_hot(first[:, 0]), one_hot(more[:, 0]), owner, every, "image", "text"
    )
    assert scores["R@1/image_to_text"] == scores["R@1/text_to_image"] == 1.0
    # the same model on the layout of one sample per row: each image is there 5 times, and its copies
    # tie with it (ties count against the model), so it scores 0
    pairs = torch.cat([first, more])
    rows = rows_multi_caption_retrieval(
        one_hot(pairs[:, 0]),
        one_hot(pairs[:, 0]),
        torch.zeros(0, IMAGES),
        torch.zeros(0, dtype=torch.long),
        torch.ones(len(pairs), dtype=torch.bool),
        "image",
        "text",
    )
    assert rows["R@1/image_to_text"] == rows["R@1/text_to_image"] == 0.0


def test_the_train_split_draws_one_of_the_captions_per_pass(tmp_path):
    out = convert(tmp_path / "out", coco_table(tmp_path, images=16), val_fraction=0.0, progress=False)
    stream = ShardStream(
        [Source("train", expand_shards(f"{out}/train/*.tar"))],
        PREPROCESS,
        batch_size=16,
        train=True,
        batches_per_worker=6,
        shuffle_buffer=1,
    )
    drawn = torch.cat([b["text"] for b in stream])  # 6 passes of the 16 images
    assert len(drawn) == 96 and len({tuple(t) for t in drawn.tolist()}) > 16
    assert all(0 <= c < PER_IMAGE for _, c in drawn.tolist())


def test_each_sample_holds_its_captions_in_table_order_on_one_side_of_the_split(tmp_path):
    coco_table(tmp_path, images=10)
    rows = [
        {"filepath": f"img/{i}.png", "title": f"image {i} caption {c}"} for i in range(10) for c in range(3)
    ]
    rows[4]["filepath"] = "./img/1.png"  # the same file, named otherwise
    rows[7]["title"] = "  "  # an empty caption is left out
    out = convert(
        tmp_path / "out", write_table(tmp_path / "t.csv", rows), val_fraction=0.3, workers=1, progress=False
    )
    samples = samples_of(out, "train") + samples_of(out, "val")
    assert len(samples) == 10 and samples_of(out, "val")
    got = {s["txt"].decode(): json.loads(s["json"])["caption"] if "json" in s else None for s in samples}
    assert got["image 1 caption 0"] == ["image 1 caption 0", "image 1 caption 1", "image 1 caption 2"]
    assert got["image 2 caption 0"] == ["image 2 caption 0", "image 2 caption 2"]
    assert all(s["png"] == png(int(s["txt"].split()[1])) for s in samples)


def test_one_caption_keeps_a_plain_txt_and_rows_with_conflicting_labels_are_skipped(tmp_path):
    coco_table(tmp_path, images=4)
    rows = [
        {"filepath": "img/0.png", "title": "a cat", "label": "cat"},
        {"filepath": "img/1.png", "title": "a dog", "label": "dog"},
        {"filepath": "img/1.png", "title": "the same dog", "label": "dog"},
        {"filepath": "img/2.png", "title": "a cat or an emu", "label": "cat"},
        {"filepath": "img/2.png", "title": "an emu or a cat", "label": "emu"},
        {"filepath": "img/3.png", "title": "a cat again", "label": "cat"},
        {"filepath": "img/3.png", "title": "no label here", "label": ""},
    ]
    out = convert(
        tmp_path / "out",
        write_table(tmp_path / "t.csv", rows),
        label_key="label",
        val_fraction=0.0,
        workers=1,
        progress=False,
    )
    got = {s["txt"].decode(): s for s in samples_of(out, "train")}
    assert set(got) == {"a cat", "a dog", "a cat again"}
    assert "json" not in got["a cat"]  # one caption: as before
    assert int(got["a dog"]["cls"]) == 1 and int(got["a cat again"]["cls"]) == 0
    [skip] = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skip["source"] == "img/2.png" and skip["reason"] == "conflicting labels"
    assert "['cat', 'emu']" in skip["detail"]
    assert (out / "classnames.txt").read_text() == "cat\ndog\n"  # emu labels no sample


def test_captions_default_to_a_json_caption_list_else_the_first_of_txt_json():
    listed = {"txt": b"one", "json": json.dumps({"caption": ["one", "two"], "url": "u"}).encode()}
    assert decode_captions(listed) == ["one", "two"]
    assert decode_captions(listed, ["txt"]) == ["one"]  # explicit keys read as before
    assert decode_captions(listed, ["json"]) == ["one", "two"]
    img2dataset = {"txt": b"one", "json": json.dumps({"caption": "one from json"}).encode()}
    assert decode_captions(img2dataset) == ["one"]
    assert decode_captions({"json": img2dataset["json"]}) == ["one from json"]
    assert decode_captions({"txt": b"one", "json": b"{not json"}) == ["one"]  # the txt does not need it
    other_field = {"txt": b"t", "json": json.dumps({"captions": ["x", "y"]}).encode()}
    assert decode_captions(other_field) == ["t"]
    assert decode_captions(other_field, None, "captions") == ["x", "y"]


def test_a_coco_table_through_the_console_script(tmp_path):
    table = coco_table(tmp_path, images=40, columns=("image", "caption"))
    out = tmp_path / "out"
    args = ["data", "shards", f"in={table}", f"out={out}", "img_key=image", "caption_key=caption"]
    proc = _run([*args, f"hydra.run.dir={tmp_path / 'd'}"], tmp_path / "img")
    samples = samples_of(out, "train") + samples_of(out, "val")
    assert len(samples) == 40
    for s in samples:
        i = int(s["txt"].split()[1])
        assert s["txt"].decode() == f"image {i} caption 0"
        assert json.loads(s["json"]) == {"caption": [f"image {i} caption {c}" for c in range(PER_IMAGE)]}
    counts = re.findall(r"^\W*(train|val)\W+(\d+)\W+(\d+)", proc.stdout, re.MULTILINE)  # split, rows, samples
    assert len(counts) == 2 and all(int(rows) == PER_IMAGE * int(n) for _, rows, n in counts)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*.tar")}
    _run([*args, f"hydra.run.dir={tmp_path / 'd2'}"], tmp_path / "img")  # a rerun keeps every shard
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.tar")} == before
