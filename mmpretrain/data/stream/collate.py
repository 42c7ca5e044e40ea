"""Collation of sample dicts that may carry different subsets of modalities."""

from __future__ import annotations

from typing import Any

import torch


def collate(samples: list[dict[str, Any]], fill: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Stack each key; where only some samples carry it, fill with zeros and add ``<key>_mask``.

    ``fill`` maps keys every batch must carry to an example tensor: a key no sample of this batch
    has is then all zeros with an all-False mask, so every batch (and every DDP rank) has the
    same keys and runs the same towers.
    """
    fill = fill or {}
    keys = list(dict.fromkeys([*(k for s in samples for k in s), *fill]))
    out: dict[str, Any] = {}
    for key in keys:
        values = [s.get(key) for s in samples]
        present = [v is not None for v in values]
        first = next((v for v in values if v is not None), fill.get(key))
        if isinstance(first, torch.Tensor):
            values = [v if v is not None else torch.zeros_like(first) for v in values]
            out[key] = torch.stack(values)
        elif isinstance(first, (int, float)):
            out[key] = torch.tensor([v if v is not None else -1 for v in values])
        else:
            out[key] = values
        if not all(present):
            out[f"{key}_mask"] = torch.tensor(present)
    return out


def ragged_rows(
    per_sample: list[list[Any]], example: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length per-sample lists (tensors, or ints when ``example`` is None) as one ``[E, ...]``
    tensor and the ``[E]`` row of the batch each entry belongs to; ``E`` may be 0 (shaped like
    ``example``)."""
    flat = [v for values in per_sample for v in values]
    owner = torch.tensor([i for i, values in enumerate(per_sample) for _ in values], dtype=torch.long)
    if example is None:
        return torch.tensor(flat, dtype=torch.long), owner
    if not flat:
        return example.new_zeros((0, *example.shape)), owner
    return torch.stack(flat), owner
