"""LightningModule: a ContrastiveModel + a loss + the optimiser, and validation on embeddings."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.enums import GradClipAlgorithmType

from mmpretrain import distributed
from mmpretrain.data.captions import NEGATIVE_KINDS
from mmpretrain.evaluation import (
    class_embeddings,
    class_prototypes,
    compositional_probe,
    retrieval_metrics,
    rows_multi_caption_retrieval,
    zero_shot_accuracy,
)
from mmpretrain.gradcache import grad_cache_backward
from mmpretrain.losses import DEFAULT_TILE, InfoNCE, SigLIP, logit_scale_for, pair_name, tiled_cross_entropy
from mmpretrain.model import ContrastiveModel
from mmpretrain.optim import build_optimizer, warmup_cosine, warmup_steps


class ContrastiveModule(L.LightningModule):
    def __init__(
        self,
        model: ContrastiveModel,
        loss: torch.nn.Module,
        optim: dict[str, Any],
        zeroshot: dict[str, list[str]] | None = None,
        hparams: dict[str, Any] | None = None,
        zeroshot_tasks: dict[str, dict[str, list[str]]] | None = None,
    ):
        super().__init__()
        self.model = model
        self.loss = loss
        self.optim_cfg = optim
        self.zeroshot = zeroshot  # {"classnames": [...], "templates": [...]}
        # {task: {"classnames", "templates"}}: zero-shot of each task over the val rows labelled for it
        self.zeroshot_tasks = zeroshot_tasks or {}
        self._val_rows = 0  # rows of this rank's val columns so far (owners of extra captions point into them)
        # Set by monitor.RunPlots: keep up to this many labelled rows of each validation's embeddings
        # (``last_val_embeddings``), so the end-of-run plots need no second pass over the val set.
        self.keep_val_embeddings = 0
        self.last_val_embeddings: dict[str, Any] | None = None
        # Plain containers only: checkpoints stay loadable with torch.load(weights_only=True).
        self.save_hyperparameters(hparams or {"model": model.config()}, logger=False)
        self._val: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._last_step_time: float | None = None
        self.skipped_total = 0
        # optim.grad_cache_chunks=k: the loss of the whole batch, encoded k micro-batches at a time
        # (feature caching), which needs manual optimisation.
        self.grad_cache_chunks = int(optim.get("grad_cache_chunks") or 1)
        self.automatic_optimization = self.grad_cache_chunks <= 1
        if self.grad_cache_chunks > 1 and getattr(loss, "hard_negatives", False):
            raise ValueError("loss.hard_negatives=true cannot be combined with optim.grad_cache_chunks>1 "
                             "(the cached features would not include the negatives)")
        self._partial_stream = False  # set at train start: masks on every rank (see _masks_on_every_rank)

    @property
    def skipped_total(self) -> int:
        """Samples skipped so far, summed over ranks (a host sync: read it at log/checkpoint time)."""
        return int(self._skipped.item())

    @skipped_total.setter
    def skipped_total(self, value: int) -> None:
        self._skipped = torch.tensor(int(value), dtype=torch.long)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model(batch)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        batch = self._masks_on_every_rank(batch)
        losses = self._grad_cache_step(batch) if self.grad_cache_chunks > 1 else self.loss(self.model(batch))
        total = sum(losses.values())
        bs = _batch_size(batch)
        self._log_losses(losses, total, bs)
        self._log_stream_stats(batch, bs)
        return total

    def _masks_on_every_rank(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A stream that can yield partial batches gets ``<m>_mask`` for every modality, every step.

        The collate adds a mask only to batches where some row lacks the modality, but under DDP
        the masked loss gathers one tensor more than the plain one, so all ranks must take the same
        path: decided once from the data config (identical on every rank), not per batch.
        """
        if not self._partial_stream:
            return batch
        present = [m for m in self.model.modalities if m in batch and f"{m}_mask" not in batch]
        if not present:
            return batch
        rows = torch.ones(_batch_size(batch), dtype=torch.bool, device=self.device)
        return batch | {f"{m}_mask": rows for m in present}

    def on_train_start(self) -> None:
        self._partial_stream = distributed.world_size() > 1 and _may_yield_partial_batches(self.trainer.datamodule)

    def _log_losses(self, losses: dict[str, torch.Tensor], total: torch.Tensor, bs: int) -> None:
        """``train/loss`` and its terms as the loss of the global batch, at the steps whose logs are
        written only. A rank's value is its share (DDP averages gradients), so the mean over ranks
        is the global loss, also when a rank holds no complete row of a partial batch. One
        all-reduce of a few scalars, no host read; nothing at other steps (but the last of an epoch or
        of the run, so what ``train`` returns holds the final loss). Not ``prog_bar``: Lightning
        reads those on the host after every batch (monitor.ProgressBar shows them when it redraws)."""
        if not self._logs_written_after_this_step():
            return
        values = torch.stack([total.detach(), *(v.detach() for v in losses.values())])
        values = distributed.all_reduce_sum(values) / distributed.world_size()
        self.log("train/loss", values[0], batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in zip(losses, values[1:])}, batch_size=bs)

    def _logs_written_after_this_step(self) -> bool:
        """Every ``log_every_n_steps`` (Lightning's own test), and at the last batch of an epoch or of
        the run: the same answer on every rank (equal batch counts), so their reductions match."""
        t = self.trainer
        last = t.is_last_batch or (t.max_steps > 0 and t.global_step + 1 >= t.max_steps)
        return last or t._logger_connector.should_update_logs

    def _log_stream_stats(self, batch: dict[str, Any], bs: int) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            rate = bs * distributed.world_size() / (now - self._last_step_time)
            self.log("train/samples_per_s", rate, batch_size=bs)
        self._last_step_time = now
        skipped = batch.get("__skipped__")
        if skipped is not None:
            # Summed on the device without .item(): no host sync per step (read when logged/saved).
            reduced = distributed.all_reduce_sum(skipped.reshape(1).to(self.device, non_blocking=True)).sum()
            self._skipped = self._skipped.to(reduced.device) + reduced
            self.log("train/skipped_samples", self._skipped.float(), batch_size=bs)
        for k, v in self.model.logit_scales.items():
            self.log(f"train/logit_scale/{k}", v.detach().exp(), batch_size=bs)
        if self.model.logit_bias is not None:
            self.log("train/logit_bias", self.model.logit_bias.detach(), batch_size=bs)

    def _grad_cache_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        # Under DDP only the last micro-batch's backward all-reduces (the others accumulate locally).
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", None)
        losses = grad_cache_backward(self.model, self.loss, batch, self.grad_cache_chunks, self.manual_backward, no_sync)
        if self.optim_cfg.get("gradient_clip_val"):
            self.configure_gradient_clipping(optimizer, float(self.optim_cfg["gradient_clip_val"]), "norm")
        optimizer.step()
        self.model.clamp_logit_scales()
        scheduler.step()
        return losses

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """CLIP clamps log s to [0, ln 100] right after each optimiser step: before any callback
        (a step checkpoint) sees the weights."""
        super().optimizer_step(*args, **kwargs)
        self.model.clamp_logit_scales()

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning calls this inside its strategy): shard the model as the
        strategy's config says. Nothing to do under every other strategy."""
        from mmpretrain.sharding import FSDP2Strategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy):
            strategy.shard(self.model)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as configured, also for torch's fused AdamW under ``bf16-mixed``.

        Lightning refuses to clip for a fused optimizer under any mixed precision, because with fp16
        loss scaling the fused step unscales the gradients itself (clipping before it would clip
        scaled gradients). bf16 and fp32 have no loss scaling, so the gradients are the true ones
        and clipping them is exact; with fp16 scaling :meth:`configure_optimizers` does not fuse.
        """
        if not gradient_clip_val:
            return
        if any(hasattr(p, "to_local") for p in self.model.parameters()):  # FSDP2: the norm spans every shard
            if (gradient_clip_algorithm or "norm") != "norm":
                raise ValueError("under trainer=fsdp gradients are clipped by norm only; set "
                                 "trainer.gradient_clip_algorithm=norm")
            params = [p for group in optimizer.param_groups for p in group["params"]]
            distributed.clip_grad_norm_(params, float(gradient_clip_val))
        elif _loss_scaler(self.trainer) is None:
            Precision.clip_gradients(self.trainer.precision_plugin, optimizer, gradient_clip_val,
                                     GradClipAlgorithmType(gradient_clip_algorithm or "norm"))
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optim_cfg = dict(self.optim_cfg)
        clipping = self.trainer.gradient_clip_val or optim_cfg.get("gradient_clip_val")
        if clipping and _loss_scaler(self.trainer) is not None:  # fp16: the fused step would unscale after clipping
            if optim_cfg.get("fused") is True:
                raise ValueError("optim.fused=true cannot be combined with gradient clipping under fp16 loss scaling "
                                 "(trainer.precision=16-mixed); use optim.fused=auto, or bf16-mixed")
            optim_cfg["fused"] = False
        optimizer = build_optimizer(self.model, optim_cfg, (self.hparams.get("model") or {}).get("towers"))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = warmup_steps(self.optim_cfg.get("warmup_steps", 0), total)
        factor = warmup_cosine(warmup, total, float(self.optim_cfg.get("min_lr_ratio", 0.0)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation: embed everything, gather across ranks, then score -----------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.model(batch)
        local = {m: out[f"{m}_features"] for m in self.model.modalities if f"{m}_features" in out}
        local |= {k: batch[k] for k in [f"{m}_mask" for m in self.model.modalities] + ["cls"] + self._task_columns()
                  if k in batch}
        cols = self._val_columns(local) | self._caption_columns(batch, self._val_rows)
        self._val_rows += len(cols["cls"])
        for k, v in cols.items():
            self._val[k].append(v)

    def on_validation_epoch_end(self) -> None:
        # A rank that saw no batch (fewer val shards than ranks, or only bad samples) passes {}:
        # validation_metrics gives it empty columns, so it makes the same gathers as the others.
        local = {k: torch.cat(v) for k, v in self._val.items()}
        if self.keep_val_embeddings:
            self.last_val_embeddings = self._labelled_embeddings(local, self.keep_val_embeddings)
        metrics = self.validation_metrics(local)
        self._val.clear()
        self._val_rows = 0
        if metrics:
            self.log_dict(metrics, sync_dist=False)
            summary = ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in metrics.items()
                                if "top1" in k or "mean_R@1" in k)
            self.print(f"epoch {self.current_epoch} step {self.global_step}: {summary}")

    def _labelled_embeddings(self, local: dict[str, torch.Tensor], limit: int) -> dict[str, Any]:
        """This rank's first ``limit`` labelled val rows of every non-text modality, on the CPU:
        ``{"step": global step, "features": {m: [n, D]}, "labels": {m: [n]}}``."""
        labels = local.get("cls")
        out: dict[str, Any] = {"step": self.global_step, "features": {}, "labels": {}}
        for m in self.model.modalities:
            if m == "text" or m not in local or labels is None:
                continue
            rows = (labels >= 0) & local[f"{m}_mask"]
            out["features"][m] = local[m][rows][:limit].float().cpu()
            out["labels"][m] = labels[rows][:limit].cpu()
        return out

    def _val_columns(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
            cols[m] = feats.float() if feats is not None else torch.zeros(n, self.model.embed_dim, device=device)
            cols[f"{m}_mask"] = present & mask.to(device).bool() if mask is not None else present
        labels = local.get("cls")
        cols["cls"] = labels.to(device).long() if labels is not None else torch.full((n,), -1, device=device)
        for key in self._task_columns():  # a task's label per row, -1 where it does not apply
            labels = local.get(key)
            cols[key] = labels.to(device).long() if labels is not None else torch.full((n,), -1, device=device)
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
        cols["probe_negatives_kind"] = kinds.to(self.device).long() if has else torch.zeros(0, dtype=torch.long,
                                                                                             device=self.device)
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
    def validation_metrics(self, local: dict[str, torch.Tensor]) -> dict[str, float]:
        """Retrieval and zero-shot for every pair of modalities present, trained together or not.

        For each pair (a, b), over the rows that carry both: instance retrieval
        ``val/retrieval_R@k/a_to_b`` (row i of a pairs with row i of b) and, with labels,
        class retrieval ``val/retrieval_class_R@k/a_to_b``, ``val/retrieval_class_mAP/a_to_b``
        (relevant = same class). Zero-shot ``val/zeroshot_top1/q_c`` classifies modality q by
        class prototypes of modality c: prompt embeddings when c is text, otherwise the mean
        embedding of each class among the val set's c samples.

        Every rank gathers the embeddings (the keys), then scores only its share of the queries,
        a chunk at a time, and the per-query results are gathered: the metrics cover the whole
        val set, are identical on all ranks, and no rank ever holds an N x N matrix.
        """
        # Every rank gathers the same columns, in the same order, even with no rows of its own.
        rows_local = self._val_columns(local)
        emb = {k: distributed.all_gather_variable(v) for k, v in rows_local.items()}
        extra = self._gather_captions(local, len(rows_local["cls"])) if "text" in self.model.modalities else {}
        task_labels = {k: emb.pop(k) for k in self._task_columns()}
        labels = emb.pop("cls")
        masks = {m: emb.pop(f"{m}_mask") for m in self.model.modalities}
        mods = [m for m in self.model.modalities if masks[m].any()]
        labelled = labels >= 0
        metrics: dict[str, float] = {}
        for i, a in enumerate(mods):
            for b in mods[i + 1 :]:
                both = masks[a] & masks[b]
                if not both.any():
                    continue
                ea, eb = emb[a][both], emb[b][both]
                pair_labels = labels[both] if labelled[both].all() else None
                scores = retrieval_metrics(ea, eb, a, b, a_labels=pair_labels, b_labels=pair_labels, across_ranks=True)
                if "text" in (a, b) and len(extra.get("text_more", ())):
                    other = b if a == "text" else a  # every caption: replaces the first-caption instance numbers
                    multi = rows_multi_caption_retrieval(emb[other], emb["text"], extra["text_more"],
                                                         extra["text_more_owner"], both, other, "text",
                                                         across_ranks=True)
                    scores |= {k: v for k, v in multi.items() if k.startswith(("R@", "mean_rank/", "median_rank/"))}
                forward, backward = f"{a}_to_{b}", f"{b}_to_{a}"
                scores[f"rsum/{a}_{b}"] = 100 * sum(scores[f"R@{k}/{d}"] for k in (1, 5, 10) for d in (forward, backward))
                scores[f"mean_R@1/{a}_{b}"] = (scores[f"R@1/{forward}"] + scores[f"R@1/{backward}"]) / 2
                metrics.update({f"val/retrieval_{k}": v for k, v in scores.items()})
                metrics.update({f"val/{name}": v.item() for name, v in self._val_loss(ea, eb, a, b).items()})
        if labelled.any():
            metrics |= self._zero_shot(emb, masks, labels, labelled, mods)
        if "text" in mods:
            metrics |= self._probe(emb, masks, extra, mods) | self._zero_shot_tasks(emb, masks, task_labels, mods)
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
            scores = compositional_probe(emb[m], emb["text"], negatives[keep], owner[keep], kinds[keep], NEGATIVE_KINDS)
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
                    classes = class_embeddings(prompts["classnames"], prompts["templates"], self._encode_prompts)
                acc = zero_shot_accuracy(emb[q][rows], labels[rows], classes.to(emb[q].dtype), across_ranks=True)
                metrics[f"val/zeroshot_top1/{task}/{q}_text"] = acc["top1"]
                metrics[f"val/zeroshot_top5/{task}/{q}_text"] = acc["top5"]
        return metrics

    def _val_loss(self, ea: torch.Tensor, eb: torch.Tensor, a: str, b: str) -> dict[str, torch.Tensor]:
        """The loss over the whole val set as one batch (the embeddings are already global).

        InfoNCE and SigLIP go block of rows by block of rows (same value, memory O(N x tile)),
        each rank taking its share of the blocks; another loss runs as it is, on the whole set (N x N)."""
        outputs = {f"{a}_features": ea, f"{b}_features": eb} | self.model.logit_scale_outputs()
        if not isinstance(self.loss, (InfoNCE, SigLIP)):
            return self.loss(outputs, gather=False)
        out = {}
        for (x, y), w in zip(self.loss.pairs, self.loss.weights):
            if {x, y} == {a, b}:
                fx, fy = outputs[f"{x}_features"], outputs[f"{y}_features"]
                scale = logit_scale_for(outputs, x, y)
                if isinstance(self.loss, SigLIP):
                    value = _split_siglip_loss(fx, fy, scale, outputs["logit_bias"], DEFAULT_TILE)
                else:
                    value = _split_clip_loss(fx, fy, scale, self.loss.tile_size)
                out[f"{pair_name(x, y)}_loss"] = w * value
        return out

    def _zero_shot(self, emb, masks, labels, labelled, mods) -> dict[str, float]:
        num_classes = len(self.zeroshot["classnames"]) if self.zeroshot else int(labels.max().item()) + 1
        metrics: dict[str, float] = {}
        for c in mods:
            if c == "text":
                if not self.zeroshot:
                    continue
                classes = class_embeddings(self.zeroshot["classnames"], self.zeroshot["templates"], self._encode_prompts)
            else:
                rows = masks[c] & labelled
                if not rows.any():
                    continue
                classes = class_prototypes(emb[c][rows], labels[rows], num_classes)
            for q in mods:
                rows = masks[q] & labelled
                if q == c or (q == "text" and c != "text") or not rows.any():
                    continue
                acc = zero_shot_accuracy(emb[q][rows], labels[rows], classes.to(emb[q].dtype), across_ranks=True)
                metrics[f"val/zeroshot_top1/{q}_{c}"] = acc["top1"]
                metrics[f"val/zeroshot_top5/{q}_{c}"] = acc["top5"]
        return metrics

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokenize = self._text_preprocess()
        tokens = self.model.towers["text"].trim_input(torch.stack([tokenize(p) for p in prompts])).to(self.device)
        return self.model.encode_text(tokens)

    def _text_preprocess(self):
        if not hasattr(self, "_tokenize"):
            self._tokenize = self.model.towers["text"].preprocess(False)
        return self._tokenize


def _split_clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, tile: int) -> torch.Tensor:
    """CLIP's symmetric InfoNCE of ``a``/``b`` (identical on every rank), tiled.

    The rows are cut into blocks of ``tile`` at the same places whatever the world size; each
    rank takes its share of the blocks, sums their cross-entropies (both directions) in float64,
    and the sums are all-reduced: the same value, to float32 rounding, on 1 rank or many."""
    n = a.shape[0]
    starts = range(0, n, tile)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in starts[distributed.share(len(starts))]:
        rows = slice(start, min(start + tile, n))
        for q, k in ((a, b), (b, a)):
            total += tiled_cross_entropy(q[rows], k, scale, start, tile).double() * (rows.stop - rows.start)
    return (distributed.all_reduce_sum(total) / (2 * n)).float()


def _split_siglip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                       tile: int) -> torch.Tensor:
    """SigLIP's loss of ``a`` against ``b`` (identical on every rank; ``siglip_loss(gather=False)``),
    ``tile`` rows of logits at a time, the blocks shared among ranks as in :func:`_split_clip_loss`."""
    n = a.shape[0]
    starts = range(0, n, tile)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in starts[distributed.share(len(starts))]:
        q = a[start : start + tile]
        logits = scale * q @ b.T + bias
        signs = -torch.ones_like(logits)
        rows = torch.arange(q.shape[0], device=a.device)
        signs[rows, start + rows] = 1.0
        total += -torch.nn.functional.logsigmoid(signs * logits).sum().double()
    return (distributed.all_reduce_sum(total) / n).float()


def _loss_scaler(trainer: L.Trainer) -> Any:
    """The fp16 gradient scaler of the trainer's precision plugin; None for fp32 and bf16."""
    return getattr(trainer.precision_plugin, "scaler", None)


def _may_yield_partial_batches(datamodule: Any) -> bool:
    """Whether the training stream can yield rows lacking a modality: ``data.on_missing=partial``
    or sources declaring different modalities. From the config only."""
    cfg = getattr(datamodule, "cfg", None) or {}
    sources = getattr(datamodule, "sources", None) or []
    declared = {tuple(sorted(getattr(s, "modalities", None) or [])) for s in sources}
    return cfg.get("on_missing", "skip") == "partial" or len(declared) > 1


def _batch_size(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return v.shape[0]
    return 1
