"""The training metrics of the steps that write logs, reduced over ranks and read on the host in one go.

During a step that logs (``due``, decided by the module at the start of its training step), the module
and the callbacks hand their values to :class:`StepLog`: device tensors or host numbers, each with its
reduction over ranks (``"mean"``, ``"sum"``, or ``None``: rank-local or already equal on every rank).
At :meth:`StepLog.flush` (the end of the optimizer step, before any ``on_train_batch_end``), the
reduced entries are stacked into one tensor and all-reduced once, everything on the device is read on
the host with one ``tolist()``, readers registered with :meth:`read` get their values, and the logged
values go to the loggers as plain floats, in one ``log_metrics`` call each. No other step reads the
device or calls a logger: the fixed cost of a step that does not log is a few Python attribute reads.

Lightning's ``self.log`` is not used for these metrics: its result collection does work per call (a
metadata dataclass, a recursive ``.to(device)``) and converts every logged tensor with its own host
read. ``trainer.callback_metrics`` still receives the values (CPU tensors), so a callback monitoring
``train/loss`` and the dict ``mmpretrain train`` returns see them as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mmpretrain.runtime import distributed

REDUCTIONS = ("mean", "sum", None)


@dataclass(eq=False)  # entries are told apart by identity, never compared
class _Entry:
    values: torch.Tensor | list[float]  # a flattened device tensor, or host numbers
    reduce: str | None
    names: list[str] | None  # logged under these names, or
    then: Callable[[list[float]], dict[str, float] | None] | None  # handed to this reader


class StepLog:
    def __init__(self) -> None:
        self.due = False  # set by the module at the start of each training step
        self.last: dict[str, float] = {}  # the values of the last flush (what the progress bar shows)
        self._entries: list[_Entry] = []

    # -- during a step that logs -----------------------------------------------------------------
    def log(self, metrics: dict[str, torch.Tensor | float], reduce: str | None = None) -> None:
        """Log ``metrics`` (0-d tensors or numbers) at this step, reduced over ranks as ``reduce`` says."""
        for name, value in metrics.items():
            self._add(value, reduce, [name], None)

    def log_vector(self, names: list[str], values: torch.Tensor, reduce: str | None = None) -> None:
        """Log ``values`` (a 1-d tensor, one entry per name): one stacked tensor, not one per metric."""
        self._add(values, reduce, list(names), None)

    def read(
        self,
        values: torch.Tensor | list[float],
        then: Callable[[list[float]], dict[str, float] | None],
        reduce: str | None = None,
    ) -> None:
        """Hand ``values`` (reduced as ``reduce`` says) to ``then`` as host floats at the flush; the
        metrics ``then`` returns, if any, are logged with the others."""
        self._add(values, reduce, None, then)

    def _add(self, values: Any, reduce: str | None, names: list[str] | None, then: Any) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r}: use one of {REDUCTIONS}")
        if isinstance(values, torch.Tensor):
            values = values.detach().reshape(-1)
        elif isinstance(values, (int, float)):
            values = [float(values)]
        else:
            values = [float(v) for v in values]
        self._entries.append(_Entry(values, reduce, names, then))

    # -- at the end of the optimizer step ----------------------------------------------------------
    def flush(self, device: torch.device) -> dict[str, float]:
        """Reduce (one collective when several ranks run), read (one host read), hand out. Every rank
        must flush at the same steps with the same entries: the module's ``due`` is the same on every
        rank. Returns the logged metrics as floats (empty when nothing was added)."""
        entries, self._entries = self._entries, []
        if not entries:
            return {}
        world = distributed.world_size()
        reduced = [e for e in entries if e.reduce is not None and world > 1]
        local = [e for e in entries if e.reduce is None or world == 1]
        on_device = reduced + [e for e in local if isinstance(e.values, torch.Tensor)]
        dtype = torch.float32 if device.type == "mps" else torch.float64
        host: dict[int, list[float]] = {}
        if on_device:
            parts = [torch.as_tensor(e.values, device=device).to(dtype) for e in on_device]
            if reduced:
                parts = [distributed.all_reduce_sum(torch.cat(parts[: len(reduced)])), *parts[len(reduced) :]]
            flat = torch.cat(parts).tolist()  # the step's one host read
            offset = 0
            for e in on_device:
                values = flat[offset : offset + len(e.values)]
                host[id(e)] = [v / world for v in values] if e in reduced and e.reduce == "mean" else values
                offset += len(e.values)
        metrics: dict[str, float] = {}
        for e in entries:
            values = host.get(id(e), e.values)
            if e.names is not None:
                metrics.update(zip(e.names, values))
            else:
                metrics.update(e.then(list(values)) or {})
        self.last = metrics
        return metrics
