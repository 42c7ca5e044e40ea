"""Questions with answers in the shards: the json's ``qa`` list, read and checked.

A sample's json may carry ``qa``: ``[{"question": str, "answers": [str, ...], "question_type": str,
"answer_type": str}, ...]`` (types optional; ``answer`` (one string) is read as ``answers: [it]``).
Several answers are the annotators' (VQA v2 has ten): the VQA fine-tuning's target for an answer is
the VQA accuracy predicting it would score (``mmpretrain.evaluation.vqa.soft_scores``), and the
metric scores a prediction against all of them. ``mmpretrain data scenes`` writes one answer per question;
``mmpretrain data shards`` writes ``qa`` from a table's ``question``/``answer`` columns.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable
from typing import Any

UNTYPED = "all"  # the question/answer type of an entry that states none


class BadQuestionError(ValueError):
    pass


def read_qa(obj: Any) -> list[dict[str, Any]]:
    """A json's ``qa`` entries, checked and in one shape (``answers`` a non-empty list of strings)."""
    qa = obj.get("qa") if isinstance(obj, dict) else None
    if not isinstance(qa, list) or not qa:
        raise BadQuestionError("json has no 'qa' list of questions (or an empty one)")
    out = []
    for i, entry in enumerate(qa):
        if not isinstance(entry, dict) or not isinstance(entry.get("question"), str):
            raise BadQuestionError(f"qa[{i}] has no 'question' string")
        answers = entry.get("answers", [entry["answer"]] if "answer" in entry else None)
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise BadQuestionError(f"qa[{i}] ('{entry['question']}') has no 'answers' list of strings")
        out.append(
            {
                "question": entry["question"],
                "answers": answers,
                "question_type": str(entry.get("question_type") or UNTYPED),
                "answer_type": str(entry.get("answer_type") or UNTYPED),
            }
        )
    return out


def decode_qa(data: bytes) -> list[dict[str, Any]]:
    """The ``qa`` decoder of the stream (``json`` bytes -> :func:`read_qa`)."""
    return read_qa(json.loads(data))


def _json_members(url: str) -> Iterable[bytes]:
    with tarfile.open(url) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                f = tar.extractfile(member)
                if f is not None:
                    yield f.read()


def iter_qa(urls: list[str]) -> Iterable[list[dict[str, Any]] | None]:
    """Every sample's :func:`read_qa` entries over ``urls`` (only the json members are read); None for
    a sample whose json has no usable ``qa`` (the caller counts them)."""
    for url in urls:
        for data in _json_members(url):
            try:
                yield decode_qa(data)
            except ValueError:  # BadQuestionError and json's JSONDecodeError
                yield None
