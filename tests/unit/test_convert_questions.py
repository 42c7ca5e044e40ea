"""`mmpretrain data shards` on a VQA table: question/answer columns become each file's json `qa`
list (every row one question, several answers split at the separator, types when given), a caption
column stays optional, and rows that cannot be questions are reported."""

import csv
import json

import webdataset as wds
from PIL import Image

from mmpretrain.data.convert.convert import convert
from mmpretrain.data.stream.questions import read_qa


def _table(tmp_path, rows, columns):
    (tmp_path / "img").mkdir(exist_ok=True)
    for r in rows:
        Image.new("RGB", (8, 8), "red").save(tmp_path / r["filepath"])
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path / "t.csv"


def _samples(out):
    urls = sorted(str(p) for split in ("train", "val") for p in (out / split).glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def test_questions_answers_and_types_per_file(tmp_path):
    def row(file, question, answer, qtype="", atype=""):
        return {
            "filepath": file,
            "question": question,
            "answer": answer,
            "question_type": qtype,
            "answer_type": atype,
        }

    rows = [
        row("img/a.jpg", "what colour?", "red|red| red |Red|", "what color", "other"),
        row("img/a.jpg", "is it red?", "yes", "is", "yes/no"),
        row("img/b.jpg", "how many?", "1"),
    ]
    table = _table(tmp_path, rows, ["filepath", "question", "answer", "question_type", "answer_type"])
    out = convert(tmp_path / "out", table, val_fraction=0.0, progress=False)
    samples = _samples(out)
    qa = {s["__key__"].split("-")[0]: json.loads(s["json"])["qa"] for s in samples.values()}
    assert qa["img_a_jpg"] == [
        {"question": "what colour?", "answers": ["red", "red", "red", "Red"], "question_type": "what color",
         "answer_type": "other"},
        {"question": "is it red?", "answers": ["yes"], "question_type": "is", "answer_type": "yes/no"},
    ]  # fmt: skip
    assert qa["img_b_jpg"] == [{"question": "how many?", "answers": ["1"]}]
    assert all("txt" not in s for s in samples.values())  # no caption column: no caption
    # what the VQA task reads: types default to "all"
    assert read_qa({"qa": qa["img_b_jpg"]})[0]["question_type"] == "all"


def test_captions_stay_and_bad_question_rows_are_reported(tmp_path):
    rows = [
        {"filepath": "img/a.jpg", "title": "a red square", "question": "what colour?", "answer": "red"},
        {"filepath": "img/a.jpg", "title": "red", "question": "", "answer": ""},
        {"filepath": "img/b.jpg", "title": "another", "question": "what is it?", "answer": ""},
        {"filepath": "img/c.jpg", "title": "third", "question": "", "answer": "red"},
    ]
    table = _table(tmp_path, rows, ["filepath", "title", "question", "answer"])
    out = convert(tmp_path / "out", table, val_fraction=0.0, progress=False)
    samples = _samples(out)
    assert len(samples) == 1
    (a,) = samples.values()
    assert a["txt"] == b"a red square"
    assert json.loads(a["json"]) == {
        "caption": ["a red square", "red"],
        "qa": [{"question": "what colour?", "answers": ["red"]}],
    }
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["reason"] for s in skipped) == ["answer without question", "question without answer"]
