"""LightningModule for every fine-tuning task: cross-entropy on ``batch["cls"]``; accuracy, macro-F1
and the confusion matrix from torchmetrics over the whole validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from mmpretrain.training.monitor import CSVLogger
from mmpretrain.training.optim import warmup_cosine, warmup_steps


class ClassifierModule(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        param_groups: list[dict[str, Any]],
        weight_decay: float = 0.0,
        warmup_steps: float = 0.0,
        label_smoothing: float = 0.0,
        hparams: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.net = net
        self.groups = param_groups
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.label_smoothing = label_smoothing
        # Plain containers only: the checkpoint stays loadable with torch.load(weights_only=True).
        self.save_hyperparameters(hparams or {}, logger=False)
        self.accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.f1 = MulticlassF1Score(num_classes, average="macro")
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.last_confusion: torch.Tensor | None = None

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.net(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        labels = _labels(batch)
        logits = self.net(batch)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.shape[0])
        self.log("train/accuracy", (logits.argmax(1) == labels).float().mean(), batch_size=labels.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        labels = _labels(batch)
        logits = self.net(batch)
        self.log("val/loss", F.cross_entropy(logits, labels), batch_size=labels.shape[0])
        preds = logits.argmax(1)
        self.accuracy.update(preds, labels)
        self.f1.update(preds, labels)
        self.confusion.update(preds, labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val/accuracy", self.accuracy.compute(), prog_bar=True)
        self.log("val/f1_macro", self.f1.compute())
        self.last_confusion = self.confusion.compute().cpu()
        for metric in (self.accuracy, self.f1, self.confusion):
            metric.reset()

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, self.groups, self.weight_decay, self.warmup_steps)


def _labels(batch: dict[str, Any]) -> torch.Tensor:
    if "cls" not in batch:
        raise ValueError(
            "fine-tuning needs a class label per sample: the shards have no 'cls' field "
            "(write an integer label as <key>.cls in both train/ and val/ shards)"
        )
    labels = batch["cls"]
    if (labels < 0).any():
        raise ValueError("some samples have no 'cls' label; every train/ and val/ sample needs one")
    return labels.long()


def adamw_warmup_cosine(
    module: L.LightningModule, groups: list[dict[str, Any]], weight_decay: float, warmup: float
) -> dict[str, Any]:
    """AdamW over ``groups`` (a group's ``name`` dropped) with a per-step warm-up + cosine schedule over the
    run's optimizer steps: what every fine-tuning task's ``configure_optimizers`` returns."""
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "name"} for g in groups], weight_decay=weight_decay
    )
    total = int(module.trainer.estimated_stepping_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(warmup_steps(warmup, total), total)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def task_trainer(trainer: dict[str, Any], task: dict[str, Any], run_dir: Path) -> L.Trainer:
    """The Trainer of a fine-tuning task: ``task.epochs`` epochs, metrics.csv in the run directory, the
    last checkpoint in ``checkpoints/``."""
    return L.Trainer(
        **trainer | {"max_epochs": int(task["epochs"]), "max_steps": -1},
        default_root_dir=str(run_dir),
        logger=CSVLogger(save_dir=str(run_dir), name="", version=""),
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0
            )
        ],
    )
