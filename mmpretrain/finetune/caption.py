"""``finetune task=caption``: a caption decoder trained on a pretrained image (or video) tower.

The pretrained model keeps its towers; a new :class:`~mmpretrain.towers.decoder.CaptionDecoder`
(``task.decoder`` sizes it; the tokenizer is the text tower's) learns to caption from the tower's
tokens by teacher forcing, one of each sample's captions per pass. ``task.lock_image=true`` freezes the
tower (and its norm statistics), ``false`` tunes it at ``lr * image_lr_scale``. A model that already has
a decoder (trained with ``loss=coca``) keeps it unless ``task.new_decoder=true``. Validation logs the
caption loss and, for image towers, the captioning scores of ``data.val.captioning``; the run ends with
an export (``<run>/export``) that ``mmpretrain caption`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mmpretrain.evaluation.captioning import evaluation_from_config, write_caption_examples
from mmpretrain.export import export
from mmpretrain.finetune.module import adamw_warmup_cosine, task_trainer
from mmpretrain.io import write_text_atomic
from mmpretrain.losses.coca import caption_loss
from mmpretrain.model import ContrastiveModel
from mmpretrain.towers.decoder import build_decoder
from mmpretrain.training.datamodule import ContrastiveDataModule, sources_from_config


class CaptionModule(L.LightningModule):
    """Teacher-forced token cross-entropy of the model's decoder (``train/caption_loss``,
    ``val/caption_loss``); the captioning scores at the end of each validation."""

    def __init__(self, model: ContrastiveModel, task: dict[str, Any], evaluation=None, hparams=None):
        super().__init__()
        self.model, self.task, self.evaluation = model, task, evaluation
        self.lock_image = bool(task.get("lock_image", True))
        self.save_hyperparameters(hparams or {}, logger=False)
        self._val_sums = torch.zeros(2)

    def _nll(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.model.decoder
        tower = self.model.towers[decoder.source]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lock_image):
            _, tokens = tower.forward_with_tokens(batch[decoder.source])
        text_tokens = None
        if decoder.reads_text_tower:
            _, text_tokens = self.model.towers["text"].forward_with_tokens(batch["text"])
        return decoder.caption_nll(tokens, batch["text"], text_tokens)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        nll, count = self._nll(batch)
        loss = caption_loss(nll, count)
        self.log("train/caption_loss", loss, prog_bar=True, batch_size=len(nll))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        nll, count = self._nll(batch)
        self._val_sums = self._val_sums.to(nll.device) + torch.stack([nll.sum(), count.sum().to(nll.dtype)])

    def on_validation_epoch_end(self) -> None:
        from mmpretrain.runtime import distributed

        sums = distributed.all_reduce_sum(self._val_sums.clone())
        self._val_sums = torch.zeros(2)
        metrics = {"val/caption_loss": float(sums[0] / sums[1].clamp(min=1))}
        if self.evaluation is not None and not self.trainer.sanity_checking:
            metrics |= {f"val/{k}": v for k, v in self.evaluation.metrics(self.model).items()}
        self.log_dict(metrics, sync_dist=False)
        self.print(
            ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in metrics.items() if "BLEU-" not in k)
        )

    def train(self, mode: bool = True) -> CaptionModule:
        super().train(mode)
        if self.lock_image:  # a locked tower keeps dropout off and its norm statistics as loaded
            self.model.towers[self.model.decoder.source].eval()
        return self

    def configure_optimizers(self):
        lr = float(self.task["lr"])
        tower = self.model.towers[self.model.decoder.source]
        groups = [{"params": [p for p in self.model.decoder.parameters() if p.requires_grad], "lr": lr}]
        if not self.lock_image:
            scale = float(self.task.get("image_lr_scale", 0.1))
            groups.append({"params": [p for p in tower.parameters() if p.requires_grad], "lr": lr * scale})
        if self.model.decoder.reads_text_tower:  # open_clip's CoCa decoder reads the text tower's tokens
            groups.append({"params": list(self.model.towers["text"].parameters()), "lr": lr})
        weight_decay, warmup = (
            float(self.task.get("weight_decay", 0.0)),
            float(self.task.get("warmup_steps", 0.0)),
        )
        return adamw_warmup_cosine(self, groups, weight_decay, warmup)


def run(
    task: dict[str, Any],
    model: ContrastiveModel,
    data: dict[str, Any],
    trainer: dict[str, Any],
    run_dir: Path,
    seed: int = 0,
) -> dict[str, float]:
    """Train (and validate) a caption decoder on ``model``'s image tower; the final metrics."""
    if "text" not in model.towers:
        raise ValueError(
            "task=caption needs the pretrained model's text tower for its tokenizer; it has "
            f"{model.modalities}"
        )
    if model.decoder is None or task.get("new_decoder"):
        model.decoder = build_decoder(dict(task.get("decoder") or {}), dict(model.towers))
    source = model.decoder.source
    model.train()
    tower = model.towers[source]
    if task.get("lock_image", True):
        tower.lock(0, freeze_norm_stats=True)
    if not model.decoder.reads_text_tower:
        model.towers["text"].requires_grad_(False)
    for m in model.modalities:
        if m not in (source, "text"):
            model.towers[m].requires_grad_(False)
    datamodule = ContrastiveDataModule(
        data | {"on_missing": "skip"}, lambda train: _preprocess(model, source, train), seed=seed
    )
    evaluation = None
    if source == "image":  # captioning scores read images (a video decoder is scored by its loss)
        train_urls = [u for s in sources_from_config(data) for u in s.urls]
        evaluation = evaluation_from_config(
            (data.get("val") or {}).get("captioning"),
            datamodule.val_urls,
            train_urls,
            data.get("caption_field", "caption"),
            data.get("caption_keys"),
        )
    module = CaptionModule(model, task, evaluation, hparams={"model": model.config(), "task": task})
    fit = task_trainer(trainer, task, run_dir)
    fit.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in fit.callback_metrics.items()}
    if fit.is_global_zero:
        write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
        export(model.eval(), run_dir / "export", extra={"metrics": metrics, "finetune_task": task})
        if evaluation is not None and evaluation.last:
            write_caption_examples(evaluation, run_dir)
    return metrics


def _preprocess(model: ContrastiveModel, source: str, train: bool) -> dict[str, Any]:
    prep = model.preprocess(train)
    return {source: prep[source], "text": prep["text"]}
