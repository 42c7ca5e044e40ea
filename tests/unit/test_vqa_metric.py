"""VQA accuracy on cases computed by hand from the official evaluation's rules (vqaEval.py of the VQA
API): leave-one-out min(#matches / 3, 1), normalisation only when the annotators disagree,
punctuation, number words, articles and contractions; exact match with one answer."""

import pytest

from mmpretrain.evaluation.vqa import normalize_answer, question_accuracy, soft_scores, vqa_accuracy


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        # k of 10 answers match: the k subsets leaving a match out see k-1, the others k
        (0, 0.0),
        (1, (9 * 1 / 3) / 10),  # 0.3
        (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # 0.6
        (3, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_leave_one_out_over_ten_answers(matching, expected):
    answers = ["yes"] * matching + ["no"] * (10 - matching)
    assert question_accuracy("yes", answers) == pytest.approx(expected)


def test_normalisation_only_when_the_annotators_disagree():
    # all ten agree on "2": nothing is normalised, so "two" does not match (the official behaviour)
    assert question_accuracy("two", ["2"] * 10) == 0.0
    assert question_accuracy("2", ["2"] * 10) == 1.0
    assert question_accuracy(" 2\n", ["2"] * 10) == 1.0  # whitespace is always cleaned
    # they disagree: every answer and the prediction are normalised, "Two" and "two" are "2"
    answers = ["two", "Two", "2", "3"] + ["three"] * 6
    assert question_accuracy("2", answers) == pytest.approx(0.9)  # 3 of 10 match -> 0.9
    assert question_accuracy("three", answers) == 1.0


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("the dog", "dog"),
        ("A Dog", "dog"),
        ("dog.", "dog"),  # a period not followed by a digit goes
        ("3.5", "3.5"),  # one followed by a digit stays
        ("x-ray", "x ray"),  # a mark between letters becomes a space
        ("yes !", "yes"),  # one beside a space is removed
        ("1,000", "1000"),  # a digit,digit comma removes every mark of the answer
        ("none", "0"),
        ("ten", "10"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("hot\tdog", "hot dog"),
        ("(red)", "red"),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_one_answer_is_exact_match_after_normalisation():
    assert question_accuracy("Yes", ["yes"]) == 1.0
    assert question_accuracy("the red", ["red"]) == 1.0
    assert question_accuracy("no", ["yes"]) == 0.0
    with pytest.raises(ValueError, match="at least one answer"):
        question_accuracy("yes", [])


def test_overall_per_question_type_and_per_answer_type():
    preds = ["yes", "2", "red", "blue"]
    answers = [["yes"] * 10, ["2"] * 3 + ["3"] * 7, ["red"], ["green"]]
    out = vqa_accuracy(
        preds, answers, ["exist", "count", "color", "color"], ["yes/no", "number", "other", "other"]
    )
    assert out["overall"] == pytest.approx((1 + 0.9 + 1 + 0) / 4)
    assert out["question_type/color"] == pytest.approx(0.5)
    assert out["question_type/count"] == pytest.approx(0.9)
    assert out["answer_type/yes/no"] == 1.0 and out["answer_type/other"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="3 predictions for 4"):
        vqa_accuracy(preds[:3], answers)


def test_soft_scores_are_the_accuracy_each_answer_would_score():
    answers = ["cat"] * 6 + ["Cats"] * 2 + ["a dog", "dog"]
    scores = soft_scores(answers)
    assert scores == pytest.approx({"cat": 1.0, "cats": 0.6, "dog": 0.6})
