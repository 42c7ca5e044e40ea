"""Weight EMA (``model.ema``): an exponential moving average of the model's weights, kept by timm's
``ModelEmaV3`` and driven by a Lightning callback.

- Updated after every ``every_n_steps``-th optimizer step with timm's decay (``warmup``: timm's
  ``1 - (1 + step)^(-2/3)`` ramp up to ``decay``, so early averages do not hold the random init).
- Validation runs on the EMA weights (``val/*``; with ``eval_both`` also the raw ones as ``val_raw/*``):
  the weights are swapped into the module for the validation and back after it.
- Checkpoints hold the average as ``ema_state_dict`` beside the raw ``state_dict`` (which stays what
  every other reader of a checkpoint expects), restored on resume; ``export`` writes it by default.
- Every rank keeps the same average (its updates read the same weights); ``trainer=fsdp`` is refused.
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L
import torch
from timm.utils import ModelEmaV3

from mmpretrain.evaluation.validate import ValidationCollector
from mmpretrain.export import EMA_KEY

#: The prefix of the raw weights' validation metrics with ``eval_both`` (``val/...`` -> ``val_raw/...``).
RAW_PREFIX = "val_raw/"


class WeightEMA(L.Callback):
    """The EMA of ``pl_module.model`` (a :class:`~mmpretrain.model.ContrastiveModel`); see the module doc."""

    def __init__(
        self,
        decay: float = 0.9998,
        warmup: bool = True,
        every_n_steps: int = 1,
        on_cpu: bool = False,
        eval_both: bool = False,
    ):
        if not 0 < decay < 1:
            raise ValueError(f"model.ema.decay must be in (0, 1), got {decay}")
        if int(every_n_steps) < 1:
            raise ValueError(f"model.ema.every_n_steps must be >= 1, got {every_n_steps}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.every_n_steps, self.on_cpu, self.eval_both = int(every_n_steps), bool(on_cpu), bool(eval_both)
        self.ema: ModelEmaV3 | None = None
        self.updates = 0  # the EMA's update count: timm's decay schedule reads it
        self._last_step = 0  # trainer.global_step of the last update
        self._restored: dict[str, torch.Tensor] | None = None  # from a checkpoint, loaded at fit start
        self._swapped = False

    @property
    def state_key(self) -> str:
        return "WeightEMA"

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (outside a validation: the EMA weights)."""
        if self.ema is None:
            raise RuntimeError("the EMA exists once fit has started")
        return self.ema.module

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from mmpretrain.runtime.fsdp import FSDP2Strategy

        if isinstance(trainer.strategy, FSDP2Strategy):
            raise ValueError(
                "model.ema.enabled=true is not supported under trainer=fsdp (the average would need to be "
                "sharded like the model); use trainer=ddp, or train without model.ema"
            )
        model = pl_module.model
        self.ema = ModelEmaV3(
            model,
            decay=self.decay,
            use_warmup=self.warmup,
            device=torch.device("cpu") if self.on_cpu else None,
        )
        self.ema.requires_grad_(False)
        if self._restored is not None:
            self.ema.module.load_state_dict(self._restored, strict=True)
            self._restored = None
        if self.eval_both:
            # After the swap in on_validation_epoch_start the averaged module holds the raw weights.
            pl_module.val_raw = ValidationCollector(
                self.ema.module, pl_module.loss, pl_module.zeroshot, pl_module.zeroshot_tasks
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # optimizer steps so far (a skipped batch of accumulation: unchanged)
        if step > self._last_step and step % self.every_n_steps == 0:
            self.updates += 1
            self.ema.update(pl_module.model, step=self.updates)
            self._last_step = step

    # -- validation on the average (and the raw weights with eval_both) ----------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is not None and trainer.state.fn == "fit":
            self._swap(pl_module.model)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:  # after the module's on_validation_epoch_end computed the metrics
            self._swap(pl_module.model)

    @torch.no_grad()
    def _swap(self, model: torch.nn.Module) -> None:
        mine = itertools.chain(self.ema.module.parameters(), self.ema.module.buffers())
        theirs = itertools.chain(model.parameters(), model.buffers())
        for a, b in zip(mine, theirs, strict=True):
            held = a.detach().clone()
            a.copy_(b.detach())
            b.copy_(held)
        self._swapped = not self._swapped

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "last_step": self._last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates, self._last_step = int(state["updates"]), int(state["last_step"])

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.ema is not None:
            if self._swapped:  # a checkpoint written during validation: store the average, not the raw
                raise RuntimeError("a checkpoint was saved while the EMA weights were swapped in")
            checkpoint[EMA_KEY] = {k: v.detach().clone() for k, v in self.ema.module.state_dict().items()}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get(EMA_KEY)
        if state is None:  # resuming a run that had no EMA: the average starts from the loaded weights
            pl_module.print("model.ema: the checkpoint holds no EMA; it starts from the checkpoint's weights")
            state = {
                k.removeprefix("model."): v
                for k, v in checkpoint["state_dict"].items()
                if k.startswith("model.")
            }
            self.updates = 0
        self._restored = state


def ema_callback(cfg: Any) -> WeightEMA | None:
    """The callback of ``model.ema`` (a config block), or None when it is absent or not enabled."""
    if not cfg or not cfg.get("enabled"):
        return None
    known = {"enabled", "decay", "warmup", "every_n_steps", "on_cpu", "eval_both"}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"model.ema has unknown keys {sorted(unknown)}; use {sorted(known)}")
    return WeightEMA(**{k: v for k, v in cfg.items() if k != "enabled"})
