"""Cross-modal retrieval over paired embeddings (row i of ``a`` pairs with row i of ``b``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ranks(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """1-based rank of the true match (same index) of each query in the gallery."""
    sims = F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).T
    true = sims.diagonal().unsqueeze(1)
    return (sims > true).sum(1) + 1


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


def class_retrieval_metrics(
    a: torch.Tensor, b: torch.Tensor, a_labels: torch.Tensor, b_labels: torch.Tensor, a_name: str, b_name: str,
    ks=(1, 5, 10),
) -> dict[str, float]:
    """Retrieval where a gallery item is relevant when it has the query's class.

    For modalities that share classes but no instance pairing (audio of a spoken "seven" and any
    image of a 7): ``R@k`` = fraction of queries with a same-class item in the top k (chance
    ~ the class frequency at k=1), ``mAP`` = mean average precision over all same-class items.
    Keyed ``class_R@1/a_to_b``, ``class_mAP/a_to_b`` etc., both directions.
    """
    out: dict[str, float] = {}
    for q, g, ql, gl, direction in ((a, b, a_labels, b_labels, f"{a_name}_to_{b_name}"),
                                    (b, a, b_labels, a_labels, f"{b_name}_to_{a_name}")):
        sims = F.normalize(q, dim=-1) @ F.normalize(g, dim=-1).T
        order = sims.argsort(dim=1, descending=True)
        relevant = (gl[order] == ql[:, None]).float()  # [Nq, Ng] in ranked order
        for k in ks:
            out[f"class_R@{k}/{direction}"] = (relevant[:, :k].sum(1) > 0).float().mean().item()
        hits = relevant.cumsum(1)
        precision = hits / torch.arange(1, g.shape[0] + 1, device=g.device)
        ap = (precision * relevant).sum(1) / relevant.sum(1).clamp(min=1)
        out[f"class_mAP/{direction}"] = ap.mean().item()
    return out
