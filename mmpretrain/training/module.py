"""The LightningModule: a ContrastiveModel + a loss + the optimiser. The training step sums the loss's
``*_loss`` terms; validation hands each batch to the :class:`ValidationCollector` and logs its metrics."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.enums import GradClipAlgorithmType

from mmpretrain.evaluation.validate import ValidationCollector
from mmpretrain.model import ContrastiveModel
from mmpretrain.runtime import distributed
from mmpretrain.runtime.kernels import attention_context
from mmpretrain.training.gradcache import batch_size, grad_cache_backward
from mmpretrain.training.optim import build_optimizer, warmup_cosine, warmup_steps
from mmpretrain.training.steplog import StepLog

# Validation metrics are computed from every rank's gathered outputs, the same values on each rank, and
# logged without sync_dist (it would only average equal numbers); Lightning's advice to sync them,
# printed once per metric name under DDP, is noise here.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('val(_raw)?/")


class ContrastiveModule(L.LightningModule):
    def __init__(
        self,
        model: ContrastiveModel,
        loss: torch.nn.Module,
        optim: dict[str, Any],
        zeroshot: dict[str, list[str]] | None = None,
        hparams: dict[str, Any] | None = None,
        zeroshot_tasks: dict[str, dict[str, list[str]]] | None = None,
        distill: torch.nn.Module | None = None,
    ):
        super().__init__()
        self.model = model
        self.loss = loss
        self.optim_cfg = optim
        self.zeroshot = zeroshot  # {"classnames": [...], "templates": [...]}
        # {task: {"classnames", "templates"}}: zero-shot of each task over the val rows labelled for it
        self.zeroshot_tasks = zeroshot_tasks or {}
        self.val = ValidationCollector(model, loss, zeroshot, self.zeroshot_tasks)
        # model.ema.eval_both: a collector of the raw weights while the EMA's are validated (set by
        # training.ema.WeightEMA); its metrics are logged as val_raw/*.
        self.val_raw: ValidationCollector | None = None
        # Set by monitor.RunPlots: keep up to this many labelled rows of each validation's embeddings
        # (``last_val_embeddings``), so the end-of-run plots need no second pass over the val set.
        self.keep_val_embeddings = 0
        self.last_val_embeddings: dict[str, Any] | None = None
        # Plain containers only: checkpoints stay loadable with torch.load(weights_only=True).
        self.save_hyperparameters(hparams or {"model": model.config()}, logger=False)
        # The metrics of the steps that write logs: one reduction and one host read per such step.
        self.steplog = StepLog()
        self._rate_clock: tuple[float, int] | None = None  # (time, samples seen) at the last flush
        # The SDPA backends the training forward (hence its backward) uses; None: torch's choice. Set from
        # attention_kernel (runtime.kernels): the math kernel for short attention under CPU bf16.
        self.attention_backends: list[Any] | None = None
        self._samples_seen = 0  # this rank's training samples (host count)
        self._log_at = (0, 0)  # (step, epoch) of the rows the next flush writes
        self._skipped_total = 0  # summed over ranks, as of the last flush or checkpoint
        self._skipped_local = 0  # this rank's samples skipped since then (host ints from the collate)
        self._sharded: bool | None = None  # FSDP2 parameters (DTensors), known once the strategy has run
        self._grad_norm: tuple[int, torch.Tensor] | None = None  # (step, total norm) of this step's gradients
        # optim.grad_cache_chunks=k: the loss of the whole batch, encoded k micro-batches at a time
        # (feature caching), which needs manual optimisation.
        self.grad_cache_chunks = int(optim.get("grad_cache_chunks") or 1)
        self.automatic_optimization = self.grad_cache_chunks <= 1
        if self.grad_cache_chunks > 1 and getattr(loss, "hard_negatives", False):
            raise ValueError(
                "loss.hard_negatives=true cannot be combined with optim.grad_cache_chunks>1 "
                "(the cached features would not include the negatives)"
            )
        self._partial_stream = False  # set at train start: masks on every rank (see _masks_on_every_rank)
        # evaluation.captioning.CaptionEvaluation of a model with a caption decoder (set by the train command)
        self.captioning = None
        # training.distill.Distillation (distill.teacher): its terms join the loss's; its heads train too
        self.distill = distill

    @property
    def skipped_total(self) -> int:
        """Samples skipped so far, summed over ranks, as of the last step that logged; with
        :meth:`sync_skipped` (a collective: every rank calls it) up to now."""
        return self._skipped_total

    @skipped_total.setter
    def skipped_total(self, value: int) -> None:
        self._skipped_total, self._skipped_local = int(value), 0

    def sync_skipped(self) -> int:
        """The skipped samples summed over ranks up to now (every rank must call it: a collective)."""
        if distributed.world_size() > 1:
            local = torch.tensor([self._skipped_local], dtype=torch.float64, device=self.device)
            self._skipped_local = int(distributed.all_reduce_sum(local).item())
        self._skipped_total, self._skipped_local = self._skipped_total + self._skipped_local, 0
        return self._skipped_total

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model(batch)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # Due until the optimizer step flushes it (with gradient accumulation, a later batch's step).
        newly_due = not self.steplog.due and self._logs_written_after_this_step()
        if newly_due:
            self.steplog.due = True
            self._log_at = (self.trainer.global_step, self.current_epoch)  # as Lightning numbers its rows
        self._skipped_local += int(batch.pop("__skipped__", 0))  # a host int (the collate's count)
        batch = self._masks_on_every_rank(batch)
        with attention_context(self.attention_backends):
            if self.grad_cache_chunks > 1:
                losses = self._grad_cache_step(batch)
            elif self.distill is not None:
                losses = self._distill_losses(self.distill.student(self.model)(batch), batch)
            else:
                losses = self.loss(self.model(batch))
        total = sum(losses.values())
        self._samples_seen += batch_size(batch)
        if newly_due:
            self._log_step(losses, total)
        return total

    def _distill_losses(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The loss's terms and the distillation's (the teacher's embeddings of ``batch``, once a step)."""
        return self.loss(outputs) | self.distill(outputs | self.distill.teacher_outputs(batch))

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
        rows = torch.ones(batch_size(batch), dtype=torch.bool, device=self.device)
        return batch | {f"{m}_mask": rows for m in present}

    def on_fit_start(self) -> None:
        self._sharded = None
        if self.distill is not None:  # a *-true precision casts the module; the teacher follows it
            dtype = next(self.model.parameters()).dtype
            # trainer=fsdp with mixed_precision: the towers compute in param_dtype; so does the teacher
            dtype = getattr(self.trainer.strategy, "compute_dtype", lambda: None)() or dtype
            self.distill.setup(self.device, dtype if dtype != torch.float32 else None)

    def on_train_start(self) -> None:
        self._rate_clock = (time.perf_counter(), self._samples_seen * distributed.world_size())
        self._partial_stream = distributed.world_size() > 1 and _may_yield_partial_batches(
            self.trainer.datamodule
        )

    def _log_step(self, losses: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        """What a step that writes logs logs, handed to the step log (flushed after the optimizer step):
        ``train/loss`` and its terms as the loss of the global batch (a rank's value is its share, DDP
        averages gradients, so the mean over ranks is the global loss, also when a rank holds no
        complete row of a partial batch), the samples skipped (summed over ranks), the temperature
        parameters, and the samples per second over the steps since the last flush."""
        log = self.steplog
        terms = [total.detach(), *(v.detach() for v in losses.values())]
        log.log_vector(["train/loss", *(f"train/{k}" for k in losses)], torch.stack(terms), reduce="mean")
        log.read([self._skipped_local], self._count_skipped, reduce="sum")
        self._skipped_local = 0
        names = list(self.model.logit_scales)
        scales = [v.detach().reshape(()) for v in self.model.logit_scales.values()]
        if self.model.logit_bias is not None:
            scales.append(self.model.logit_bias.detach().reshape(()))
        log.read(torch.stack(scales), lambda v: _scale_metrics(names, v))
        now, samples = time.perf_counter(), self._samples_seen * distributed.world_size()
        if self._rate_clock is not None and now > self._rate_clock[0]:
            log.log({"train/samples_per_s": (samples - self._rate_clock[1]) / (now - self._rate_clock[0])})
        self._rate_clock = (now, samples)

    def _count_skipped(self, values: list[float]) -> dict[str, float]:
        self._skipped_total += int(values[0])
        return {"train/skipped_samples": float(self._skipped_total)}

    def on_validation_end(self) -> None:
        if self._rate_clock is not None:  # the rate of the next steps leaves the validation out
            self._rate_clock = (time.perf_counter(), self._samples_seen * distributed.world_size())

    def _logs_written_after_this_step(self) -> bool:
        """Every ``log_every_n_steps`` batches, counted as Lightning's logger connector counts them (the
        batches of the run so far, this one included; a resume continues the count), and at the last
        batch of an epoch or of the run: the same answer on every rank (equal batch counts), so their
        reductions match. tests/unit/test_training_step.py holds it against Lightning's own decision."""
        t = self.trainer
        last = t.is_last_batch or (t.max_steps > 0 and t.global_step + 1 >= t.max_steps)
        every = t.log_every_n_steps
        return last or (every > 0 and t.fit_loop.epoch_loop.batch_progress.total.ready % every == 0)

    def _grad_cache_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        # Under DDP only the last micro-batch's backward all-reduces (the others accumulate locally).
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", None)
        model, loss = self.model, self.loss
        if self.distill is not None:  # the teacher runs once on the whole batch, not per chunk
            teacher = self.distill.teacher_outputs(batch)
            model = self.distill.student(self.model)
            loss = lambda out: self.loss(out) | self.distill(out | teacher)  # noqa: E731
        losses = grad_cache_backward(
            model, loss, batch, self.grad_cache_chunks, self.manual_backward, no_sync
        )
        optimizer.step()  # clipping happens in on_before_optimizer_step, once fp16 gradients are unscaled
        self.model.clamp_logit_scales()
        scheduler.step()
        self._flush_step_log()
        return losses

    def on_before_optimizer_step(self, optimizer) -> None:
        """Manual optimisation (``optim.grad_cache_chunks>1``) clips here: Lightning calls this hook inside
        ``optimizer.step()`` after the fp16 loss scaler has unscaled the gradients and before the update,
        so the norm clipped is the true one (clipping before the step clipped the scaled gradients).
        Under automatic optimisation Lightning clips by itself at this point."""
        clip = self.optim_cfg.get("gradient_clip_val")
        if not self.automatic_optimization and clip:
            self.configure_gradient_clipping(optimizer, float(clip), "norm")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """CLIP clamps log s to [0, ln 100] right after each optimiser step: before any callback
        (a step checkpoint) sees the weights."""
        super().optimizer_step(*args, **kwargs)
        self.model.clamp_logit_scales()
        self._flush_step_log()

    def _flush_step_log(self) -> None:
        """At the end of an optimizer step that logs (before any ``on_train_batch_end``, so the bar,
        the preemption check and a step checkpoint see this step's values): one reduction and one
        host read (:class:`StepLog`), then one ``log_metrics`` call per logger, rows numbered as
        Lightning numbers its own."""
        self.steplog.due = False
        metrics = self.steplog.flush(self.device)
        if not metrics:
            return
        trainer = self.trainer
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        step, epoch = self._log_at
        for logger in trainer.loggers:
            logger.log_metrics(metrics | {"epoch": epoch}, step=step)
            logger.save()  # as Lightning's logger connector: metrics.csv on disk at every logging step

    def grad_norm(self, optimizer) -> torch.Tensor:
        """The total 2-norm of this step's gradients of ``optimizer``'s parameters, computed once per
        optimizer step: gradient clipping and the non-finite guard share it (sharded FSDP2 gradients:
        the norm of the whole gradient)."""
        step = self.trainer.global_step
        if self._grad_norm is None or self._grad_norm[0] != step:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self._grad_norm = (step, distributed.total_grad_norm(params))
        return self._grad_norm[1]

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning calls this inside its strategy): shard the model as the
        strategy's config says. Nothing to do under every other strategy. Distillation's projection heads
        stay whole on every rank (student x teacher width: small), their gradients averaged over ranks."""
        from mmpretrain.runtime.fsdp import FSDP2Strategy, is_sharded, replicate

        try:
            strategy = self.trainer.strategy
        except RuntimeError:  # not attached to a Trainer
            return
        if isinstance(strategy, FSDP2Strategy):
            first = not is_sharded(self.model)  # configure_model runs again for a validate after fit
            strategy.shard(self.model)
            if first and self.distill is not None:
                replicate(self.distill.parameters())

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clip as configured, also for torch's fused AdamW under ``bf16-mixed``.

        Lightning refuses to clip for a fused optimizer under any mixed precision, because with fp16
        loss scaling the fused step unscales the gradients itself (clipping before it would clip
        scaled gradients). bf16 and fp32 have no loss scaling, so the gradients are the true ones
        and clipping them is exact; with fp16 scaling :meth:`configure_optimizers` does not fuse.
        """
        if not gradient_clip_val:
            return
        algorithm = gradient_clip_algorithm or "norm"
        if self._sharded is None:  # once per fit (after configure_model): a walk over every parameter
            self._sharded = any(hasattr(p, "to_local") for p in self.model.parameters())
        sharded = self._sharded
        if sharded and algorithm != "norm":  # FSDP2: the norm spans every shard
            raise ValueError(
                "under trainer=fsdp gradients are clipped by norm only; set "
                "trainer.gradient_clip_algorithm=norm"
            )
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        if algorithm == "norm" and (sharded or _loss_scaler(self.trainer) is None):
            # torch's clip_grad_norm_, with the norm the non-finite guard already computed this step
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            distributed.clip_grads_with_norm_(params, float(gradient_clip_val), self.grad_norm(optimizer))
        elif _loss_scaler(self.trainer) is None:
            Precision.clip_gradients(
                self.trainer.precision_plugin,
                optimizer,
                gradient_clip_val,
                GradClipAlgorithmType(algorithm),
            )
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optim_cfg = dict(self.optim_cfg)
        clipping = self.trainer.gradient_clip_val or optim_cfg.get("gradient_clip_val")
        if (
            clipping and _loss_scaler(self.trainer) is not None
        ):  # fp16: the fused step would unscale after clipping
            if optim_cfg.get("fused") is True:
                raise ValueError(
                    "optim.fused=true cannot be combined with gradient clipping under fp16 loss scaling "
                    "(trainer.precision=16-mixed); use optim.fused=auto, or bf16-mixed"
                )
            optim_cfg["fused"] = False
        model_cfg = self.hparams.get("model_training") or self.hparams.get("model") or {}
        optimizer = build_optimizer(self.model, optim_cfg, model_cfg.get("towers"))
        heads = [p for p in self.distill.parameters()] if self.distill is not None else []
        if heads:  # the feature-distillation heads: the base lr and weight decay
            lr, wd = float(optim_cfg["lr"]), float(optim_cfg["weight_decay"])
            optimizer.add_param_group({"params": heads, "lr": lr, "weight_decay": wd, "lr_scale": 1.0})
        total = int(self.trainer.estimated_stepping_batches)
        warmup = warmup_steps(self.optim_cfg.get("warmup_steps", 0), total)
        factor = warmup_cosine(warmup, total, float(self.optim_cfg.get("min_lr_ratio", 0.0)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation: the collector embeds every batch; at the end, gathered and scored -------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val.add(batch)
        if self.val_raw is not None and self.trainer.state.fn == "fit":
            self.val_raw.add(move_data_to_device(batch, self.val_raw.device))  # model.ema.on_cpu: the CPU

    def on_validation_epoch_end(self) -> None:
        # A rank that saw no batch (fewer val shards than ranks, or only bad samples) passes {}: the
        # collector gives it empty columns, so it makes the same gathers as the others.
        local = self.val.take()
        if self.keep_val_embeddings:
            self.last_val_embeddings = self.val.labelled_embeddings(
                local, self.keep_val_embeddings, self.global_step
            )
        metrics = self.validation_metrics(local)
        if self.val_raw is not None and self.trainer.state.fn == "fit":  # the same on every rank (collective)
            raw = self.val_raw.metrics(self.val_raw.take())
            metrics |= {f"val_raw/{k.removeprefix('val/')}": v for k, v in raw.items()}
        if metrics:
            self.log_dict(metrics, sync_dist=False)
            summary = ", ".join(
                f"{k.removeprefix('val/')} {v:.4f}"
                for k, v in metrics.items()
                if "top1" in k or "mean_R@1" in k or k.endswith(("caption/CIDEr-D", "caption/BLEU-4"))
            )
            # epochs counted from one, as the progress bar shows them; a validation outside fit
            # (eval, the step-0 baseline) has no epoch
            fitting = self.trainer.state.fn == "fit"
            where = f"epoch {self.current_epoch + 1} " if fitting else ""
            self.print(f"{where}step {self.global_step}: {summary}")

    def validation_metrics(self, local: dict[str, torch.Tensor]) -> dict[str, float]:
        """The metrics of a validation whose rows on this rank are ``local`` (a collective)."""
        return self.val.metrics(local) | self.captioning_metrics()

    def captioning_metrics(self) -> dict[str, float]:
        """``val/caption/*`` and ``val/caption_retrieval/*`` at every ``data.val.captioning.every``-th
        validation, when ``captioning`` is set (train: a model that can caption; eval: any); not during
        Lightning's sanity check. Every rank computes the same numbers (no collective)."""
        if self.captioning is None:
            return {}
        trainer = self._trainer
        if trainer is not None and trainer.sanity_checking:
            return {}
        if not self.captioning.due():
            return {}
        return {f"val/{k}": v for k, v in self.captioning.metrics(self.model).items()}


def _scale_metrics(names: list[str], values: list[float]) -> dict[str, float]:
    """``train/logit_scale/<k>`` = exp(log s) of each scale, then ``train/logit_bias`` where there is one."""
    out = {f"train/logit_scale/{k}": math.exp(v) for k, v in zip(names, values)}
    if len(values) > len(names):
        out["train/logit_bias"] = values[len(names)]
    return out


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
