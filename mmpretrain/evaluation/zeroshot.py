"""Zero-shot classification: class prototypes from prompt embeddings, top-k accuracy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmpretrain import storage
from mmpretrain.runtime import distributed


def read_lines(path: str) -> list[str]:
    """The non-empty lines of a text file, local or in a store (``s3://...``)."""
    if storage.is_remote(path):
        text = (storage.read_bytes(path) or b"").decode()
    else:
        with open(path) as f:
            text = f.read()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _exists(path: str) -> bool:
    return storage.read_bytes(path) is not None if storage.is_remote(path) else Path(path).exists()


def read_tasks(root: str | Path | None, default_templates: list[str]) -> dict[str, dict[str, list[str]]]:
    """Zero-shot tasks of a directory: ``<root>/<task>/classnames.txt`` (one class per line, in label
    order) and optionally ``templates.txt`` (else ``default_templates``), as
    ``{task: {"classnames": [...], "templates": [...]}}``; {} when ``root`` is None or missing."""
    if root is None or storage.is_remote(root) or not Path(root).is_dir():
        return {}  # (tasks of a root in a store: not read)
    tasks = {}
    for d in sorted(p for p in Path(root).iterdir() if (p / "classnames.txt").is_file()):
        templates = (
            read_lines(str(d / "templates.txt")) if (d / "templates.txt").is_file() else default_templates
        )
        tasks[d.name] = {"classnames": read_lines(str(d / "classnames.txt")), "templates": templates}
    return tasks


def _templates(val: Any) -> list[str]:
    templates = val.get("templates")
    return read_lines(templates) if templates and _exists(templates) else ["{}"]


def prompts_from_config(val: Any) -> dict[str, list[str]] | None:
    """``{"classnames", "templates"}`` from a val config's ``classnames``/``templates`` files (templates
    default to ``{}``); None when there is no class-name file."""
    val = val or {}
    if not (val.get("classnames") and _exists(val["classnames"])):
        return None
    return {"classnames": read_lines(val["classnames"]), "templates": _templates(val)}


def tasks_from_config(val: Any) -> dict[str, dict[str, list[str]]]:
    """``data.val.tasks``: zero-shot tasks scored on the val rows whose json ``labels[<task>]`` >= 0."""
    val = val or {}
    return read_tasks(val.get("tasks"), _templates(val))


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
    queries: torch.Tensor,
    labels: torch.Tensor,
    classes: torch.Tensor,
    topk: tuple[int, ...] = (1, 5),
    chunk: int = 8192,
    across_ranks: bool = False,
) -> dict[str, float]:
    """Top-k accuracy of ``queries [N, D]`` classified by nearest class embedding ``[C, D]``.

    Pessimistic: a query is a hit at k when fewer than k other classes score at least as high as
    its true class (ties count against it, a NaN score beats it), and never when its own score is
    not finite. A collapsed model (every score equal) or a diverged one (NaN) scores 0, not chance
    or better. Scored ``chunk`` queries at a time; with ``across_ranks`` (inputs identical on every
    rank) each rank scores its share of the queries and the per-query hits are gathered.
    """
    labels = labels.view(-1).long().to(queries.device)
    classes = F.normalize(classes, dim=-1)
    rows = distributed.share(queries.shape[0]) if across_ranks else slice(0, queries.shape[0])
    hits = [torch.zeros(0, len(topk), dtype=torch.bool, device=queries.device)]
    for start in range(rows.start, rows.stop, chunk):
        stop = min(start + chunk, rows.stop)
        hits.append(_top_hits(F.normalize(queries[start:stop], dim=-1) @ classes.T, labels[start:stop], topk))
    hits = torch.cat(hits)
    if across_ranks:
        hits = distributed.all_gather_variable(hits.to(torch.uint8)).bool()
    return {f"top{k}": hits[:, i].float().mean().item() for i, k in enumerate(topk)}


def _top_hits(logits: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...]) -> torch.Tensor:
    """``[n, len(topk)]`` bool: the true class is a (pessimistic) top-k hit."""
    known = (labels >= 0) & (labels < logits.shape[1])  # a label without a class embedding is a miss
    index = labels.clamp(0, logits.shape[1] - 1).unsqueeze(1)
    true = logits.gather(1, index)
    beaten = ~(logits < true)  # ties and NaN count against the true class
    beaten.scatter_(1, index, False)  # the true class itself
    scored = known & true.squeeze(1).isfinite()
    ahead = beaten.sum(1, keepdim=True)
    return (ahead < torch.tensor(topk, device=logits.device)) & scored[:, None]


def class_prototypes(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, D]`` normalised mean of each class's normalised embeddings (zeros for an absent class).

    Zero-shot across two non-text modalities: e.g. audio queries classified by the nearest image
    class prototype. The prototypes use the labels of the *other* modality's embeddings only; rows
    labelled outside ``[0, num_classes)`` are left out (as queries :func:`zero_shot_accuracy` counts
    them as misses, as it does for text prompts).
    """
    emb = F.normalize(embeddings, dim=-1)
    labels = labels.long().to(emb.device)
    known = (labels >= 0) & (labels < num_classes)  # a label without a class name builds no prototype
    sums = torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype, device=emb.device)
    sums.index_add_(0, labels[known], emb[known])
    return F.normalize(sums, dim=-1)
