"""Collation of sample dicts that may carry different subsets of modalities."""

from __future__ import annotations

from typing import Any

import torch


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack each key; where only some samples carry it, fill with zeros and add ``<key>_mask``."""
    keys = list(dict.fromkeys(k for s in samples for k in s))
    out: dict[str, Any] = {}
    for key in keys:
        values = [s.get(key) for s in samples]
        present = [v is not None for v in values]
        first = next(v for v in values if v is not None)
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
