"""The scenes' questions: answers true of the scene (checked by a reader of the words of its own),
answers balanced per family and split, test_compositional asking about the held-out pairs, the
images and captions untouched by the questions, and older roots refused."""

import json
import re

import pytest

from mmpretrain.data.synthetic.scenes import HELDOUT_PAIRS, build_scenes, make_scene
from mmpretrain.data.synthetic.scenes.grammar import COLOR_WORDS, RELATION_WORDS, SHAPE_WORDS, SIZE_WORDS
from mmpretrain.data.synthetic.scenes.questions import FAMILIES
from tests.unit.test_scenes import samples

SMALL = {"train": 300, "val": 100, "test": 100, "shard_size": 100, "image_size_min": 48, "image_size_max": 64}

COLOR = {w: k for k, ws in COLOR_WORDS.items() for w in ws}
SIZE = {w: k for k, ws in SIZE_WORDS.items() for w in ws}
SINGULAR = {p[0]: k for k, pairs in SHAPE_WORDS.items() for p in pairs}
PLURAL = {p[1]: k for k, pairs in SHAPE_WORDS.items() for p in pairs}
REL = {w: k for k, ws in RELATION_WORDS.items() for w in ws}


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_scenes(tmp_path_factory.mktemp("scenes") / "s", workers=2, **SMALL)


def _qas(root, split):
    for s in samples(root, split):
        meta = json.loads(s["json"])
        for qa in meta["qa"]:
            yield meta["objects"], qa


def _expected(objects, qa):
    """The answer the words of the question ask for, read from the objects (None: not checked here)."""
    q, family = qa["question"], qa["family"]
    pair = re.search(rf"\b({_alt(COLOR)}) ({_alt(SINGULAR)})\b", q)
    if family == "count_all":
        return str(len(objects))
    if family == "count_color":
        (c,) = re.search(rf"\b({_alt(COLOR)}) (?:objects|shapes|things)\b", q).groups()
        return str(sum(o["color"] == COLOR[c] for o in objects))
    if family == "count_shape":
        (s,) = re.search(rf"\b({_alt(PLURAL)})\b", q).groups()
        return str(sum(o["shape"] == PLURAL[s] for o in objects))
    if family == "exist":
        m = pair or re.search(rf"\b({_alt(COLOR)}) ({_alt(PLURAL)})\b", q)
        c, s = m.groups()
        shape = SINGULAR.get(s) or PLURAL[s]
        return "yes" if any((o["color"], o["shape"]) == (COLOR[c], shape) for o in objects) else "no"
    if family == "size":
        c, s = pair.groups()
        (o,) = [o for o in objects if (o["color"], o["shape"]) == (COLOR[c], SINGULAR[s])]
        return o["size"]
    if family == "color_by_shape" and not re.search(rf"\b({_alt(SIZE)})\b", q):
        (s,) = re.search(rf"the ({_alt(SINGULAR)})\?", q).groups()
        (o,) = [o for o in objects if o["shape"] == SINGULAR[s]]
        return o["color"]
    if family == "relation":
        r = re.search(rf"\b({_alt(REL)}) the ({_alt(COLOR)}) ({_alt(SINGULAR)})\?", q)
        rel, c, s = r.groups()
        (a,) = [o for o in objects if (o["color"], o["shape"]) == (COLOR[c], SINGULAR[s])]
        d = {
            "left": lambda o: a["x"] - o["x"],
            "right": lambda o: o["x"] - a["x"],
            "above": lambda o: a["y"] - o["y"],
            "below": lambda o: o["y"] - a["y"],
        }[REL[rel]]
        (b,) = [o for o in objects if o is not a and d(o) > 0]
        return b["shape"]
    return None


def test_answers_are_what_the_words_ask_of_the_scene(root):
    checked = {}
    for split in ("train", "val", "test_compositional"):
        for objects, qa in _qas(root, split):
            assert qa["answers"] and qa["question"].endswith("?")
            assert qa["answers"][0] in FAMILIES[qa["family"]][1]
            want = _expected(objects, qa)
            if want is not None:
                assert qa["answers"] == [want], (qa, objects)
                checked[qa["family"]] = checked.get(qa["family"], 0) + 1
    assert set(checked) >= {"count_all", "count_color", "count_shape", "exist", "size", "relation"}
    assert min(checked.values()) >= 10


def test_answers_are_balanced_per_family_and_split_and_recorded(root):
    summary = json.loads((root / "questions.json").read_text())
    for split in ("train", "val", "test_compositional"):
        per_family = {}
        for _, qa in _qas(root, split):
            counts = per_family.setdefault(qa["family"], {})
            counts[qa["answers"][0]] = counts.get(qa["answers"][0], 0) + 1
        assert set(per_family) == set(FAMILIES)
        for family, counts in per_family.items():
            assert len(set(counts.values())) == 1, (split, family, counts)  # every answer equally often
            assert summary[split]["families"][family]["per_answer"] == next(iter(counts.values()))
        assert summary[split]["questions"] == sum(sum(c.values()) for c in per_family.values())
    # the answer types of VQA v2, and every question type asked in train
    types = {qa["question_type"]: qa["answer_type"] for _, qa in _qas(root, "train")}
    assert types == {
        "color": "other",
        "shape": "other",
        "size": "other",
        "count": "number",
        "exist": "yes/no",
        "relation": "other",
        "compare": "yes/no",
    }
    assert summary["train"]["types"]["exist"]["majority_share"] == 0.5


def test_compositional_questions_ask_about_heldout_pairs_and_train_never_names_one(root):
    heldout_words = {
        f"{cw} {w}" for c, s in HELDOUT_PAIRS for cw in COLOR_WORDS[c] for p in SHAPE_WORDS[s] for w in p
    }
    for split in ("train", "val"):
        for _, qa in _qas(root, split):
            assert not any(w in qa["question"] for w in heldout_words), qa
    n = 0
    for _, qa in _qas(root, "test_compositional"):
        n += 1
        if qa["family"] == "exist":  # the pair it names is held out
            assert any(w in qa["question"] for w in heldout_words), qa
    assert n > 100


def test_questions_leave_the_images_and_captions_as_they_were():
    a = make_scene(0, "val", 7, 64, 64)
    b = make_scene(0, "val", 7, 64, 64, qa=[{"question": "q?", "answers": ["yes"]}])
    assert a["jpg"] == b["jpg"] and a["txt"] == b["txt"]
    ja, jb = json.loads(a["json"]), json.loads(b["json"])
    assert ja.pop("qa") == [] and jb.pop("qa") and ja == jb


def test_a_root_built_before_the_questions_is_refused(root, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    options = json.loads((root / "scenes.json").read_text())
    del options["questions"]
    (old / "scenes.json").write_text(json.dumps(options))
    with pytest.raises(ValueError, match="built before the questions.*choose another out="):
        build_scenes(old, workers=1, **SMALL)
