"""Weight EMA (``model.ema``): an exponential moving average of the model's weights, kept by timm's
``ModelEmaV3`` and driven by a Lightning callback.

- Updated after every ``every_n_steps``-th optimizer step with timm's decay (``warmup``: timm's
  ``1 - (1 + step)^(-2/3)`` ramp up to ``decay``, so early averages do not hold the random init).
- Validation runs on the EMA weights (``val/*``; with ``eval_both`` also the raw ones as ``val_raw/*``):
  the weights are swapped into the module for the validation and back after it.
- Checkpoints hold the average as ``ema_state_dict`` beside the raw ``state_dict`` (which stays what
  every other reader of a checkpoint expects), restored on resume; ``export`` writes it by default.
- Every rank keeps the same average (its updates read the same weights). Under ``trainer=fsdp`` the
  average is sharded like the model (:class:`ShardedModelEma`: each rank averages its own shards, memory
  parameters/world), saved into and restored from the sharded checkpoint, gathered for the export.
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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Under ``trainer=fsdp``: the copy of the model the average starts as, taken before the strategy
        shards the model (a sharded module cannot be copied); :meth:`on_fit_start` shards it alike."""
        if self.ema is not None or not _fsdp(trainer):
            return
        if self.on_cpu:
            raise ValueError(
                "model.ema.on_cpu=true is not supported under trainer=fsdp: the average is sharded like the "
                "model (parameters/world per rank); trainer.strategy.cpu_offload=true keeps both in host "
                "memory"
            )
        from mmpretrain.runtime.fsdp import is_sharded

        if is_sharded(pl_module.model):
            raise RuntimeError("model.ema under trainer=fsdp: the model was sharded before the EMA copied it")
        self.ema = ShardedModelEma(pl_module.model, decay=self.decay, use_warmup=self.warmup)
        self.ema.requires_grad_(False)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        if _fsdp(trainer):
            from mmpretrain.runtime.fsdp import is_sharded

            if not is_sharded(self.ema.module):
                self.ema.module.to(dtype=_local(next(model.parameters())).dtype)  # a *-true precision's
                trainer.strategy.shard(self.ema.module)
                trainer.strategy.place(self.ema.module)
                self.ema.on_device()
            # the weights fit starts from; a resume restores after this hook (on_load_checkpoint)
            self.ema.set(model)
        else:
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
        # FSDP2: no gathered copy may outlive the swap (reshard_after_forward=false keeps them)
        from torch.distributed.fsdp import FSDPModule

        for m in itertools.chain(self.ema.module.modules(), model.modules()):
            if isinstance(m, FSDPModule):
                m.reshard()
        mine = itertools.chain(self.ema.module.parameters(), self.ema.module.buffers())
        theirs = itertools.chain(model.parameters(), model.buffers())
        for a, b in zip(mine, theirs, strict=True):
            a, b = _local(a), _local(b)  # under FSDP each rank swaps its own shards
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
            state = self.ema.module.state_dict()
            if isinstance(self.ema, ShardedModelEma):
                from mmpretrain.runtime.fsdp import full_state_dict

                # DTensors: each rank writes its shards (fsdp.py); a whole-file checkpoint gathers them
                sharded = trainer.strategy.saves_sharded
                checkpoint[EMA_KEY] = state if sharded else full_state_dict(self.ema.module)
            else:
                checkpoint[EMA_KEY] = {k: v.detach().clone() for k, v in state.items()}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from mmpretrain.runtime.fsdp import ShardedEntry

        state = checkpoint.get(EMA_KEY)
        if isinstance(state, ShardedEntry):  # trainer=fsdp restores after on_fit_start sharded the average
            state.load_into(self.ema.module)
            return
        if state is None:  # resuming a run that had no EMA: the average starts from the loaded weights
            pl_module.print("model.ema: the checkpoint holds no EMA; it starts from the checkpoint's weights")
            self.updates = 0
            if isinstance(self.ema, ShardedModelEma):  # trainer=fsdp: the model was restored just now
                self.ema.set(pl_module.model)
                return
            state = {
                k.removeprefix("model."): v
                for k, v in checkpoint["state_dict"].items()
                if k.startswith("model.")
            }
        if isinstance(self.ema, ShardedModelEma):  # trainer=fsdp resuming a whole checkpoint (a DDP run's)
            from mmpretrain.runtime.fsdp import load_full_state_dict

            load_full_state_dict(self.ema.module, state)
            return
        self._restored = state


class ShardedModelEma(ModelEmaV3):
    """timm's EMA of a model sharded by FSDP2, its module sharded alike: timm's decay schedule and its
    lerp (stochastic rounding for bf16) applied to each rank's local shards. torch's foreach lerp refuses
    DTensors mixed with plain tensors (buffers, the whole temperatures), so the update hands timm the
    local tensors of both state dicts."""

    def on_device(self) -> None:
        """After sharding moved the module: timm's rounding generator on the module's device (it was
        made on the host, where the copy was taken)."""
        device = _local(next(self.module.parameters())).device
        self._sr_generator = torch.Generator(device=device)
        self._sr_generator.manual_seed(self.stochastic_rounding_seed)

    @torch.no_grad()
    def apply_update_(self, model: torch.nn.Module, decay: float) -> None:
        ema_values, model_values = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            e, m = _local(e), _local(m).to(_local(e).device)
            if e.is_floating_point():
                ema_values.append(e)
                model_values.append(m)
            else:
                e.copy_(m)
        self._foreach_lerp_(ema_values, model_values, weight=1.0 - decay)

    @torch.no_grad()
    def set(self, model: torch.nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            _local(e).copy_(_local(m))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the parameter), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def _fsdp(trainer: L.Trainer) -> bool:
    from mmpretrain.runtime.fsdp import FSDP2Strategy

    return isinstance(trainer.strategy, FSDP2Strategy)


def ema_callback(cfg: Any) -> WeightEMA | None:
    """The callback of ``model.ema`` (a config block), or None when it is absent or not enabled."""
    if not cfg or not cfg.get("enabled"):
        return None
    known = {"enabled", "decay", "warmup", "every_n_steps", "on_cpu", "eval_both"}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"model.ema has unknown keys {sorted(unknown)}; use {sorted(known)}")
    return WeightEMA(**{k: v for k, v in cfg.items() if k != "enabled"})
