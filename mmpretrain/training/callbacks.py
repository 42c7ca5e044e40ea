"""Fault tolerance as Lightning plugins and callbacks: atomic checkpoints, preemption, non-finite steps.

``AtomicCheckpointIO`` writes every checkpoint to a temporary file, fsyncs it and renames it over
the target, so a crash mid-write never leaves a corrupt ``last.ckpt``, and reads checkpoints with
``weights_only=True``. ``NonFiniteGuard`` skips a step on every rank when any rank sees a
non-finite loss or gradient. ``PreemptionCheckpoint`` saves a checkpoint when Lightning stops on
SIGTERM. Neither reads the device every step: their flags are read every ``check_every`` steps.
``RecordBatches`` (debug) writes the sample keys and loss of every step per rank.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from mmpretrain.io import atomic_write, torch_load_safe
from mmpretrain.runtime import distributed


# -- checkpoints -----------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written with :func:`mmpretrain.io.atomic_write` (durable: fsynced, then renamed over
    the target, so a crash mid-write never leaves a corrupt ``last.ckpt``) and read with
    ``weights_only=True``. ``mirror`` (``paths.remote``, a :class:`~mmpretrain.runs.RemoteRun`) is
    told of each checkpoint published or removed (also the sharded ones: see ``runtime.fsdp``)."""

    def __init__(self, mirror: Any = None):
        super().__init__()
        self.mirror = mirror

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _torch_save(checkpoint, tmp), durable=True)
        self.published(path)

    def published(self, path: Path) -> None:
        if self.mirror is not None:
            self.mirror.checkpoint_saved(path)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if self.mirror is not None:
            self.mirror.checkpoint_removed(path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return torch_load_safe(path)


def _torch_save(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


class PreemptionCheckpoint(L.Callback):
    """SIGTERM (preemption): every rank finishes the same step, saves ``preempted-step<N>.ckpt``, stops.

    The handler only sets a flag. The flag is summed over ranks at the steps that write logs, in the
    step log's one reduction and host read (``check_every: null``), or every ``check_every``
    optimizer steps with a read of its own; so a signal that reached one rank (or all, as under
    SLURM/torchrun) stops every rank after the same step, at most one check interval after it
    arrived, and the run ends normally (exit status 0). Lightning's own SIGTERM handler is replaced
    for the duration of fit (it raises at an arbitrary point and can leave ranks waiting on each other).
    """

    def __init__(self, dirpath: str, check_every: int | None = None):
        self.dirpath = Path(dirpath)
        self.check_every = None if check_every is None else max(1, int(check_every))
        self.received = False
        self.saved: Path | None = None
        self._stop = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            threading.current_thread() is threading.main_thread()
        ):  # Lightning restores its handlers at teardown
            signal.signal(signal.SIGTERM, self._on_sigterm)
            # Under DDP, Lightning (>= 2.5) broadcasts its own SIGTERM flag before every batch and reads
            # it with .item() (a collective and a host sync per step). Its handler is replaced above, so
            # the flag can never be set: skip that broadcast while this callback is in charge. Private:
            # Lightning has no switch for it; tests/unit/test_private_apis.py fails when it changes.
            loop = trainer.fit_loop.epoch_loop
            if hasattr(loop, "_broadcast_sigterm_tensor"):
                loop._broadcast_sigterm_tensor = _no_broadcast

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop.epoch_loop.__dict__.pop("_broadcast_sigterm_tensor", None)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.received = True

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        steplog = _steplog(pl_module, self.check_every)
        if steplog is not None and steplog.due:
            steplog.read([float(self.received)], self._on_flag, reduce="sum")

    def _on_flag(self, values: list[float]) -> None:
        self._stop = values[0] > 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if _steplog(pl_module, self.check_every) is None:
            # global_step is the same on every rank, so all ranks take part in the same reductions.
            every = self.check_every or max(1, trainer.log_every_n_steps)
            if trainer.global_step % every == 0:
                self._stop = distributed.any_rank(self.received, pl_module.device)
        if not self._stop:
            return
        self._stop = False
        self.saved = self.dirpath / f"preempted-step{trainer.global_step:07d}.ckpt"
        trainer.save_checkpoint(self.saved)
        trainer.should_stop = True
        if trainer.is_global_zero:
            print(
                f"SIGTERM: saved {self.saved} at step {trainer.global_step}; continue with resume=auto",
                flush=True,
            )


def _steplog(pl_module: L.LightningModule, check_every: int | None) -> Any:
    """The module's step log when a check rides on it (``check_every: null`` and a module that has
    one, as :class:`~mmpretrain.training.module.ContrastiveModule`), else None: the check reads itself."""
    return getattr(pl_module, "steplog", None) if check_every is None else None


def _no_broadcast() -> None:
    pass


# -- non-finite steps ----------------------------------------------------------------------------
class NonFiniteError(RuntimeError):
    pass


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one host sync for all of them."""
    return bool(finite_flag(tensors))


def finite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor, computed on the device: every entry of every tensor is finite.

    One norm over all the tensors (torch's ``get_total_norm``: fused kernels, as gradient clipping
    uses) is finite exactly when every entry is, unless the norm of finite values overflows float32
    (entries beyond ~1e19), which counts as non-finite: such a step could not be clipped either. A
    sharded tensor (FSDP) contributes its local shard.
    """
    if not tensors:
        return torch.tensor(True)
    return torch.isfinite(torch.nn.utils.get_total_norm([distributed.local_tensor(t) for t in tensors]))


class NonFiniteGuard(L.Callback):
    """Skip the optimizer step on all ranks when any rank's loss or any gradient is not finite.

    Without a host sync per step: the verdict is a device tensor, all-reduced (MAX of "bad") so
    ranks never diverge, and handed to the optimizer as ``found_inf``, the flag torch's fused
    Adam/AdamW kernels (the default ``optim.fused: auto``) read on the device to skip a step
    entirely: weights, both moments and the step count stay untouched, as torch's GradScaler
    skips inf steps. An optimizer without that kernel gets the old host decision every step (its
    gradients are set to ``None``, which leaves weights and moments untouched). The gradients'
    verdict is the finiteness of their total norm, the one gradient clipping computes anyway (the
    module's ``grad_norm``: one fused norm per step for both).

    The skip counters live on the device too and are read at the steps that write logs, in the step
    log's one host read (``check_every: null``), or every ``check_every`` steps with a read of
    their own (and when a checkpoint is saved): ``train/nonfinite_skips`` counts the skipped steps;
    when the longest streak of skipped steps seen at a read reaches ``max_consecutive``, the
    current weights (all updates of non-finite steps were skipped, so they are finite: the last
    good ones when the streak lasts until the read) are saved to ``<dirpath>/nonfinite-stop.ckpt``
    and the run stops with :class:`NonFiniteError`. With ``check_every: 1`` it stops inside the
    step that completes the streak, before its (skipped) update.
    """

    def __init__(self, dirpath: str, max_consecutive: int = 5, check_every: int | None = None):
        self.dirpath = Path(dirpath)
        self.max_consecutive = int(max_consecutive)
        self.check_every = None if check_every is None else max(1, int(check_every))
        self.skipped = 0  # host copies, as of the last read
        self.consecutive = 0
        self._counts: torch.Tensor | None = (
            None  # device: [skipped, current streak, longest streak since read]
        )
        self._loss_ok: torch.Tensor | None = None

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        ok = torch.isfinite(
            loss.detach()
        ).all()  # several backwards per step (grad cache): all must be finite
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        if hasattr(pl_module, "grad_norm"):
            ok = torch.isfinite(pl_module.grad_norm(optimizer)).to(pl_module.device)
        else:
            ok = finite_flag([p.grad for p in pl_module.parameters() if p.grad is not None])
            ok = ok.to(pl_module.device)
        if self._loss_ok is not None:
            ok = ok & self._loss_ok.to(ok.device)
        self._loss_ok = None
        bad = distributed.all_reduce_max((~ok).to(torch.float32).reshape(1)).reshape(())
        # torch's fused optimizers (Adam/AdamW/SGD with fused=True) set this flag, as GradScaler checks it
        fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        if fused:
            optimizer.found_inf = bad  # the fused kernel skips the whole update on the device
        elif bool(bad):  # host decision each step: only for optimizers without a found_inf kernel
            optimizer.zero_grad(set_to_none=True)
        self._count(bad)
        steplog = getattr(pl_module, "steplog", None)
        if steplog is not None and steplog.due:
            if self.check_every is None:  # the streak rides on the step log's one read
                steplog.read(self._counts, lambda v: self._on_read(trainer, v))
            else:
                steplog.log({"train/nonfinite_skips": self._counts[0]})
        every = self.check_every or (None if steplog is not None else max(1, trainer.log_every_n_steps))
        if not fused or (every is not None and (trainer.global_step + 1) % every == 0):
            counts = self._host_counts()
            self._on_read(trainer, counts)
            if steplog is None:
                pl_module.log("train/nonfinite_skips", float(counts[0]), rank_zero_only=True)

    def _on_read(self, trainer: L.Trainer, counts: list[float]) -> dict[str, float]:
        """The host values of the counters: stop when the longest streak since the last read is too
        long; the next read's longest streak starts from the current one."""
        skipped, consecutive, worst = (int(v) for v in counts)
        self.skipped, self.consecutive = skipped, consecutive
        if self._counts is not None:
            self._counts = torch.stack([self._counts[0], self._counts[1], self._counts[1]])
        if worst >= self.max_consecutive:
            path = self.dirpath / "nonfinite-stop.ckpt"
            trainer.save_checkpoint(path)
            raise NonFiniteError(
                f"{worst} consecutive steps had a non-finite loss or gradient (on some rank); stopped "
                f"at step {trainer.global_step}. The last good weights are in {path}. Lower optim.lr, "
                "check the data, or raise callbacks.nonfinite_guard.max_consecutive."
            )
        return {"train/nonfinite_skips": float(skipped)}

    def _count(self, bad: torch.Tensor) -> None:
        if self._counts is None:
            self._counts = torch.tensor(
                [self.skipped, self.consecutive, self.consecutive], dtype=torch.float32
            )
        counts = self._counts.to(bad.device)
        streak = (counts[1] + bad) * bad  # +1 on a skipped step, back to 0 on a good one
        self._counts = torch.stack([counts[0] + bad, streak, torch.maximum(counts[2], streak)])

    def _host_counts(self) -> list[float]:
        """One host read: skipped steps, current streak, longest streak since the last read."""
        if self._counts is None:
            return [self.skipped, self.consecutive, self.consecutive]
        return self._counts.tolist()

    def state_dict(self) -> dict[str, Any]:
        skipped, consecutive, _ = (int(v) for v in self._host_counts())
        return {"skipped": skipped, "consecutive": consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self._counts = None


# -- debugging and fault injection -------------------------------------------------------------
class RecordBatches(L.Callback):
    """Append ``{"step", "rank", "keys", "loss"}`` per training step to ``<dirpath>/rank<R>.jsonl``
    (and with ``tensors=True`` the batch to ``rank<R>-step<N>.pt``): what each rank really saw."""

    def __init__(self, dirpath: str, tensors: bool = False):
        self.dirpath = Path(dirpath)
        self.tensors = tensors

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        rank, step = trainer.global_rank, trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        record = {
            "step": step,
            "rank": rank,
            "keys": list(batch.get("__key__", [])),
            "loss": None if loss is None else float(loss),
        }
        with open(self.dirpath / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensors:
            tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
            torch.save(tensors, self.dirpath / f"rank{rank}-step{step:06d}.pt")


class InjectNaN(L.Callback):
    """Fault injection: make the image batch of ``rank`` all-NaN at the given (1-based) steps."""

    def __init__(self, steps: list[int], rank: int = 0, modality: str = "image"):
        self.steps, self.rank, self.modality = {int(s) for s in steps}, int(rank), modality

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == self.rank and trainer.global_step + 1 in self.steps:
            # float: uint8 images cannot hold NaN, and a float image is taken by the tower as normalised
            batch[self.modality] = torch.full_like(batch[self.modality], float("nan"), dtype=torch.float32)
