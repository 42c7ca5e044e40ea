"""VQA accuracy as the official VQA evaluation (``vqaEval.py`` of the VQA API) computes it.

Per question with answers ``gts`` (strings) and a predicted answer ``pred``:

- answers and prediction: newlines and tabs to spaces, stripped;
- when the answers disagree (more than one distinct string), every answer and the prediction are
  normalised (:func:`normalize_answer`: punctuation, then number words to digits, articles
  dropped, contractions restored); when they all agree, none is (the official rule);
- with two or more answers: for each answer, ``min(#other answers equal to pred / 3, 1)``, averaged
  over the leave-one-out subsets (10 answers: the mean over the 10 subsets of 9);
- with one answer: exact match after normalisation (the leave-one-out rule would give 0 whatever
  the prediction).

:func:`vqa_accuracy` reports it overall, per question type and per answer type, as fractions in
[0, 1] (the official tool prints percentages rounded to 2 places).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The official tables: number words, articles, the punctuation it strips, contractions it restores.
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# "(?!<=\d)" is the official pattern as written (a lookahead, not the lookbehind it looks like): a
# period is stripped unless a digit follows it.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
CONTRACTIONS = {
    w.replace("'", ""): w
    for w in (
        "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's "
        "how'd how'll how's I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't "
        "not've o'clock oughtn't shan't shouldn't should've that's there'd there're there's they'd "
        "they'll they're they've wasn't we've weren't what'll what're what's what've when's where'd "
        "where's where've who'd who'll who's who've why'll why're why's won't wouldn't would've y'all "
        "you'd you'll you're you've"
    ).split()
} | {
    # the official table's forms with two apostrophes, each spelt without one or without both
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "twas": "'twas",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "let's": "let's",
}


def _punctuation(text: str) -> str:
    out = text
    strip = _COMMA_NUMBER.search(text) is not None
    for p in PUNCTUATION:
        # a mark next to a space (or any "1,000"-style number in the answer) goes; else it becomes a space
        out = out.replace(p, "" if strip or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=32)  # the official call passes re.UNICODE (32) as the count


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The official normalisation: punctuation, then number words, articles and contractions."""
    return _digits_articles(_punctuation(_clean(text)))


def question_accuracy(pred: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of ``pred`` for one question whose annotators gave ``answers``."""
    if not answers:
        raise ValueError("a question needs at least one answer to be scored")
    gts = [_clean(a) for a in answers]
    pred = _clean(pred)
    if len(gts) == 1:
        return float(normalize_answer(pred) == normalize_answer(gts[0]))
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    matches = [a == pred for a in gts]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


def soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """``{normalised answer: the accuracy predicting it would score}`` (VQA v2's soft targets)."""
    return {a: question_accuracy(a, answers) for a in dict.fromkeys(normalize_answer(x) for x in answers)}


def vqa_accuracy(
    preds: Sequence[str],
    answers: Sequence[Sequence[str]],
    question_types: Sequence[str] | None = None,
    answer_types: Sequence[str] | None = None,
) -> dict[str, float]:
    """``{"overall": a, "question_type/<t>": a_t, "answer_type/<t>": a_t}``: the mean per-question
    accuracy over all questions and over each type's."""
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions for {len(answers)} questions")
    if not preds:
        raise ValueError("no questions to score")
    scores = [question_accuracy(p, a) for p, a in zip(preds, answers)]
    out = {"overall": sum(scores) / len(scores)}
    for prefix, types in (("question_type", question_types), ("answer_type", answer_types)):
        if types is None:
            continue
        groups: dict[str, list[float]] = {}
        for t, s in zip(types, scores):
            groups.setdefault(str(t), []).append(s)
        out |= {f"{prefix}/{t}": sum(v) / len(v) for t, v in sorted(groups.items())}
    return out
