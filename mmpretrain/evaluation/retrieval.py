"""Cross-modal retrieval over paired embeddings (row i of ``a`` pairs with row i of ``b``).

Ranks are pessimistic: a gallery item that ties with the true match counts as ranked above it,
and a NaN similarity beats everything. A collapsed model (all embeddings equal) or a diverged one
(NaN embeddings) therefore scores the worst rank, not a perfect R@1. Similarities are computed
``chunk`` queries at a time, so memory is O(chunk x N), not O(N x N).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

CHUNK = 1024  # queries scored at once


def _similarity_chunks(queries: torch.Tensor, gallery: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, cosine similarities of queries[start:start+chunk] to the whole gallery); one empty
    chunk when there are no queries, so callers need no special case."""
    gallery = F.normalize(gallery, dim=-1)
    for start in range(0, max(queries.shape[0], 1), chunk):
        yield start, F.normalize(queries[start : start + chunk], dim=-1) @ gallery.T


def _ranks(queries: torch.Tensor, gallery: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """1-based pessimistic rank of the true match (same index) of each query in the gallery:
    1 + the number of other gallery items whose similarity is not below the true one's."""
    ranks = []
    for start, sims in _similarity_chunks(queries, gallery, chunk):
        rows = torch.arange(sims.shape[0], device=sims.device)
        true = sims[rows, start + rows].unsqueeze(1)
        beaten = ~(sims < true)  # ties and NaN (on either side) count against the true match
        beaten[rows, start + rows] = False  # the true match itself
        ranks.append(beaten.sum(1) + 1)
    return torch.cat(ranks)


def retrieval_metrics(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str, ks=(1, 5, 10)) -> dict[str, float]:
    """R@k, mean and median rank in both directions, keyed ``R@1/a_to_b`` etc."""
    out: dict[str, float] = {}
    for (q, g, direction) in ((a, b, f"{a_name}_to_{b_name}"), (b, a, f"{b_name}_to_{a_name}")):
        ranks = _ranks(q, g).float()
        for k in ks:
            out[f"R@{k}/{direction}"] = (ranks <= k).float().mean().item()
        out[f"mean_rank/{direction}"] = ranks.mean().item()
        out[f"median_rank/{direction}"] = ranks.median().item()
    return out


def _ranked_relevance(sims: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """``relevant`` reordered by descending similarity, ties broken pessimistically (irrelevant
    items first) and NaN ranked worst for a relevant item, best for an irrelevant one."""
    sims = torch.where(sims.isnan(), torch.where(relevant, -torch.inf, torch.inf), sims)
    by_relevance = relevant.float().argsort(dim=1, stable=True)  # irrelevant first
    by_sim = sims.gather(1, by_relevance).argsort(dim=1, descending=True, stable=True)
    return relevant.gather(1, by_relevance.gather(1, by_sim)).float()


def class_retrieval_metrics(
    a: torch.Tensor, b: torch.Tensor, a_labels: torch.Tensor, b_labels: torch.Tensor, a_name: str, b_name: str,
    ks=(1, 5, 10), chunk: int = CHUNK,
) -> dict[str, float]:
    """Retrieval where a gallery item is relevant when it has the query's class.

    For modalities that share classes but no instance pairing (audio of a spoken "seven" and any
    image of a 7): ``R@k`` = fraction of queries with a same-class item in the top k (chance
    ~ the class frequency at k=1), ``mAP`` = mean average precision over all same-class items.
    Ties with irrelevant items count against the model. Keyed ``class_R@1/a_to_b``,
    ``class_mAP/a_to_b`` etc., both directions.
    """
    out: dict[str, float] = {}
    for q, g, ql, gl, direction in ((a, b, a_labels, b_labels, f"{a_name}_to_{b_name}"),
                                    (b, a, b_labels, a_labels, f"{b_name}_to_{a_name}")):
        hits_at = {k: [] for k in ks}
        aps = []
        positions = torch.arange(1, g.shape[0] + 1, device=g.device)
        for start, sims in _similarity_chunks(q, g, chunk):
            relevant = _ranked_relevance(sims, gl[None, :] == ql[start : start + sims.shape[0], None])  # [n, Ng]
            for k in ks:
                hits_at[k].append(relevant[:, :k].sum(1) > 0)
            precision = relevant.cumsum(1) / positions
            aps.append((precision * relevant).sum(1) / relevant.sum(1).clamp(min=1))
        for k in ks:
            out[f"class_R@{k}/{direction}"] = torch.cat(hits_at[k]).float().mean().item()
        out[f"class_mAP/{direction}"] = torch.cat(aps).mean().item()
    return out
