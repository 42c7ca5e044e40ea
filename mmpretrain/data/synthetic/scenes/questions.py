"""Questions with answers about a scene (CLEVR-style families), balanced so the image is needed.

A question is a :class:`Candidate` found true of a scene's objects (never a string first): its
type (``color shape size count exist relation compare``), its family (the finer kind the answers
are balanced within: "how many objects" and "how many red objects" have different answer sets), the
answer from the family's closed vocabulary and the colour-shape pairs it is about. Every candidate
of every scene of a split is enumerated, then :func:`balance` keeps the same number of questions for
each answer of a family (the count of its rarest answer in that split), so the answer marginal of a
family is uniform and a model reading only the question is at chance within the family (measured
by ``task.inputs=question_only``, README "Visual question answering").

Splits: train/val never name a held-out colour-shape pair; ``test_compositional`` keeps only the
questions about one (a held-out pair is the object asked about, its referent, counted or named).

Semantics: a referent ("the star", "the small red object", "the leftmost object") names exactly one
object; a relation answer ("what shape is left of the red star?") is the one object clearly there
(by more than the captions' margin, on the dominant axis) while every other object is clearly not
(even counting near-ties); counts are exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mmpretrain.data.synthetic.scenes.grammar import (
    COLOR_WORDS,
    COLORS,
    MARGIN,
    RELATION_WORDS,
    RELATIONS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    Obj,
    _article,
    _dominant,
    rel_holds,
)

QUESTION_TYPES = ("color", "shape", "size", "count", "exist", "relation", "compare")
ANSWER_TYPES = {  # VQA v2's answer types
    "color": "other",
    "shape": "other",
    "size": "other",
    "count": "number",
    "exist": "yes/no",
    "relation": "other",
    "compare": "yes/no",
}
YES_NO = ["yes", "no"]
#: family -> (question type, closed answer vocabulary)
FAMILIES: dict[str, tuple[str, list[str]]] = {
    "color_by_shape": ("color", list(COLORS)),
    "color_by_position": ("color", list(COLORS)),
    "shape_by_color": ("shape", SHAPES),
    "shape_by_position": ("shape", SHAPES),
    "size": ("size", SIZES),
    "count_all": ("count", ["1", "2", "3", "4"]),
    "count_color": ("count", ["0", "1", "2", "3"]),
    "count_shape": ("count", ["0", "1", "2", "3"]),
    "exist": ("exist", YES_NO),
    "relation": ("relation", SHAPES),
    "compare_more": ("compare", YES_NO),
    "compare_equal": ("compare", YES_NO),
}

FRAMES = {
    "color_by_shape": ["what colour is the {R}?", "what color is the {R}?", "which colour is the {R}?"],
    "color_by_position": ["what colour is the {R}?", "what color is the {R}?", "the {R} is which colour?"],
    "shape_by_color": ["what shape is the {R}?", "what kind of shape is the {R}?", "which shape is the {R}?"],
    "shape_by_position": [
        "what shape is the {R}?",
        "what kind of shape is the {R}?",
        "the {R} is which shape?",
    ],
    "size": ["what size is the {R}?", "how big is the {R}?", "is the {R} small, medium or large?"],
    "count_all": [
        "how many objects are there?",
        "how many shapes are in the picture?",
        "what is the number of things in the image?",
    ],
    "count_color": [
        "how many {X} are there?",
        "how many {X} are in the picture?",
        "what is the number of {X}?",
    ],
    "count_shape": [
        "how many {X} are there?",
        "how many {X} are in the picture?",
        "what is the number of {X}?",
    ],
    "exist": ["is there {P}?", "are there any {Ps}?", "does the picture contain {P}?"],
    "relation": ["what shape is {L} the {R}?", "what is {L} the {R}?", "which shape is {L} the {R}?"],
    "compare_more": ["are there more {X} than {Y}?", "is the number of {X} greater than the number of {Y}?"],
    "compare_equal": ["are there as many {X} as {Y}?", "is the number of {X} the same as the number of {Y}?"],
}
POSITIONS = {  # extreme -> (words, axis, sign: +1 the smallest coordinate)
    "left": (["leftmost object", "object furthest to the left", "object on the far left"], "x", 1),
    "right": (["rightmost object", "object furthest to the right", "object on the far right"], "x", -1),
    "top": (["topmost object", "highest object", "object at the top"], "y", 1),
    "bottom": (["bottommost object", "lowest object", "object at the bottom"], "y", -1),
}
THING = ["object", "shape", "thing"]


@dataclass(frozen=True)
class Candidate:
    family: str
    answer: str
    spec: tuple  # what is said, realised by :func:`realise`: ("shape", s) / ("color", c) / ...
    pairs: frozenset  # the (colour, shape) pairs the question is about

    @property
    def type(self) -> str:
        return FAMILIES[self.family][0]


# -- what can be asked of a scene ---------------------------------------------------------------
def _pair(o: Obj) -> tuple[str, str]:
    return (o.color, o.shape)


def _referents(objects: list[Obj], by: str) -> list[tuple[tuple, Obj]]:
    """(referent spec, object) for each object named uniquely by its ``by`` attribute (shape or
    colour), or by its size and that attribute when the attribute alone is shared."""
    out = []
    for o in objects:
        same = [p for p in objects if getattr(p, by) == getattr(o, by)]
        if len(same) == 1:
            out.append(((by, getattr(o, by), None), o))
        elif sum(p.size == o.size for p in same) == 1:
            out.append(((by, getattr(o, by), o.size), o))
    return out


def _extremes(objects: list[Obj]) -> list[tuple[tuple, Obj]]:
    """("position", extreme) for each extreme one object holds clearly (by more than MARGIN)."""
    if len(objects) < 2:
        return []
    out = []
    for name, (_, axis, sign) in POSITIONS.items():
        ranked = sorted(objects, key=lambda o: sign * getattr(o, axis))
        if sign * (getattr(ranked[1], axis) - getattr(ranked[0], axis)) > MARGIN:
            out.append((("position", name), ranked[0]))
    return out


def candidates(objects: list[Obj]) -> list[Candidate]:
    """Every question of every family that is true of ``objects``, with its answer."""
    out: list[Candidate] = []
    colors = {o.color for o in objects}
    shapes = {o.shape for o in objects}
    present = {_pair(o) for o in objects}
    for spec, o in _referents(objects, "shape"):
        out.append(Candidate("color_by_shape", o.color, spec, frozenset({_pair(o)})))
    for spec, o in _referents(objects, "color"):
        out.append(Candidate("shape_by_color", o.shape, spec, frozenset({_pair(o)})))
    for spec, o in _extremes(objects):
        out.append(Candidate("color_by_position", o.color, spec, frozenset({_pair(o)})))
        out.append(Candidate("shape_by_position", o.shape, spec, frozenset({_pair(o)})))
    unique_pairs = [o for o in objects if sum(_pair(p) == _pair(o) for p in objects) == 1]
    for o in unique_pairs:
        out.append(Candidate("size", o.size, ("pair", o.color, o.shape), frozenset({_pair(o)})))
    out.append(Candidate("count_all", str(len(objects)), ("all",), frozenset(present)))
    for c in COLORS:
        group = frozenset(_pair(o) for o in objects if o.color == c)
        n = sum(o.color == c for o in objects)
        if str(n) in FAMILIES["count_color"][1]:
            out.append(Candidate("count_color", str(n), ("color", c), group))
    for s in SHAPES:
        group = frozenset(_pair(o) for o in objects if o.shape == s)
        n = sum(o.shape == s for o in objects)
        if str(n) in FAMILIES["count_shape"][1]:
            out.append(Candidate("count_shape", str(n), ("shape", s), group))
    # exist: every present pair (yes) and every near miss, a present colour or shape (no)
    for c, s in sorted(present):
        out.append(Candidate("exist", "yes", ("pair", c, s), frozenset({(c, s)})))
    for c in COLORS:
        for s in SHAPES:
            if (c, s) not in present and (c in colors or s in shapes):
                out.append(Candidate("exist", "no", ("pair", c, s), frozenset({(c, s)})))
    for a in unique_pairs:
        for rel in RELATIONS:
            there = [
                o for o in objects if o is not a and rel_holds(o, rel, a, MARGIN) and _dominant(o, a, rel)
            ]
            near = [o for o in objects if o is not a and rel_holds(o, rel, a, -MARGIN)]
            if len(there) == 1 and len(near) == 1:
                b = there[0]
                out.append(
                    Candidate(
                        "relation", b.shape, ("rel", rel, a.color, a.shape), frozenset({_pair(a), _pair(b)})
                    )
                )
    for attr, values in (("color", list(COLORS)), ("shape", SHAPES)):
        count = {v: sum(getattr(o, attr) == v for o in objects) for v in values}
        for x in values:
            for y in values:
                if x == y or not (count[x] or count[y]):
                    continue
                about = frozenset(_pair(o) for o in objects if getattr(o, attr) in (x, y))
                more = "yes" if count[x] > count[y] else "no"
                equal = "yes" if count[x] == count[y] else "no"
                out.append(Candidate("compare_more", more, (attr, x, y), about))
                out.append(Candidate("compare_equal", equal, (attr, x, y), about))
    return out


def allowed(c: Candidate, split: str, heldout: frozenset) -> bool:
    """test_compositional: about a held-out pair; train/val: never naming one (only exist names an
    absent pair; every other pair a question names is in the scene, so never held out there)."""
    if split == "test_compositional":
        return bool(c.pairs & heldout)
    return not (c.pairs & heldout)


def scene_candidates(
    objects: list[Obj], split: str, heldout: frozenset, rng: random.Random
) -> list[Candidate]:
    """The allowed candidates of one scene, at most one per (family, answer), chosen by ``rng``."""
    by: dict[tuple[str, str], list[Candidate]] = {}
    for c in candidates(objects):
        if allowed(c, split, heldout):
            by.setdefault((c.family, c.answer), []).append(c)
    return [rng.choice(cs) for _, cs in sorted(by.items(), key=lambda kv: kv[0])]


def balance(per_scene: list[list[Candidate]], rng: random.Random) -> tuple[list[list[Candidate]], dict]:
    """Keep, per family, the same number of questions for each answer it has in the split (the
    count of its rarest); which ones is drawn by ``rng``. Returns the kept candidates per scene (in
    family order) and ``{family: {"per_answer": n, "answers": k, "dropped": m}}``."""
    pools: dict[str, dict[str, list[int]]] = {f: {} for f in FAMILIES}
    for i, cands in enumerate(per_scene):
        for j, c in enumerate(cands):
            pools[c.family].setdefault(c.answer, []).append(i * 1000 + j)  # < 1000 candidates per scene
    keep: set[int] = set()
    report = {}
    for family, answers in pools.items():
        if not answers:
            continue
        quota = min(len(v) for v in answers.values())
        for answer in sorted(answers):
            keep.update(rng.sample(answers[answer], quota))
        total = sum(len(v) for v in answers.values())
        report[family] = {
            "per_answer": quota,
            "answers": len(answers),
            "dropped": total - quota * len(answers),
        }
    kept = [[c for j, c in enumerate(cands) if i * 1000 + j in keep] for i, cands in enumerate(per_scene)]
    order = list(FAMILIES)
    return [sorted(cs, key=lambda c: order.index(c.family)) for cs in kept], report


# -- words ---------------------------------------------------------------------------------------
def _word(table: dict, key: str, rng: random.Random) -> str:
    return rng.choice(table[key])


def _shape(s: str, rng: random.Random, plural: bool = False) -> str:
    return rng.choice(SHAPE_WORDS[s])[1 if plural else 0]


def _referent(spec: tuple, rng: random.Random) -> str:
    kind = spec[0]
    if kind == "position":
        return rng.choice(POSITIONS[spec[1]][0])
    if kind == "pair":
        return f"{_word(COLOR_WORDS, spec[1], rng)} {_shape(spec[2], rng)}"
    _, value, size = spec
    size_word = _word(SIZE_WORDS, size, rng) + " " if size else ""
    if kind == "shape":
        return size_word + _shape(value, rng)
    return f"{size_word}{_word(COLOR_WORDS, value, rng)} {rng.choice(THING)}"


def _group(attr: str, value: str, rng: random.Random) -> str:
    """Plural words for every object with ``attr`` = ``value``: "red objects", "stars"."""
    if attr == "color":
        return f"{_word(COLOR_WORDS, value, rng)} {rng.choice(THING)}s"
    return _shape(value, rng, plural=True)


def realise(c: Candidate, rng: random.Random) -> str:
    frame = rng.choice(FRAMES[c.family])
    spec = c.spec
    if c.family in ("count_color", "count_shape"):
        return frame.format(X=_group(spec[0], spec[1], rng))
    if c.family in ("compare_more", "compare_equal"):
        return frame.format(X=_group(spec[0], spec[1], rng), Y=_group(spec[0], spec[2], rng))
    if c.family == "exist":
        color = _word(COLOR_WORDS, spec[1], rng)
        singular, plural = rng.choice(SHAPE_WORDS[spec[2]])
        return frame.format(P=_article(f"{color} {singular}"), Ps=f"{color} {plural}")
    if c.family == "relation":
        _, rel, color, shape = spec
        return frame.format(L=rng.choice(RELATION_WORDS[rel]), R=_referent(("pair", color, shape), rng))
    if c.family == "count_all":
        return frame
    return frame.format(R=_referent(spec, rng))


def qa_record(c: Candidate, rng: random.Random) -> dict:
    """One entry of a sample's json ``qa`` list."""
    return {
        "question": realise(c, rng),
        "answers": [c.answer],
        "question_type": c.type,
        "answer_type": ANSWER_TYPES[c.type],
        "family": c.family,
    }
