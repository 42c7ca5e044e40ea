"""Retrieval, class retrieval and zero-shot against brute-force references, ties counted against the model.

A collapsed model (every embedding equal) or a diverged one (NaN embeddings) must score no better
than chance; tie-free random embeddings must score exactly what the plain definitions give.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.evaluation import class_retrieval_metrics, retrieval_metrics, zero_shot_accuracy
from mmpretrain.evaluation.retrieval import _ranks

N, C, D = 23, 5, 8


def cosine(q, g):
    """Pure Python, so equal vectors give exactly equal similarities (no BLAS blocking)."""

    def unit(v):
        norm = max(math.sqrt(sum(x * x for x in v)), 1e-12)
        return [x / norm for x in v]

    qs, gs = [unit(v) for v in q.double().tolist()], [unit(v) for v in g.double().tolist()]
    return [[sum(x * y for x, y in zip(u, v)) for v in gs] for u in qs]


def beats(s, true):
    """Pessimistic: another item beats the true one unless it scores strictly lower (NaN beats)."""
    return math.isnan(s) or math.isnan(true) or s >= true


def reference_ranks(q, g):
    sims = cosine(q, g)
    return [1 + sum(beats(s, row[i]) for j, s in enumerate(row) if j != i) for i, row in enumerate(sims)]


def reference_zero_shot(q, labels, classes, k):
    hits = []
    for row, y in zip(cosine(q, classes), labels.tolist()):
        ahead = sum(beats(s, row[y]) for c, s in enumerate(row) if c != y)
        hits.append(ahead < k and math.isfinite(row[y]))
    return sum(hits) / len(hits)


def reference_class_retrieval(q, g, ql, gl, k):
    """(R@k, mAP): gallery sorted by similarity, irrelevant items first among ties, NaN worst for a
    relevant one."""
    r_at_k, aps = [], []
    for row, y in zip(cosine(q, g), ql.tolist()):
        rel = [int(lbl == y) for lbl in gl.tolist()]
        key = [(-math.inf if r else math.inf) if math.isnan(s) else s for s, r in zip(row, rel)]
        order = sorted(range(len(row)), key=lambda j: (-key[j], rel[j]))
        ranked = [rel[j] for j in order]
        r_at_k.append(float(any(ranked[:k])))
        hits, ap = 0, 0.0
        for pos, r in enumerate(ranked, 1):
            hits += r
            ap += r * hits / pos
        aps.append(ap / max(sum(ranked), 1))
    return sum(r_at_k) / len(r_at_k), sum(aps) / len(aps)


def random_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    labels = torch.randint(0, C, (N,), generator=g)
    return a, b, labels, torch.randn(C, D, generator=g)


def test_random_embeddings_score_the_plain_definitions():
    a, b, labels, classes = random_problem()
    ranks = reference_ranks(a, b)
    # No ties among random similarities: the pessimistic rank is the usual 1 + #(scores above).
    sims = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    assert ranks == ((sims > sims.diagonal()[:, None]).sum(1) + 1).tolist()
    assert _ranks(a, b).tolist() == ranks
    assert _ranks(a, b, chunk=4).tolist() == ranks  # row chunks change nothing
    got = retrieval_metrics(a, b, "a", "b")
    for k in (1, 5, 10):
        assert got[f"R@{k}/a_to_b"] == pytest.approx(sum(r <= k for r in ranks) / N)
        assert got[f"R@{k}/b_to_a"] == pytest.approx(sum(r <= k for r in reference_ranks(b, a)) / N)
    assert got["mean_rank/a_to_b"] == pytest.approx(sum(ranks) / N)

    for k in (1, 2, 5):
        top = zero_shot_accuracy(a, labels, classes, topk=(k,))[f"top{k}"]
        assert top == pytest.approx(reference_zero_shot(a, labels, classes, k))
        logits = F.normalize(a, dim=-1) @ F.normalize(classes, dim=-1).T
        argsort_top = logits.argsort(1, descending=True)[:, :k].eq(labels[:, None]).any(1).float().mean()
        assert top == pytest.approx(argsort_top.item())  # what argsort gave before, absent ties

    got = class_retrieval_metrics(a, b, labels, labels, "a", "b")
    got_chunked = class_retrieval_metrics(a, b, labels, labels, "a", "b", chunk=5)
    assert got == pytest.approx(got_chunked)
    for k in (1, 5, 10):
        r_at_k, mean_ap = reference_class_retrieval(a, b, labels, labels, k)
        assert got[f"class_R@{k}/a_to_b"] == pytest.approx(r_at_k)
        assert got["class_mAP/a_to_b"] == pytest.approx(mean_ap)
    assert got["class_R@1/b_to_a"] == pytest.approx(reference_class_retrieval(b, a, labels, labels, 1)[0])


@pytest.mark.parametrize("broken", ["constant", "zeros", "nan"])
def test_collapsed_or_diverged_embeddings_score_no_better_than_chance(broken):
    a, b, labels, classes = random_problem(1)
    fill = {"constant": torch.ones(N, D), "zeros": torch.zeros(N, D), "nan": torch.full((N, D), math.nan)}[
        broken
    ]
    a = b = fill

    got = retrieval_metrics(a, b, "a", "b")
    assert got["R@1/a_to_b"] <= 1 / N + 1e-6 and got["R@1/b_to_a"] <= 1 / N + 1e-6
    assert got["median_rank/a_to_b"] == N  # every other item ties with (or, NaN, beats) the true one
    assert _ranks(a, b).tolist() == reference_ranks(a, b)

    assert zero_shot_accuracy(a, labels, classes)["top1"] <= 1 / C
    # Also when the class embeddings collapse (top-5 of 5 classes is still a miss for NaN).
    queries, collapsed = (
        torch.randn(N, D),
        torch.ones(C, D) if broken != "nan" else torch.full((C, D), math.nan),
    )
    for k in (1, 5):
        top = zero_shot_accuracy(queries, labels, collapsed, topk=(k,))[f"top{k}"]
        assert top == pytest.approx(reference_zero_shot(queries, labels, collapsed, k))
    assert zero_shot_accuracy(queries, labels, collapsed)["top1"] <= 1 / C

    got = class_retrieval_metrics(a, b, labels, labels, "a", "b")
    for k in (1, 5):
        r_at_k, mean_ap = reference_class_retrieval(a, b, labels, labels, k)
        assert got[f"class_R@{k}/a_to_b"] == pytest.approx(r_at_k)
        assert got["class_mAP/a_to_b"] == pytest.approx(mean_ap)
    assert got["class_R@1/a_to_b"] == 0.0  # irrelevant items always tie with (or beat) the relevant ones


def test_one_nan_query_gets_the_worst_rank_and_misses():
    a, b, labels, classes = random_problem(2)
    a[3] = math.nan
    ranks = _ranks(a, b)
    assert ranks[3] == N and ranks.tolist() == reference_ranks(a, b)
    assert _ranks(b, a).tolist() == reference_ranks(b, a)  # a NaN gallery item beats every query's match
    hits = [
        zero_shot_accuracy(a[i : i + 1], labels[i : i + 1], classes, topk=(C,))[f"top{C}"] for i in range(N)
    ]
    assert hits[3] == 0.0 and sum(hits) == N - 1
    got = class_retrieval_metrics(a, b, labels, labels, "a", "b")
    assert got["class_mAP/a_to_b"] == pytest.approx(reference_class_retrieval(a, b, labels, labels, 1)[1])


def test_exact_ties_count_against_the_model():
    # Two identical captions: neither image can tell which is its own, so neither ranks first.
    img = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert _ranks(img, txt).tolist() == [2, 2, 1]
    # A query scoring two classes equally is a top-1 miss and a top-2 hit.
    assert zero_shot_accuracy(torch.tensor([[1.0, 1.0]]), torch.tensor([0]), torch.eye(2), topk=(1, 2)) == {
        "top1": 0.0,
        "top2": 1.0,
    }
    # Class retrieval: the relevant item tied with an irrelevant one is ranked second.
    got = class_retrieval_metrics(
        torch.tensor([[1.0, 0.0]]), txt[:2], torch.tensor([1]), torch.tensor([0, 1]), "q", "g", ks=(1, 2)
    )
    assert (
        got["class_R@1/q_to_g"] == 0.0 and got["class_R@2/q_to_g"] == 1.0 and got["class_mAP/q_to_g"] == 0.5
    )


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_chunked_split_free_metrics_keep_every_tie_and_nan_rule(chunk):
    """Signed one-hot embeddings: similarities are exactly -1, 0 or 1, so ties are everywhere; a
    NaN query, a NaN gallery item, a class absent from the gallery, galleries of another size."""
    g = torch.Generator().manual_seed(5)

    def signed_one_hot(n):
        x = torch.zeros(n, D).scatter_(1, torch.randint(0, D, (n, 1), generator=g), 1.0)
        return x * (torch.randint(0, 2, (n, 1), generator=g) * 2 - 1)

    a, b = signed_one_hot(N), signed_one_hot(N)
    a[4], b[7] = math.nan, math.nan
    la, lb = (
        torch.randint(0, C + 1, (N,), generator=g),
        torch.randint(0, C, (N,), generator=g),
    )  # class C: no match
    got = retrieval_metrics(a, b, "a", "b", a_labels=la, b_labels=lb, chunk=chunk)
    for k in (1, 5, 10):
        assert got[f"R@{k}/a_to_b"] == pytest.approx(sum(r <= k for r in reference_ranks(a, b)) / N)
        r_at_k, mean_ap = reference_class_retrieval(a, b, la, lb, k)
        assert got[f"class_R@{k}/a_to_b"] == pytest.approx(r_at_k, abs=1e-6)
        assert got["class_mAP/a_to_b"] == pytest.approx(mean_ap, abs=1e-6)
        assert got[f"class_R@{k}/b_to_a"] == pytest.approx(
            reference_class_retrieval(b, a, lb, la, k)[0], abs=1e-6
        )
    assert got["class_mAP/b_to_a"] == pytest.approx(reference_class_retrieval(b, a, lb, la, 1)[1], abs=1e-6)
    assert got == class_retrieval_metrics(a, b, la, lb, "a", "b", chunk=chunk) | {
        k: v for k, v in got.items() if "class" not in k
    }
    few = class_retrieval_metrics(a[:5], b, la[:5], lb, "q", "g", chunk=chunk)  # 5 queries, 23 gallery items
    assert few["class_mAP/q_to_g"] == pytest.approx(
        reference_class_retrieval(a[:5], b, la[:5], lb, 1)[1], abs=1e-6
    )


def test_class_prototypes_leave_out_labels_without_a_class_name():
    """A val label >= the number of class names (a classnames.txt shorter than the labels) crashed the
    prototype zero-shot (index_add_; a device assert on CUDA); it is a miss, as in the text path."""
    from mmpretrain.evaluation.zeroshot import class_prototypes

    emb = torch.eye(4)
    labels = torch.tensor([0, 1, 2, 5])
    protos = class_prototypes(emb, labels, num_classes=3)
    assert torch.allclose(protos, torch.eye(4)[:3])
    acc = zero_shot_accuracy(emb, labels, protos, topk=(1,))
    assert acc["top1"] == pytest.approx(0.75)
