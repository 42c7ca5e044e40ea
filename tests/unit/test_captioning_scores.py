"""Caption scores against values computed by hand, every reference of a sample counted, and the
naming check of the compositional split."""

from __future__ import annotations

import math

import pytest
import torch

from mmpretrain.evaluation.captioning import (
    caption_scores,
    names_object,
    retrieval_captions,
    tokenize_caption,
)


def test_bleu_and_rouge_l_by_hand():
    """hyp "red red circle", ref "a red circle is here": unigram precision 2/3 (the second "red" is
    clipped), bigram precision 1/2, brevity penalty exp(1 - 5/3); LCS "red circle": P 2/3, R 2/5,
    ROUGE-L F with beta 1.2."""
    scores = caption_scores(["Red red circle."], [["a red circle is here"]])
    bp = math.exp(1 - 5 / 3)
    assert scores["BLEU-1"] == pytest.approx(bp * 2 / 3, rel=1e-6)
    assert scores["BLEU-2"] == pytest.approx(bp * math.sqrt(2 / 3 * 1 / 2), rel=1e-6)
    p, r, beta = 2 / 3, 2 / 5, 1.2
    assert scores["ROUGE-L"] == pytest.approx((1 + beta**2) * p * r / (r + beta**2 * p), rel=1e-6)


def test_every_reference_counts():
    """A caption equal to the third of five references is a perfect BLEU-4 and ROUGE-L; scored against
    the first reference alone it is not."""
    refs = ["a picture of two red squares", "two boxes", "one blue circle above a green box", "x y", "z"]
    all_refs = caption_scores(["one blue circle above a green box"], [refs])
    assert all_refs["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert all_refs["ROUGE-L"] == pytest.approx(1.0)
    first_only = caption_scores(["one blue circle above a green box"], [refs[:1]])
    assert first_only["BLEU-4"] < 0.01


def test_cider_d_by_hand():
    """Two samples with no n-gram in common: each n-gram's idf is log 2 in its own sample and the
    hypothesis's tf-idf vector equals its reference's, cosine 1 for n = 1..4, no length penalty: 10
    (CIDEr-D's factor) per sample. A hypothesis sharing no n-gram scores 0."""
    refs = [["a red circle is here"], ["two blue squares below"]]
    assert caption_scores(["a red circle is here", "two blue squares below"], refs)[
        "CIDEr-D"
    ] == pytest.approx(10.0)
    assert caption_scores(["green triangles", "purple box"], refs)["CIDEr-D"] == pytest.approx(0.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="predictions"):
        caption_scores(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="reference"):
        caption_scores(["a"], [[]])


def test_tokenize_and_naming():
    assert (
        tokenize_caption("A Red, half-circle!  ")
        == "a red half circle"
        == tokenize_caption("a red half - circle")
    )
    assert names_object("one five - sided shape, green", ["green"], ["five-sided shape"])
    assert names_object("A red circle.", ["red"], ["circle", "circles"])
    assert not names_object("a red square", ["red"], ["circle", "circles"])
    assert not names_object("a reddish circle", ["red"], ["circle"])  # whole words only


def test_retrieval_captions_picks_the_nearest():
    captions = ["red", "green", "blue"]
    emb = torch.eye(3)
    images = torch.tensor([[0.1, 0.0, 0.9], [0.9, 0.2, 0.0]])
    assert retrieval_captions(images, emb, captions) == ["blue", "red"]
