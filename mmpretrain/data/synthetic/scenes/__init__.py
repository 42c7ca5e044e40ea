"""``mmpretrain data scenes out=DIR``: procedurally drawn scenes of 1-4 coloured shapes, five captions
each, SugarCrepe-style hard negatives, and a compositional test split.

Layout of ``DIR`` (README, "The scenes data")::

    train/train-0000.tar ...                 ~1000 samples a shard, sizes.json beside them
    val/val-0000.tar ...
    test_compositional/test_compositional-0000.tar ...   scenes with a colour-shape pair never in train/val
    heldout_pairs.json                       those pairs: [[colour, shape], ...]
    questions.json                           per split and question family: questions kept per answer
    classnames.txt, templates.txt            the count task (the one task defined for every scene)
    tasks/{color,shape,count}/{classnames,templates}.txt
    scenes.json                              the options the shards were built with

A sample: ``jpg``; ``txt`` (the first caption); ``cls`` (the count label); ``json`` with
``captions`` (5), ``negatives`` and ``negative_kinds`` (one per SugarCrepe kind that applies),
``labels`` ({color, shape, count}; -1 where a task does not apply: colour and shape only for
one-object scenes), ``objects`` ([{shape, color, size, x, y}], centres as fractions of the side) and
``qa``: questions with their answers (:mod:`~mmpretrain.data.synthetic.scenes.questions`), each
``{question, answers: [one], question_type, answer_type, family}``, answers balanced per family and
split over the whole split (so the plan of a split is computed before its shards are written).

Scene ``i`` of a split is drawn from its own seed, ``derive(seed, "scene", split, i)``, so the
shards are byte-identical for a seed whatever the number of workers, and a rerun (after an
interruption) writes only the shards not there yet. The questions come from streams of their own
(``derive(seed, "scene_questions", ...)``), so a scene's image and captions are those of a build without
them. A root built before the questions (its ``scenes.json`` has no ``questions``) is refused with a
message, as the moving digits' older roots are.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmpretrain.data.convert.writing import (
    claim_build,
    finish_build,
    parallel_map,
    plan_shards,
    splits_built,
    write_shard,
    write_text_atomic,
)
from mmpretrain.data.stream.seeds import derive
from mmpretrain.data.synthetic.scenes import grammar, questions
from mmpretrain.data.synthetic.scenes.grammar import COLORS, COUNTS, SHAPES, SIZES, Obj
from mmpretrain.data.synthetic.scenes.render import layout, render

SPLITS = {"train": 0, "val": 1, "test_compositional": 2}  # name -> the split's key in each scene's seed

# Colour-shape pairs never drawn in train or val: two colours per shape, 20 of the 120 (17 %), each
# colour held out with at most two shapes, so every colour and shape is still seen in train.
HELDOUT_PAIRS = frozenset(
    (list(COLORS)[(5 * s + k) % len(COLORS)], shape) for s, shape in enumerate(SHAPES) for k in (0, 7)
)

TASKS = {
    "color": (
        list(COLORS),
        [
            "a picture of a {} shape.",
            "a {} object on a background.",
            "something {}.",
            "a drawing of a {} thing.",
        ],
    ),
    "shape": (SHAPES, ["a picture of a {}.", "a {} on a background.", "a drawing of a {}.", "one {}."]),
    "count": (
        COUNTS,
        [
            "a picture of {} shapes.",
            "{} objects on a background.",
            "the number of shapes is {}.",
            "a drawing with {} things in it.",
        ],
    ),
}
TOP_TASK = "count"  # classnames.txt / templates.txt at the root and ``cls``: defined for every scene


def scene_objects(split: str, rng: random.Random) -> list[Obj]:
    """1-4 objects; train/val avoid the held-out pairs, test_compositional has at least one."""
    allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]
    n = rng.randint(1, 4)
    while True:
        pairs: list[tuple[str, str]] = []
        if split == "test_compositional":
            pairs.append(rng.choice(sorted(HELDOUT_PAIRS)))
        while len(pairs) < n:
            # Repeats make "two red circles"; test scenes may add any pair, held out or not.
            pool = allowed if split != "test_compositional" else [(c, s) for c in COLORS for s in SHAPES]
            pairs.append(rng.choice(pairs) if pairs and rng.random() < 0.3 else rng.choice(pool))
        rng.shuffle(pairs)
        objects = layout([(s, c, rng.choice(SIZES)) for c, s in pairs], rng)
        if objects is not None:
            return objects


QUESTIONS_VERSION = 1  # recorded in scenes.json; a root without it predates the questions


def _scene_rng(seed: int, split: str, index: int) -> tuple[random.Random, np.random.Generator]:
    s = derive(seed, "scene", SPLITS[split], index)
    return random.Random(s), np.random.default_rng(s)


def _candidates(task: tuple[int, str, int, int]) -> list[list[questions.Candidate]]:
    """The allowed question candidates of scenes [start, stop) of a split (one list per scene)."""
    seed, split, start, stop = task
    out = []
    for i in range(start, stop):
        objects = scene_objects(
            split, _scene_rng(seed, split, i)[0]
        )  # the scene's first draws, as make_scene
        qrng = random.Random(derive(seed, "scene_questions", 0, SPLITS[split], i))
        out.append(questions.scene_candidates(objects, split, HELDOUT_PAIRS, qrng))
    return out


def plan_questions(
    seed: int, split: str, count: int, chunk: int, workers: int | None
) -> tuple[list[list[dict]], dict]:
    """Every scene's ``qa`` list for ``split`` (answers balanced per family over the split) and the
    balance report ``{family: {per_answer, answers, dropped}}``."""
    tasks = [(seed, split, a, min(a + chunk, count)) for a in range(0, count, chunk)]
    found = parallel_map(_candidates, tasks, workers, label=f"questions {split}", progress=False)
    kept, report = questions.balance(
        [c for part in found for c in part], random.Random(derive(seed, "scene_questions", 2, SPLITS[split]))
    )
    records = []
    for i, cands in enumerate(kept):
        wrng = random.Random(derive(seed, "scene_questions", 1, SPLITS[split], i))
        records.append([questions.qa_record(c, wrng) for c in cands])
    return records, report


def make_scene(
    seed: int, split: str, index: int, size_min: int, size_max: int, qa: list[dict] | None = None
) -> dict[str, Any]:
    """One sample of ``split``: the image, captions, negatives, labels and questions of scene ``index``."""
    rng, nrng = _scene_rng(seed, split, index)
    objects = scene_objects(split, rng)
    captions = grammar.true_captions(objects, rng)
    forbidden = frozenset() if split == "test_compositional" else HELDOUT_PAIRS
    negatives = grammar.negatives(objects, captions, rng, forbidden)
    one = len(objects) == 1
    labels = {
        "color": list(COLORS).index(objects[0].color) if one else -1,
        "shape": SHAPES.index(objects[0].shape) if one else -1,
        "count": len(objects) - 1,
    }
    meta = {
        "captions": [grammar.realise(c) for c in captions],
        "negatives": [t for _, t in negatives],
        "negative_kinds": [k for k, _ in negatives],
        "labels": labels,
        "objects": [
            {"shape": o.shape, "color": o.color, "size": o.size, "x": o.x, "y": o.y} for o in objects
        ],
        "qa": qa or [],
    }
    jpg = render(objects, rng.randint(size_min, size_max), rng, nrng, quality=rng.randint(70, 95))
    return {
        "__key__": f"{split}_{index:06d}",
        "jpg": jpg,
        "txt": meta["captions"][0].encode(),
        "cls": str(labels[TOP_TASK]).encode(),
        "json": json.dumps(meta).encode(),
    }


def _write(task: tuple) -> int:
    path, split, start, stop, seed, size_min, size_max, qa = task
    return write_shard(
        Path(path),
        (make_scene(seed, split, i, size_min, size_max, qa[i - start]) for i in range(start, stop)),
    )


def build_scenes(
    out: str | Path,
    seed: int = 0,
    train: int = 50_000,
    val: int = 2_000,
    test: int = 2_000,
    workers: int | None = None,
    image_size_min: int = 96,
    image_size_max: int = 160,
    shard_size: int = 1000,
    **_: Any,
) -> Path:
    """Write the splits' shards (in parallel, skipping shards already there), then the task files."""
    out = Path(out)
    options = {
        "seed": seed,
        "train": train,
        "val": val,
        "test": test,
        "image_size_min": image_size_min,
        "image_size_max": image_size_max,
        "shard_size": shard_size,
        "questions": QUESTIONS_VERSION,
    }
    record = out / "scenes.json"
    if record.exists() and "questions" not in json.loads(record.read_text()):
        raise ValueError(
            f"{out} holds scenes built before the questions (its scenes.json has no 'questions'), which "
            "task=vqa and this version's shards need: choose another out= (or delete it) to build them anew"
        )
    claim_build(out, "scenes.json", options, "scenes")
    counts = {"train": train, "val": val, "test_compositional": test}
    pending, sizes = plan_shards(out, counts, shard_size)
    started = time.perf_counter()
    plans, reports = {}, {}
    for split in counts if pending else ():  # a split's balance is over all of it, so all are planned
        plans[split], reports[split] = plan_questions(seed, split, counts[split], shard_size, workers)
    parallel_map(
        _write,
        [(*t, seed, image_size_min, image_size_max, plans[t[1]][t[2] : t[3]]) for t in pending],
        workers,
        label="scenes",
        total=sum(t[3] - t[2] for t in pending),
        weight=int,
    )
    write_text_atomic(
        out / "heldout_pairs.json", json.dumps(sorted([c, s] for c, s in HELDOUT_PAIRS), indent=1)
    )
    if reports:
        write_text_atomic(out / "questions.json", json.dumps(_question_summary(plans, reports), indent=1))
    finish_build(out, sizes, TASKS, TOP_TASK, pending, started, "scenes")
    return out


def _question_summary(plans: dict[str, list[list[dict]]], reports: dict[str, dict]) -> dict:
    """Per split: questions, per type the answer counts and the largest answer's share (a blind
    model's best accuracy from the answer marginal alone), and the balance per family."""
    out = {}
    for split, plan in plans.items():
        by_type: dict[str, dict[str, int]] = {}
        for qa in (q for scene in plan for q in scene):
            counts = by_type.setdefault(qa["question_type"], {})
            counts[qa["answers"][0]] = counts.get(qa["answers"][0], 0) + 1
        out[split] = {
            "questions": sum(len(scene) for scene in plan),
            "types": {
                t: {"answers": c, "majority_share": round(max(c.values()) / sum(c.values()), 4)}
                for t, c in sorted(by_type.items())
            },
            "families": reports[split],
        }
    return out


def is_built(root: str | Path) -> bool:
    """The splits are there, and built with questions (a root from before them has a ``scenes.json``
    without ``questions``): an older root is rebuilt on first use, which refuses with a message to
    choose another ``out=`` or delete it."""
    if not splits_built(root, SPLITS):
        return False
    record = Path(root) / "scenes.json"
    return not record.exists() or json.loads(record.read_text()).get("questions") == QUESTIONS_VERSION
