"""What a scene is, what is true of it, and how it is said: objects, claims, captions, hard negatives.

A caption is built from a small structure, never from strings: :class:`Mention` s ("two small red
circles": count, colour, shape, optional size, a word-choice number) and optionally one
:class:`Relation` between two of them. :func:`holds` checks a structure against a scene's objects,
so every true caption is checked true and every hard negative (the structure with one minimal
edit, SugarCrepe's kinds) is checked false before it is written. :func:`realise` turns a structure
into words; a negative is realised with the same word choices as the caption it edits, so the two
differ only where the edit is.

Semantics (exact, so a negative is false for a reason the image shows): a mention of ``n`` objects
of colour ``c`` and shape ``s`` is true iff the scene has exactly ``n`` such objects and, if it names
a size, all of them have that size. "A left of B" is true iff every A is left of every B by more
than a margin; a negative's relation must be false even when the margin counts the other way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

SHAPES = [
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "pentagon",
    "diamond",
    "cross",
    "ring",
    "semicircle",
]
COLORS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "purple": (125, 45, 170),
    "pink": (245, 125, 185),
    "brown": (125, 75, 35),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "cyan": (35, 200, 215),
}
SIZES = ["small", "medium", "large"]
COUNTS = ["one", "two", "three", "four"]

# Paraphrases: (singular, plural) per word.
SHAPE_WORDS = {
    "circle": [("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")],
    "square": [("square", "squares"), ("box", "boxes")],
    "triangle": [("triangle", "triangles")],
    "star": [("star", "stars"), ("five-pointed star", "five-pointed stars")],
    "hexagon": [("hexagon", "hexagons"), ("six-sided shape", "six-sided shapes")],
    "pentagon": [("pentagon", "pentagons"), ("five-sided shape", "five-sided shapes")],
    "diamond": [("diamond", "diamonds"), ("rhombus", "rhombuses")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
    "ring": [("ring", "rings"), ("hollow circle", "hollow circles"), ("donut", "donuts")],
    "semicircle": [
        ("semicircle", "semicircles"),
        ("half circle", "half circles"),
        ("half disc", "half discs"),
    ],
}
COLOR_WORDS = {c: [c] for c in COLORS} | {"gray": ["gray", "grey"], "purple": ["purple", "violet"]}
SIZE_WORDS = {
    "small": ["small", "little", "tiny"],
    "medium": ["medium-sized", "medium", "mid-sized"],
    "large": ["large", "big", "huge"],
}
COUNT_WORDS = {1: ["a", "one"], 2: ["two", "a pair of"], 3: ["three"], 4: ["four"]}
RELATIONS = ["left", "right", "above", "below"]
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
RELATION_WORDS = {
    "left": ["to the left of", "left of", "on the left of"],
    "right": ["to the right of", "right of"],
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
}
MARGIN = 0.06  # a relation holds when the centres differ by more than this (a fraction of the image)

NEGATIVE_KINDS = ["replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att"]


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, a fraction of the width (0: left)
    y: float  # centre, a fraction of the height (0: top)


@dataclass(frozen=True)
class Mention:
    n: int
    color: str
    shape: str
    size: str | None
    words: int  # which paraphrases: the same number gives the same words


@dataclass(frozen=True)
class Relation:
    a: int  # mention index
    rel: str
    b: int
    inverted: bool  # said as "B <opposite> A"


@dataclass(frozen=True)
class Caption:
    mentions: tuple[Mention, ...]
    relation: Relation | None
    template: int  # which sentence frame
    expand: bool  # "a red circle, another red circle" instead of "two red circles"


# -- truth ---------------------------------------------------------------------------------------
def rel_holds(a: Obj, rel: str, b: Obj, margin: float) -> bool:
    d = {"left": b.x - a.x, "right": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[rel]
    return d > margin


def members(m: Mention, objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o.color == m.color and o.shape == m.shape]


def mention_holds(m: Mention, objects: list[Obj]) -> bool:
    group = members(m, objects)
    return len(group) == m.n and (m.size is None or all(o.size == m.size for o in group))


def holds(caption: Caption, objects: list[Obj], margin: float = MARGIN) -> bool:
    """Whether ``caption`` is true of ``objects``; a positive margin asks relations to be clear,
    a negative one (``-MARGIN``) counts near-ties as true (to call a negative false)."""
    if not all(mention_holds(m, objects) for m in caption.mentions):
        return False
    if caption.relation is None:
        return True
    r = caption.relation
    return all(
        rel_holds(a, r.rel, b, margin)
        for a in members(caption.mentions[r.a], objects)
        for b in members(caption.mentions[r.b], objects)
    )


# -- true captions -------------------------------------------------------------------------------
def groups(objects: list[Obj]) -> list[list[Obj]]:
    """Objects grouped by (colour, shape), in order of first appearance."""
    out: dict[tuple[str, str], list[Obj]] = {}
    for o in objects:
        out.setdefault((o.color, o.shape), []).append(o)
    return list(out.values())


def mention_of(group: list[Obj], rng: random.Random, with_size: float = 0.5) -> Mention:
    sizes = {o.size for o in group}
    size = group[0].size if len(sizes) == 1 and rng.random() < with_size else None
    return Mention(len(group), group[0].color, group[0].shape, size, rng.randrange(1 << 40))


def clear_relations(objects: list[Obj], gs: list[list[Obj]]) -> list[tuple[int, str, int]]:
    """(group i, relation, group j) true with the margin, along each pair's dominant axis."""
    found = []
    for i in range(len(gs)):
        for j in range(len(gs)):
            if i == j:
                continue
            for rel in RELATIONS:
                if all(rel_holds(a, rel, b, MARGIN) for a in gs[i] for b in gs[j]) and all(
                    _dominant(a, b, rel) for a in gs[i] for b in gs[j]
                ):
                    found.append((i, rel, j))
    return found


def _dominant(a: Obj, b: Obj, rel: str) -> bool:
    dx, dy = abs(a.x - b.x), abs(a.y - b.y)
    return dx > 0.8 * dy if rel in ("left", "right") else dy > 0.8 * dx


def true_captions(objects: list[Obj], rng: random.Random, k: int = 5) -> list[Caption]:
    """``k`` distinct captions, each mentioning every object, about half of them with a relation."""
    gs = groups(objects)
    rels = clear_relations(objects, gs)
    out: list[Caption] = []
    seen: set[str] = set()
    for _ in range(20 * k):
        if len(out) == k:
            break
        order = list(range(len(gs)))
        rng.shuffle(order)
        mentions = [mention_of(gs[i], rng) for i in order]
        relation = None
        if rels and rng.random() < 0.6:
            gi, rel, gj = rng.choice(rels)
            relation = Relation(order.index(gi), rel, order.index(gj), rng.random() < 0.4)
        expand = len(objects) > len(gs) and rng.random() < 0.25
        caption = Caption(tuple(mentions), relation, rng.randrange(1 << 40), expand)
        text = realise(caption)
        if text not in seen and holds(caption, objects):
            seen.add(text)
            out.append(caption)
    return out


# -- words ---------------------------------------------------------------------------------------
LIST_FRAMES = [
    "{L}",
    "a picture with {L}",
    "an image showing {L}",
    "there {be} {L}",
    "{L} on a background",
    "a drawing of {L}",
    "{L} in the picture",
    "a scene containing {L}",
]
REL_FRAMES = [
    "{A} {R} {B}",
    "{A} {be} {R} {B}",
    "a picture of {A} {R} {B}",
    "an image where {A} {be} {R} {B}",
]
REST_FRAMES = ["{S}, and {L}", "{S}, with {L}", "{S}. there {be} also {L}", "{S}; also {L}"]


def phrase(m: Mention, expand: bool = False) -> list[str]:
    """The words for ``m``: one phrase, or ``n`` ("a red circle", "another red circle") when expanded."""
    # Each choice from its own bits of ``words``, whatever the mention says: an edited mention
    # (another colour, an added size) keeps every other word of the caption it came from.
    c, s, z, n = _fields(m.words, 4)
    color = COLOR_WORDS[m.color][c % len(COLOR_WORDS[m.color])]
    singular, plural = SHAPE_WORDS[m.shape][s % len(SHAPE_WORDS[m.shape])]
    size = SIZE_WORDS[m.size][z % 3] + " " if m.size else ""
    count = COUNT_WORDS[m.n][n % len(COUNT_WORDS[m.n])]
    if expand and m.n > 1:
        one = f"{size}{color} {singular}"
        return [_article(one)] + [f"another {one}"] * (m.n - 1)
    body = f"{size}{color} {singular if m.n == 1 else plural}"
    return [_article(body) if count == "a" else f"{count} {body}"]


def _fields(number: int, k: int) -> list[int]:
    """``k`` independent-enough small ints out of one random number (10 bits each)."""
    return [(number >> (10 * i)) & 1023 for i in range(k)]


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def realise(c: Caption) -> str:
    frame, rel_word, rest_frame = _fields(c.template, 3)
    if c.relation is None:
        parts = [p for m in c.mentions for p in phrase(m, c.expand)]
        return LIST_FRAMES[frame % len(LIST_FRAMES)].format(L=join(parts), be=_be(c.mentions[0]))
    rel = c.relation
    a, b, word = c.mentions[rel.a], c.mentions[rel.b], rel.rel
    if rel.inverted:
        a, b, word = b, a, OPPOSITE[word]
    words = RELATION_WORDS[word]
    sentence = REL_FRAMES[frame % len(REL_FRAMES)].format(
        A=join(phrase(a, c.expand)), B=join(phrase(b, c.expand)), be=_be(a), R=words[rel_word % len(words)]
    )
    rest = [m for i, m in enumerate(c.mentions) if i not in (rel.a, rel.b)]
    if not rest:
        return sentence
    parts = [p for m in rest for p in phrase(m, c.expand)]
    return REST_FRAMES[rest_frame % len(REST_FRAMES)].format(S=sentence, L=join(parts), be=_be(rest[0]))


def _be(m: Mention) -> str:
    return "is" if m.n == 1 else "are"


# -- hard negatives ------------------------------------------------------------------------------
def negatives(
    objects: list[Obj],
    captions: list[Caption],
    rng: random.Random,
    forbidden: frozenset[tuple[str, str]] = frozenset(),
) -> list[tuple[str, str]]:
    """(kind, text): at most one negative per kind, each a true caption with one minimal edit, false
    for ``objects`` (even counting near-ties as true) and unlike every true caption. Kinds that cannot
    apply to the scene are left out; ``forbidden`` (colour, shape) pairs are never named."""
    true_texts = {realise(c) for c in captions}
    with_rel = [c for c in captions if c.relation is not None]
    mentions = captions[0].mentions
    applies = {
        "replace_rel": bool(with_rel),
        "swap_obj": len({m.shape for m in mentions}) > 1,
        "swap_att": len({m.color for m in mentions}) > 1,
    }
    out = []
    for kind in NEGATIVE_KINDS:
        for _ in range(30 if applies.get(kind, True) else 0):
            base = rng.choice(
                with_rel if kind in ("replace_rel", "swap_obj", "swap_att") and with_rel else captions
            )
            edited = EDITS[kind](base, rng, objects)
            if edited is None:
                continue
            text = realise(edited)
            named = {(m.color, m.shape) for m in edited.mentions}
            if text not in true_texts and not holds(edited, objects, -MARGIN) and not (named & forbidden):
                out.append((kind, text))
                break
    return out


def _with(c: Caption, i: int, m: Mention) -> Caption:
    ms = list(c.mentions)
    ms[i] = m
    return replace(c, mentions=tuple(ms))


def _replace_obj(c: Caption, rng: random.Random, objects: list[Obj]) -> Caption | None:
    i = rng.randrange(len(c.mentions))
    m = c.mentions[i]
    return _with(c, i, replace(m, shape=rng.choice([s for s in SHAPES if s != m.shape])))


def _replace_att(c: Caption, rng: random.Random, objects: list[Obj]) -> Caption | None:
    i = rng.randrange(len(c.mentions))
    m = c.mentions[i]
    if m.size is not None and rng.random() < 0.3:
        return _with(c, i, replace(m, size=rng.choice([s for s in SIZES if s != m.size])))
    return _with(c, i, replace(m, color=rng.choice([k for k in COLORS if k != m.color])))


def _replace_rel(c: Caption, rng: random.Random, objects: list[Obj]) -> Caption | None:
    if c.relation is None:
        return None
    return replace(c, relation=replace(c.relation, rel=OPPOSITE[c.relation.rel]))


def _swap_pair(c: Caption, rng: random.Random, field: str) -> Caption | None:
    if c.relation is not None:
        i, j = c.relation.a, c.relation.b
    elif len(c.mentions) >= 2:
        i, j = rng.sample(range(len(c.mentions)), 2)
    else:
        return None
    mi, mj = c.mentions[i], c.mentions[j]
    if getattr(mi, field) == getattr(mj, field):
        return None
    return _with(
        _with(c, i, replace(mi, **{field: getattr(mj, field)})), j, replace(mj, **{field: getattr(mi, field)})
    )


def _swap_obj(c: Caption, rng: random.Random, objects: list[Obj]) -> Caption | None:
    return _swap_pair(c, rng, "shape")


def _swap_att(c: Caption, rng: random.Random, objects: list[Obj]) -> Caption | None:
    return _swap_pair(c, rng, "color")


def _add_obj(c: Caption, rng: random.Random, objects: list[Obj]) -> Caption | None:
    present = {(o.color, o.shape) for o in objects}
    color, shape = rng.choice([(k, s) for k in COLORS for s in SHAPES if (k, s) not in present])
    return replace(c, mentions=(*c.mentions, Mention(1, color, shape, None, rng.randrange(1 << 40))))


def _add_att(c: Caption, rng: random.Random, objects: list[Obj]) -> Caption | None:
    i = rng.randrange(len(c.mentions))
    m = c.mentions[i]
    sizes = {o.size for o in members(m, objects)}
    wrong = [s for s in SIZES if s not in sizes]
    if m.size is not None or not wrong:
        return None
    return _with(c, i, replace(m, size=rng.choice(wrong)))


EDITS = {
    "replace_obj": _replace_obj,
    "replace_att": _replace_att,
    "replace_rel": _replace_rel,
    "swap_obj": _swap_obj,
    "swap_att": _swap_att,
    "add_obj": _add_obj,
    "add_att": _add_att,
}
