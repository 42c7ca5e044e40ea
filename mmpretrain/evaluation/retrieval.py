"""Cross-modal retrieval over paired embeddings (row i of ``a`` pairs with row i of ``b``).

Ranks are pessimistic: a gallery item that ties with the true match counts as ranked above it,
and a NaN similarity beats everything. A collapsed model (all embeddings equal) or a diverged one
(NaN embeddings) therefore scores the worst rank, not a perfect R@1.

Memory is O(chunk x N), never O(N x N): similarities are computed a chunk of queries at a time
and reduced at once to what the metrics need per query (the rank of the true match, the class
hits at k, the average precision). With ``across_ranks=True`` (inputs identical on every rank,
e.g. gathered) each rank scores only its share of the queries and the per-query results, small
vectors, are gathered: every rank returns the metrics of the whole set for 1/world of the work.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mmpretrain import distributed

CHUNK = 1024  # most queries scored at once
MAX_SIMILARITIES = 2**23  # and at most this many similarities (32 MB of float32) per chunk


def _chunk_rows(n_gallery: int, chunk: int | None) -> int:
    return chunk or max(1, min(CHUNK, MAX_SIMILARITIES // max(n_gallery, 1)))


def _query_rows(n: int, across_ranks: bool) -> torch.Tensor:
    rows = distributed.share(n) if across_ranks else slice(0, n)
    return torch.arange(rows.start, rows.stop)


def _gather(x: torch.Tensor, across_ranks: bool) -> torch.Tensor:
    return distributed.all_gather_variable(x) if across_ranks else x


def _ranks(queries: torch.Tensor, gallery: torch.Tensor, chunk: int | None = None,
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """1-based pessimistic rank of the true match (same index) of each query in the gallery:
    1 + the number of other gallery items whose similarity is not below the true one's.
    ``rows``: the query indices to rank (default all)."""
    rows = torch.arange(queries.shape[0]) if rows is None else rows
    rows = rows.to(queries.device)
    gallery = F.normalize(gallery, dim=-1)
    ranks = [torch.zeros(0, dtype=torch.long, device=queries.device)]
    for idx in rows.split(_chunk_rows(gallery.shape[0], chunk)):
        sims = F.normalize(queries[idx], dim=-1) @ gallery.T
        local = torch.arange(len(idx), device=sims.device)
        true = sims[local, idx].unsqueeze(1)
        beaten = ~(sims < true)  # ties and NaN (on either side) count against the true match
        beaten[local, idx] = False  # the true match itself
        ranks.append(beaten.sum(1) + 1)
    return torch.cat(ranks)


def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row's values ascending (no NaN). On CPU numpy's vectorised sort is ~3x torch's."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return x.sort(dim=1).values


def _class_results(queries, q_labels, gallery, g_labels, ks, chunk: int | None, rows: torch.Tensor):
    """Per query in ``rows``: class hits at each k ``[n, len(ks)]`` and average precision ``[n]``.

    Exact without sorting the whole ranking: in the pessimistic order (descending similarity,
    irrelevant items first among ties, NaN worst for a relevant item and best for an irrelevant
    one) the j-th relevant item (relevant sorted by similarity) has j relevant items at or above
    it and, above those, every irrelevant item scoring at least as high. Its precision is
    ``j / (j + #irrelevant >= its score)``; ties among relevant items share that count, so their
    order does not matter. Queries are grouped by class, so the relevant set is one column mask.
    """
    gallery = F.normalize(gallery, dim=-1)
    device = queries.device
    q_labels, g_labels, rows = q_labels.to(device), g_labels.to(device), rows.to(device)
    hits = torch.zeros(len(rows), len(ks), dtype=torch.bool, device=device)
    ap = torch.zeros(len(rows), dtype=torch.float64, device=device)
    ks_t = torch.tensor(ks, device=device)
    step = _chunk_rows(gallery.shape[0], chunk)
    labels_here = q_labels[rows]
    for c in labels_here.unique():
        relevant = g_labels == c
        m = int(relevant.sum())
        if m == 0:  # nothing to find: a miss, AP 0
            continue
        j = torch.arange(1, m + 1, device=device, dtype=torch.float64)
        for pos in (labels_here == c).nonzero().squeeze(1).split(step):
            sims = F.normalize(queries[rows[pos]], dim=-1) @ gallery.T
            rel = sims[:, relevant].nan_to_num(nan=-torch.inf)  # a NaN relevant item ranks last
            irr = sims[:, ~relevant].nan_to_num(nan=torch.inf)  # a NaN irrelevant item ranks first
            del sims
            rel = _sort_rows(rel).flip(1)  # descending: column j-1 is the j-th relevant score
            irr = _sort_rows(irr)
            ahead = irr.shape[1] - torch.searchsorted(irr, rel)  # irrelevant scoring >= each relevant
            ap[pos] = (j / (j + ahead)).sum(1) / m
            hits[pos] = (ahead[:, :1] + 1) <= ks_t  # the first relevant item's position <= k
    return hits, ap


def _directional(q, g, ql, gl, ks, chunk, across_ranks) -> dict[str, torch.Tensor]:
    """Per-query results of ``q`` against ``g`` for every query (gathered when split)."""
    rows = _query_rows(q.shape[0], across_ranks)
    out = {"ranks": _gather(_ranks(q, g, chunk, rows), across_ranks)}
    if ql is not None:
        hits, ap = _class_results(q, ql, g, gl, ks, chunk, rows)
        out["class_hits"] = _gather(hits.to(torch.uint8), across_ranks).bool()
        out["ap"] = _gather(ap, across_ranks)
    return out


def _pairs(a, b, a_labels, b_labels, a_name, b_name):
    yield a, b, a_labels, b_labels, f"{a_name}_to_{b_name}"
    yield b, a, b_labels, a_labels, f"{b_name}_to_{a_name}"


def retrieval_metrics(
    a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str, ks=(1, 5, 10),
    a_labels: torch.Tensor | None = None, b_labels: torch.Tensor | None = None,
    chunk: int | None = None, across_ranks: bool = False,
) -> dict[str, float]:
    """R@k, mean and median rank in both directions, keyed ``R@1/a_to_b`` etc.; with labels also
    the class metrics of :func:`class_retrieval_metrics`."""
    out: dict[str, float] = {}
    labelled = a_labels is not None and b_labels is not None
    for q, g, ql, gl, direction in _pairs(a, b, a_labels, b_labels, a_name, b_name):
        res = _directional(q, g, ql if labelled else None, gl, ks, chunk, across_ranks)
        ranks = res["ranks"].float()
        for k in ks:
            out[f"R@{k}/{direction}"] = (ranks <= k).float().mean().item()
        out[f"mean_rank/{direction}"] = ranks.mean().item()
        out[f"median_rank/{direction}"] = ranks.median().item()
        if labelled:
            out |= _class_summary(res, ks, direction)
    return out


def _class_summary(res: dict[str, torch.Tensor], ks, direction: str) -> dict[str, float]:
    out = {f"class_R@{k}/{direction}": res["class_hits"][:, i].float().mean().item() for i, k in enumerate(ks)}
    out[f"class_mAP/{direction}"] = res["ap"].mean().item()
    return out


def class_retrieval_metrics(
    a: torch.Tensor, b: torch.Tensor, a_labels: torch.Tensor, b_labels: torch.Tensor, a_name: str, b_name: str,
    ks=(1, 5, 10), chunk: int | None = None, across_ranks: bool = False,
) -> dict[str, float]:
    """Retrieval where a gallery item is relevant when it has the query's class.

    For modalities that share classes but no instance pairing (audio of a spoken "seven" and any
    image of a 7): ``R@k`` = fraction of queries with a same-class item in the top k (chance
    ~ the class frequency at k=1), ``mAP`` = mean average precision over all same-class items.
    Ties with irrelevant items count against the model. Keyed ``class_R@1/a_to_b``,
    ``class_mAP/a_to_b`` etc., both directions.
    """
    out: dict[str, float] = {}
    for q, g, ql, gl, direction in _pairs(a, b, a_labels, b_labels, a_name, b_name):
        rows = _query_rows(q.shape[0], across_ranks)
        hits, ap = _class_results(q, ql, g, gl, ks, chunk, rows)
        res = {"class_hits": _gather(hits.to(torch.uint8), across_ranks).bool(), "ap": _gather(ap, across_ranks)}
        out |= _class_summary(res, ks, direction)
    return out
