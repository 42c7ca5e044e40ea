"""The papers' multi-caption retrieval protocol against a brute-force reference, ties counted
against the model; one caption per item gives exactly the single-caption metrics."""

import math

import pytest
import torch

from mmpretrain.evaluation import multi_caption_retrieval, retrieval_metrics
from tests.unit.test_evaluation import cosine


def reference(items, captions, owner, k):
    """(item->caption R@k, caption->item R@k) by the definitions, pessimistic on ties and NaN."""
    sims = cosine(items, captions)
    owner = owner.tolist()
    i2t = []
    for i, row in enumerate(sims):
        own = [s for s, o in zip(row, owner) if o == i and not math.isnan(s)]
        best = max(own) if own else -math.inf
        ahead = sum(1 for s, o in zip(row, owner) if o != i and (math.isnan(s) or s >= best))
        i2t.append(ahead + 1 <= k)
    t2i = []
    for c, row in enumerate(zip(*sims)):
        true = row[owner[c]]
        ahead = sum(1 for j, s in enumerate(row) if j != owner[c] and (math.isnan(s) or math.isnan(true) or s >= true))
        t2i.append(ahead + 1 <= k)
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


def problem(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, d = 9, 4
    owner = torch.cat([torch.arange(n), torch.randint(0, n, (14,), generator=g)])  # 1..several captions each
    if kind == "random":
        return torch.randn(n, d, generator=g), torch.randn(len(owner), d, generator=g), owner
    # one-hot rows: similarities are exactly -1/0/1, so ties are everywhere
    eye = torch.eye(d)
    return eye[torch.randint(0, d, (n,), generator=g)], eye[torch.randint(0, d, (len(owner),), generator=g)], owner


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_multi_caption_retrieval_matches_brute_force(kind, chunk):
    items, captions, owner = problem(kind)
    got = multi_caption_retrieval(items, captions, owner, "image", "text", chunk=chunk)
    rsum = 0.0
    for k in (1, 5, 10):
        i2t, t2i = reference(items, captions, owner, k)
        assert got[f"R@{k}/image_to_text"] == pytest.approx(i2t)
        assert got[f"R@{k}/text_to_image"] == pytest.approx(t2i)
        rsum += 100 * (i2t + t2i)
    assert got["rsum/image_text"] == pytest.approx(rsum)
    assert got["mean_R@1/image_text"] == pytest.approx((got["R@1/image_to_text"] + got["R@1/text_to_image"]) / 2)


def test_nan_and_collapse_score_the_worst_rank():
    items, captions, owner = problem("random")
    collapsed = multi_caption_retrieval(torch.ones_like(items), torch.ones_like(captions), owner, "image", "text")
    assert collapsed["R@1/image_to_text"] == 0.0 and collapsed["R@1/text_to_image"] == 0.0
    broken = items.clone()
    broken[0] = float("nan")
    got = multi_caption_retrieval(broken, captions, owner, "image", "text")
    i2t, t2i = reference(broken, captions, owner, 1)
    assert got["R@1/image_to_text"] == pytest.approx(i2t) and got["R@1/text_to_image"] == pytest.approx(t2i)


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_one_caption_per_item_equals_the_single_caption_metrics(kind):
    items, captions, _ = problem(kind)
    captions = captions[: len(items)]
    got = multi_caption_retrieval(items, captions, torch.arange(len(items)), "image", "text")
    single = retrieval_metrics(items, captions, "image", "text")
    assert {k: v for k, v in got.items() if k in single} == single
