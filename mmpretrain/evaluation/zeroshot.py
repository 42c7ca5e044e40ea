"""Zero-shot classification: class prototypes from prompt embeddings, top-k accuracy."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def read_lines(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def class_embeddings(
    classnames: list[str], templates: list[str], encode_text: Callable[[list[str]], torch.Tensor]
) -> torch.Tensor:
    """``[C, D]`` normalised mean over templates of each class's normalised prompt embeddings."""
    protos = []
    for name in classnames:
        prompts = [t.format(name) if "{}" in t else t.replace("{c}", name) for t in templates]
        emb = F.normalize(encode_text(prompts), dim=-1)
        protos.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(protos)


def zero_shot_accuracy(
    queries: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, topk: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy of ``queries [N, D]`` classified by nearest class embedding ``[C, D]``."""
    logits = F.normalize(queries, dim=-1) @ F.normalize(classes, dim=-1).T
    ranked = logits.argsort(dim=1, descending=True)
    hits = ranked == labels.view(-1, 1)
    return {f"top{k}": hits[:, : min(k, classes.shape[0])].any(1).float().mean().item() for k in topk}


def class_prototypes(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, D]`` normalised mean of each class's normalised embeddings (zeros for an absent class).

    Zero-shot across two non-text modalities: e.g. audio queries classified by the nearest image
    class prototype. The prototypes use the labels of the *other* modality's embeddings only.
    """
    emb = F.normalize(embeddings, dim=-1)
    sums = torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype, device=emb.device)
    sums.index_add_(0, labels.long(), emb)
    return F.normalize(sums, dim=-1)
