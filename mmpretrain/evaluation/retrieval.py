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
