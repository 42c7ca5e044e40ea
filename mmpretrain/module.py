"""LightningModule: a ContrastiveModel + a loss + the optimiser, and validation on embeddings."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import lightning as L
import torch

from mmpretrain import distributed
from mmpretrain.evaluation import class_embeddings, retrieval_metrics, zero_shot_accuracy
from mmpretrain.gradcache import grad_cache_backward
from mmpretrain.model import ContrastiveModel
from mmpretrain.optim import build_optimizer, warmup_cosine


class ContrastiveModule(L.LightningModule):
    def __init__(
        self,
        model: ContrastiveModel,
        loss: torch.nn.Module,
        optim: dict[str, Any],
        zeroshot: dict[str, list[str]] | None = None,
        hparams: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self.loss = loss
        self.optim_cfg = optim
        self.zeroshot = zeroshot  # {"classnames": [...], "templates": [...]}
        # Plain containers only: checkpoints stay loadable with torch.load(weights_only=True).
        self.save_hyperparameters(hparams or {"model": model.config()}, logger=False)
        self._val: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._last_step_time: float | None = None
        self.skipped_total = 0
        # optim.grad_cache_chunks=k: the loss of the whole batch, encoded k micro-batches at a time
        # (feature caching), which needs manual optimisation.
        self.grad_cache_chunks = int(optim.get("grad_cache_chunks") or 1)
        self.automatic_optimization = self.grad_cache_chunks <= 1

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model(batch)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self._grad_cache_step(batch) if self.grad_cache_chunks > 1 else self.loss(self.model(batch))
        total = sum(losses.values())
        bs = _batch_size(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=bs)
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        self._log_stream_stats(batch, bs)
        return total

    def _log_stream_stats(self, batch: dict[str, Any], bs: int) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            rate = bs * distributed.world_size() / (now - self._last_step_time)
            self.log("train/samples_per_s", rate, prog_bar=True, batch_size=bs)
        self._last_step_time = now
        skipped = batch.get("__skipped__")
        if skipped is not None:
            self.skipped_total += int(distributed.all_reduce_sum(skipped.reshape(1).to(self.device)).item())
            self.log("train/skipped_samples", float(self.skipped_total), batch_size=bs)
        for k, v in self.model.logit_scales.items():
            self.log(f"train/logit_scale/{k}", v.exp(), batch_size=bs)
        if self.model.logit_bias is not None:
            self.log("train/logit_bias", self.model.logit_bias.detach(), batch_size=bs)

    def _grad_cache_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        losses = grad_cache_backward(self.model, self.loss, batch, self.grad_cache_chunks, self.manual_backward)
        if self.optim_cfg.get("gradient_clip_val"):
            self.clip_gradients(optimizer, gradient_clip_val=float(self.optim_cfg["gradient_clip_val"]), gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()
        return losses

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.model.clamp_logit_scales()

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg, (self.hparams.get("model") or {}).get("towers"))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(self.optim_cfg.get("warmup_steps", 0))
        if 0 < warmup < 1:  # a fraction of the run
            warmup = int(warmup * total)
        factor = warmup_cosine(warmup, total, float(self.optim_cfg.get("min_lr_ratio", 0.0)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation: embed everything, gather across ranks, then score -----------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.model(batch)
        for m in self.model.modalities:
            if f"{m}_features" in out:
                self._val[m].append(out[f"{m}_features"].float())
        if "cls" in batch:
            self._val["cls"].append(batch["cls"])

    def on_validation_epoch_end(self) -> None:
        metrics = self.validation_metrics({k: torch.cat(v) for k, v in self._val.items()})
        self._val.clear()
        if metrics:
            self.log_dict(metrics, sync_dist=False)
            summary = ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in metrics.items() if "top1" in k)
            self.print(f"epoch {self.current_epoch} step {self.global_step}: {summary}")

    @torch.no_grad()
    def validation_metrics(self, local: dict[str, torch.Tensor]) -> dict[str, float]:
        # Gather every rank's share so metrics cover the whole val set (identical on all ranks).
        emb = {k: distributed.all_gather_variable(v) for k, v in local.items()}
        labels = emb.pop("cls", None)
        metrics: dict[str, float] = {}
        mods = [m for m in self.model.modalities if m in emb]
        for i, a in enumerate(mods):
            for b in mods[i + 1 :]:
                scores = retrieval_metrics(emb[a], emb[b], a, b)
                metrics.update({f"val/retrieval_{k}": v for k, v in scores.items()})
                # Loss over the whole val set as one batch (no gathering: embeddings are global).
                outputs = {f"{a}_features": emb[a], f"{b}_features": emb[b]} | self.model.logit_scale_outputs()
                for name, value in self.loss(outputs, gather=False).items():
                    metrics[f"val/{name}"] = value.item()
        if labels is not None and self.zeroshot and "text" in self.model.modalities:
            classes = class_embeddings(self.zeroshot["classnames"], self.zeroshot["templates"], self._encode_prompts)
            for m in mods:
                if m != "text":
                    acc = zero_shot_accuracy(emb[m], labels, classes)
                    metrics[f"val/zeroshot_top1/{m}_text"] = acc["top1"]
                    metrics[f"val/zeroshot_top5/{m}_text"] = acc["top5"]
        return metrics

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokenize = self._text_preprocess()
        tokens = torch.stack([tokenize(p) for p in prompts]).to(self.device)
        return self.model.encode_text(tokens)

    def _text_preprocess(self):
        if not hasattr(self, "_tokenize"):
            self._tokenize = self.model.towers["text"].preprocess(False)
        return self._tokenize


def _batch_size(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return v.shape[0]
    return 1
