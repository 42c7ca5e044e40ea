"""Validation metrics split across 2 gloo processes equal the single-process ones.

Each rank scores only its share of the queries against the (identical) gathered keys and the
per-query results are gathered: retrieval, class retrieval, zero-shot and the val loss must come
out the same as in one process, on every rank, with exact ties, NaN rows and uneven shares
(37 rows for 2 ranks; a single row, so that one rank has no query at all).
"""

import json
import math

import torch

from mmpretrain.evaluation import (
    class_retrieval_metrics,
    multi_caption_retrieval,
    retrieval_metrics,
    zero_shot_accuracy,
)
from tests.integration.gloo import gloo_group, run_workers

SIZES = (37, 1, 200)


def problem(n: int, seed: int = 0):
    """Tie-heavy embeddings (signed one-hot: similarities are exactly -1, 0 or 1), one NaN row."""
    g = torch.Generator().manual_seed(seed + n)
    a, b = (
        torch.zeros(n, 4).scatter_(
            1,
            torch.randint(0, 4, (n, 1), generator=g),
            torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1,
        )
        for _ in range(2)
    )
    if n > 3:
        a[2] = math.nan
        b[n // 2 :] += 0.1 * torch.randn(n - n // 2, 4, generator=g)  # and half of the gallery tie-free
    labels = torch.randint(0, 5, (n,), generator=g)
    return a, b, labels, torch.randn(6, 4, generator=g)


def metrics(n: int, across_ranks: bool) -> dict[str, float]:
    from mmpretrain.losses import split_clip_loss as _split_clip_loss
    from mmpretrain.losses import split_siglip_loss as _split_siglip_loss

    a, b, labels, classes = problem(n)
    out = retrieval_metrics(
        a, b, "a", "b", a_labels=labels, b_labels=labels, chunk=3, across_ranks=across_ranks
    )
    out |= {
        f"only_{k}": v
        for k, v in class_retrieval_metrics(a, b, labels, labels, "a", "b", across_ranks=across_ranks).items()
    }
    out |= zero_shot_accuracy(b, labels, classes, topk=(1, 2), chunk=5, across_ranks=across_ranks)
    owner = torch.cat([torch.arange(n), labels % n])  # extra captions: some rows have several
    captions = torch.cat([b, a.flip(0)])
    out |= {
        f"multi_{k}": v
        for k, v in multi_caption_retrieval(
            a, captions, owner, "a", "b", chunk=3, across_ranks=across_ranks
        ).items()
    }
    out["loss"] = _split_clip_loss(*loss_features(n), torch.tensor(10.0), tile=4).item()
    out["siglip_loss"] = _split_siglip_loss(
        *loss_features(n), torch.tensor(10.0), torch.tensor(-3.0), tile=4
    ).item()
    return out


def loss_features(n: int):
    unit = torch.nn.functional.normalize
    return unit(torch.randn(n, 4, generator=torch.Generator().manual_seed(n)), dim=-1), unit(
        problem(n)[1], dim=-1
    )


def worker(rank, world, port, queue):
    with gloo_group(rank, world, port):
        queue.put(json.dumps([rank, {n: metrics(n, across_ranks=True) for n in SIZES}]))


def test_split_query_metrics_equal_single_process():
    from mmpretrain.losses import clip_loss, siglip_loss

    single = {n: metrics(n, across_ranks=False) for n in SIZES}
    for n in SIZES:  # the single-process val losses are the plain (untiled) losses
        plain = clip_loss(*loss_features(n), torch.tensor(10.0), gather=False)
        assert math.isclose(single[n]["loss"], plain.item(), abs_tol=1e-5)
        plain = siglip_loss(*loss_features(n), torch.tensor(10.0), torch.tensor(-3.0), gather=False)
        assert math.isclose(single[n]["siglip_loss"], plain.item(), rel_tol=1e-5)

    results = dict(json.loads(item) for item in run_workers(worker, results=2))
    for rank, per_size in results.items():
        for n in SIZES:
            got, want = per_size[str(n)], single[n]
            assert sorted(got) == sorted(want)
            for k in want:
                assert math.isclose(got[k], want[k], abs_tol=1e-6), (rank, n, k, got[k], want[k])
