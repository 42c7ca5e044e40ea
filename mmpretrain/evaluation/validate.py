"""The validation collector: every val batch's embeddings and labels as columns, gathered across
ranks at the end of an evaluation, then scored (retrieval, zero-shot, the compositional probe and
the full-set loss of every pair of modalities). Plain torch: the LightningModule calls it.

Columns are the same, in the same order, on every rank (a rank with no rows passes empty ones), so
the gathers match; every rank scores its share of the queries and returns the metrics of the whole set.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from mmpretrain.data.stream.captions import NEGATIVE_KINDS
from mmpretrain.evaluation.probe import compositional_probe
from mmpretrain.evaluation.retrieval import (
    caption_keys,
    repeated_caption_fraction,
    retrieval_metrics,
    rows_multi_caption_retrieval,
)
from mmpretrain.evaluation.zeroshot import class_embeddings, class_prototypes, zero_shot_accuracy
from mmpretrain.runtime import distributed


class ValidationCollector:
    """Collects a validation's rows with :meth:`add` (one call per batch), hands this rank's columns
    over with :meth:`take`, and scores them with :meth:`metrics` (a collective: every rank calls it).

    ``zeroshot``: ``{"classnames", "templates"}`` of the val labels; ``zeroshot_tasks``: ``{task: the
    same}``, scored on the rows whose json ``labels[<task>]`` >= 0.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: torch.nn.Module,
        zeroshot: dict[str, list[str]] | None = None,
        zeroshot_tasks: dict[str, dict[str, list[str]]] | None = None,
    ):
        self.model, self.loss = model, loss
        self.zeroshot = zeroshot
        self.zeroshot_tasks = zeroshot_tasks or {}
        self.columns: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.rows = 0  # this rank's val rows so far (owners of further captions point into them)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def add(self, batch: dict[str, Any]) -> None:
        """Embed one val batch and append its columns."""
        out = self.model(batch)
        local = {m: out[f"{m}_features"] for m in self.model.modalities if f"{m}_features" in out}
        local |= {
            k: batch[k]
            for k in [f"{m}_mask" for m in self.model.modalities] + ["cls"] + self._task_columns()
            if k in batch
        }
        tokens = batch.get("text")
        if (
            "text" in self.model.modalities
            and isinstance(tokens, torch.Tensor)
            and not tokens.is_floating_point()
        ):
            local["caption_key"] = caption_keys(tokens, getattr(self.model.towers["text"], "pad_id", None))
        cols = self.row_columns(local) | self._caption_columns(batch, self.rows)
        self.rows += len(cols["cls"])
        for k, v in cols.items():
            self.columns[k].append(v)

    def take(self) -> dict[str, torch.Tensor]:
        """This rank's columns of the validation so far (``{}`` when it saw no batch); starts the next."""
        local = {k: torch.cat(v) for k, v in self.columns.items()}
        self.columns.clear()
        self.rows = 0
        return local

    def labelled_embeddings(self, local: dict[str, torch.Tensor], limit: int, step: int) -> dict[str, Any]:
        """This rank's first ``limit`` labelled val rows of every non-text modality, on the CPU:
        ``{"step": global step, "features": {m: [n, D]}, "labels": {m: [n]}}``."""
        labels = local.get("cls")
        out: dict[str, Any] = {"step": step, "features": {}, "labels": {}}
        for m in self.model.modalities:
            if m == "text" or m not in local or labels is None:
                continue
            rows = (labels >= 0) & local[f"{m}_mask"]
            out["features"][m] = local[m][rows][:limit].float().cpu()
            out["labels"][m] = labels[rows][:limit].cpu()
        return out

    def row_columns(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same columns in the same order on every rank: per modality ``[n, D]`` float32
        features and an ``[n]`` bool mask, then ``[n]`` long ``cls`` (-1: unlabelled). A modality
        missing from ``local`` gets zero features and a False mask, missing labels -1, so rows stay
        aligned across batches; with no rows at all the columns are empty, D = the model's embed_dim."""
        n = next((len(v) for v in local.values()), 0)
        device = next((v.device for v in local.values()), self.device)
        cols: dict[str, torch.Tensor] = {}
        for m in self.model.modalities:
            feats, mask = local.get(m), local.get(f"{m}_mask")
            present = torch.full((n,), feats is not None, dtype=torch.bool, device=device)
            cols[m] = (
                feats.float() if feats is not None else torch.zeros(n, self.model.embed_dim, device=device)
            )
            cols[f"{m}_mask"] = present & mask.to(device).bool() if mask is not None else present
        labels = local.get("cls")
        cols["cls"] = labels.to(device).long() if labels is not None else torch.full((n,), -1, device=device)
        if "text" in self.model.modalities:  # equal for equal first captions (-> val/caption_repeat_frac)
            keys = local.get("caption_key")
            cols["caption_key"] = (
                keys.to(device) if keys is not None else torch.zeros(n, dtype=torch.long, device=device)
            )
        for key in self._task_columns():  # a task's label per row, -1 where it does not apply
            labels = local.get(key)
            cols[key] = (
                labels.to(device).long() if labels is not None else torch.full((n,), -1, device=device)
            )
        return cols

    def _task_columns(self) -> list[str]:
        return [f"label/{task}" for task in self.zeroshot_tasks]

    #: per-sample lists of a val batch, flattened with the row they belong to (``<key>_owner``)
    _CAPTION_LISTS = ("text_more", "probe_negatives")

    def _caption_columns(self, batch: dict[str, Any], offset: int) -> dict[str, torch.Tensor]:
        """With a text tower: the embeddings of every caption but the first (``text_more``) and of the
        hard negatives (``probe_negatives``, with ``probe_negatives_kind``), each with its owner row
        among this rank's val rows (``offset`` + the row in the batch). Empty when the batch has none;
        the same keys on every rank."""
        if "text" not in self.model.modalities:
            return {}
        cols: dict[str, torch.Tensor] = {}
        for key in self._CAPTION_LISTS:
            tokens = batch.get(key)
            if tokens is not None and len(tokens):
                cols[key] = self.model.encode("text", tokens.to(self.device)).float()
                cols[f"{key}_owner"] = batch[f"{key}_owner"].to(self.device).long() + offset
            else:
                cols[key] = torch.zeros(0, self.model.embed_dim, device=self.device)
                cols[f"{key}_owner"] = torch.zeros(0, dtype=torch.long, device=self.device)
        kinds = batch.get("probe_negatives_kind")
        has = kinds is not None and len(cols["probe_negatives"])
        cols["probe_negatives_kind"] = (
            kinds.to(self.device).long() if has else torch.zeros(0, dtype=torch.long, device=self.device)
        )
        return cols

    def _gather_captions(self, local: dict[str, torch.Tensor], n_local: int) -> dict[str, torch.Tensor]:
        """The caption columns of every rank, owners turned into rows of the gathered val set."""
        empty = self._caption_columns({}, 0)
        cols = {k: local.get(k, v).to(v.device) for k, v in empty.items()}
        sizes = distributed.all_gather_variable(torch.tensor([n_local], device=self.device))
        offset = int(sizes[: distributed.rank()].sum().item())
        for key in self._CAPTION_LISTS:
            cols[f"{key}_owner"] = cols[f"{key}_owner"] + offset
        return {k: distributed.all_gather_variable(v) for k, v in cols.items()}

    @torch.no_grad()
    def metrics(self, local: dict[str, torch.Tensor]) -> dict[str, float]:
        """Retrieval and zero-shot for every pair of modalities present, trained together or not.

        For each pair (a, b), over the rows that carry both: instance retrieval
        ``val/retrieval_R@k/a_to_b`` (row i of a pairs with row i of b) and, with labels,
        class retrieval ``val/retrieval_class_R@k/a_to_b``, ``val/retrieval_class_mAP/a_to_b``
        (relevant = same class). Zero-shot ``val/zeroshot_top1/q_c`` classifies modality q by
        class prototypes of modality c: prompt embeddings when c is text, otherwise the mean
        embedding of each class among the val set's c samples. ``val/caption_repeat_frac``: the
        fraction of text rows whose first caption another row shares (class templates: ~1; above
        :data:`~mmpretrain.evaluation.retrieval.CAPTIONS_REPEAT` read class recall, not instance recall).

        Every rank gathers the embeddings (the keys), then scores only its share of the queries,
        a chunk at a time, and the per-query results are gathered: the metrics cover the whole
        val set, are identical on all ranks, and no rank ever holds an N x N matrix.
        """
        # Every rank gathers the same columns, in the same order, even with no rows of its own.
        rows_local = self.row_columns(local)
        emb = {k: distributed.all_gather_variable(v) for k, v in rows_local.items()}
        extra = (
            self._gather_captions(local, len(rows_local["cls"])) if "text" in self.model.modalities else {}
        )
        task_labels = {k: emb.pop(k) for k in self._task_columns()}
        labels = emb.pop("cls")
        caption_keys_ = emb.pop("caption_key", None)
        masks = {m: emb.pop(f"{m}_mask") for m in self.model.modalities}
        mods = [m for m in self.model.modalities if masks[m].any()]
        labelled = labels >= 0
        metrics: dict[str, float] = {}
        if caption_keys_ is not None and "text" in mods:
            metrics["val/caption_repeat_frac"] = repeated_caption_fraction(caption_keys_[masks["text"]])
        for i, a in enumerate(mods):
            for b in mods[i + 1 :]:
                both = masks[a] & masks[b]
                if not both.any():
                    continue
                ea, eb = emb[a][both], emb[b][both]
                pair_labels = labels[both] if labelled[both].all() else None
                scores = retrieval_metrics(
                    ea, eb, a, b, a_labels=pair_labels, b_labels=pair_labels, across_ranks=True
                )
                if "text" in (a, b) and len(extra.get("text_more", ())):
                    other = (
                        b if a == "text" else a
                    )  # every caption: replaces the first-caption instance numbers
                    multi = rows_multi_caption_retrieval(
                        emb[other],
                        emb["text"],
                        extra["text_more"],
                        extra["text_more_owner"],
                        both,
                        other,
                        "text",
                        across_ranks=True,
                    )
                    scores |= {
                        k: v for k, v in multi.items() if k.startswith(("R@", "mean_rank/", "median_rank/"))
                    }
                forward, backward = f"{a}_to_{b}", f"{b}_to_{a}"
                scores[f"rsum/{a}_{b}"] = 100 * sum(
                    scores[f"R@{k}/{d}"] for k in (1, 5, 10) for d in (forward, backward)
                )
                scores[f"mean_R@1/{a}_{b}"] = (scores[f"R@1/{forward}"] + scores[f"R@1/{backward}"]) / 2
                metrics.update({f"val/retrieval_{k}": v for k, v in scores.items()})
                metrics.update(
                    {f"val/{name}": v.item() for name, v in self._full_set_loss(ea, eb, a, b).items()}
                )
        if labelled.any():
            metrics |= self._zero_shot(emb, masks, labels, labelled, mods)
        if "text" in mods:
            metrics |= self._probe(emb, masks, extra, mods) | self._zero_shot_tasks(
                emb, masks, task_labels, mods
            )
        return metrics

    @staticmethod
    def _probe(emb, masks, extra, mods) -> dict[str, float]:
        """``val/probe/<kind>`` and ``val/probe/mean`` (``val/probe/<modality>/...`` for a non-image
        modality): how often a row prefers its first caption to each of its hard negatives."""
        negatives = extra.get("probe_negatives")
        if negatives is None or not len(negatives):
            return {}
        metrics: dict[str, float] = {}
        owner, kinds = extra["probe_negatives_owner"], extra["probe_negatives_kind"]
        for m in mods:
            if m == "text":
                continue
            keep = (masks[m] & masks["text"])[owner]
            scores = compositional_probe(
                emb[m], emb["text"], negatives[keep], owner[keep], kinds[keep], NEGATIVE_KINDS
            )
            prefix = "val/probe" if m == "image" else f"val/probe/{m}"
            metrics |= {f"{prefix}/{k}": v for k, v in scores.items()}
        return metrics

    def _zero_shot_tasks(self, emb, masks, task_labels, mods) -> dict[str, float]:
        """``val/zeroshot_top1/<task>/<q>_text`` (and top5) over the rows labelled for each task."""
        metrics: dict[str, float] = {}
        for task, prompts in self.zeroshot_tasks.items():
            labels = task_labels[f"label/{task}"]
            classes = None
            for q in mods:
                rows = masks[q] & (labels >= 0)
                if q == "text" or not rows.any():
                    continue
                if classes is None:
                    classes = class_embeddings(
                        prompts["classnames"], prompts["templates"], self.encode_prompts
                    )
                acc = zero_shot_accuracy(
                    emb[q][rows], labels[rows], classes.to(emb[q].dtype), across_ranks=True
                )
                metrics[f"val/zeroshot_top1/{task}/{q}_text"] = acc["top1"]
                metrics[f"val/zeroshot_top5/{task}/{q}_text"] = acc["top5"]
        return metrics

    def _full_set_loss(self, ea: torch.Tensor, eb: torch.Tensor, a: str, b: str) -> dict[str, torch.Tensor]:
        """The loss over the whole val set as one batch (the embeddings are already global): the
        objective's own ``full_set`` (InfoNCE, SigLIP: tiled, the tiles shared among ranks), or, for
        another loss, the loss itself on the whole set (N x N)."""
        outputs = {f"{a}_features": ea, f"{b}_features": eb} | self.model.logit_scale_outputs()
        full_set = getattr(self.loss, "full_set", None)
        return full_set(outputs, a, b) if full_set is not None else self.loss(outputs, gather=False)

    def _zero_shot(self, emb, masks, labels, labelled, mods) -> dict[str, float]:
        num_classes = len(self.zeroshot["classnames"]) if self.zeroshot else int(labels.max().item()) + 1
        metrics: dict[str, float] = {}
        for c in mods:
            if c == "text":
                if not self.zeroshot:
                    continue
                classes = class_embeddings(
                    self.zeroshot["classnames"], self.zeroshot["templates"], self.encode_prompts
                )
            else:
                rows = masks[c] & labelled
                if not rows.any():
                    continue
                classes = class_prototypes(emb[c][rows], labels[rows], num_classes)
            for q in mods:
                rows = masks[q] & labelled
                if q == c or (q == "text" and c != "text") or not rows.any():
                    continue
                acc = zero_shot_accuracy(
                    emb[q][rows], labels[rows], classes.to(emb[q].dtype), across_ranks=True
                )
                metrics[f"val/zeroshot_top1/{q}_{c}"] = acc["top1"]
                metrics[f"val/zeroshot_top5/{q}_{c}"] = acc["top5"]
        return metrics

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokenize = self._text_preprocess()
        tokens = (
            self.model.towers["text"].trim_input(torch.stack([tokenize(p) for p in prompts])).to(self.device)
        )
        return self.model.encode_text(tokens)

    def _text_preprocess(self):
        if not hasattr(self, "_tokenize"):
            self._tokenize = self.model.towers["text"].preprocess(False)
        return self._tokenize
