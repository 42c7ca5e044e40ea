"""``trainer=ddp`` (and ``trainer.strategy=ddp``): Lightning's DDPStrategy, with evaluation steps that do
not go through the DDP wrapper.

DDP's forward is a collective when the model has buffers (BatchNorm): with ``broadcast_buffers`` (the
default) each forward first broadcasts rank 0's buffers, so every rank must run the same number of
forwards. Our validation stream splits the val shards between ranks, so ranks can have different
numbers of val batches (one val shard and two ranks; shards of unequal size). With a BatchNorm tower
(resnet frames, audio CNNs) the rank with more batches then waited for ever in that broadcast while the
other waited in the epoch-end gather. Here the evaluation steps call the LightningModule directly (there
is no gradient to synchronise), after one broadcast of rank 0's buffers at the start of each evaluation,
so every rank evaluates the model DDP's forward would have given it. Training is Lightning's, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy

from mmpretrain.runtime import distributed


class DDPStrategy(LightningDDPStrategy):
    def _direct(
        self, context: Callable[[], AbstractContextManager], hook: str, *args: Any, **kwargs: Any
    ) -> Any:
        with context():
            return getattr(self.lightning_module, hook)(*args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._direct(self.precision_plugin.val_step_context, "validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._direct(self.precision_plugin.test_step_context, "test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._direct(self.precision_plugin.predict_step_context, "predict_step", *args, **kwargs)

    def _share_buffers(self) -> None:
        """Every rank's buffers become rank 0's (what DDP's forward would do before the first batch)."""
        distributed.broadcast_(list(self.lightning_module.buffers()), src=0)

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._share_buffers()

    def on_test_start(self) -> None:
        super().on_test_start()
        self._share_buffers()

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self._share_buffers()


def resolve_strategy(trainer: dict[str, Any]) -> dict[str, Any]:
    """Trainer kwargs with ``strategy`` built: a config (``{_target_: ...}``) is instantiated, and
    Lightning's ``ddp`` becomes :class:`DDPStrategy` (evaluation never waits on a rank with no batch left);
    ``precision=auto`` becomes what the device computes fastest (:func:`kernels.resolve_precision`)."""
    from mmpretrain.config import safe_instantiate
    from mmpretrain.runtime.kernels import resolve_precision

    trainer = dict(trainer)
    if isinstance(trainer.get("strategy"), dict):  # e.g. {_target_: mmpretrain.runtime.ddp.DDPStrategy, ...}
        trainer["strategy"] = safe_instantiate(trainer["strategy"])
    elif trainer.get("strategy") == "ddp":
        trainer["strategy"] = DDPStrategy()
    return resolve_precision(trainer)
