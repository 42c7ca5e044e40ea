"""The training step under Lightning DDP (2 gloo processes): GradCache all-reduces gradients once
per step, and ``train/loss`` of a partial-pair batch is the loss of the global batch.

Each worker runs a real ``L.Trainer`` with ``DDPStrategy`` (Lightning sees LOCAL_RANK in the
environment and joins the processes started here instead of launching its own). A DDP comm hook
counts the gradient all-reduces.
"""

from __future__ import annotations

import io
import os

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmpretrain.losses import InfoNCE
from tests.integration.gloo import run_workers
from tests.unit.test_gradcache import batch, make_model

WORLD, CHUNKS, ROWS = 2, 4, 8  # rows per rank
# image present in rows 13, 14 of the global batch only: rank 0 holds no complete row
IMAGE_MASK = torch.tensor([0] * 8 + [0, 0, 0, 0, 0, 1, 1, 0], dtype=torch.bool)


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def global_batch(masked: bool) -> dict:
    b = batch(WORLD * ROWS)
    if masked:
        b["image_mask"] = IMAGE_MASK.clone()
    return b


def local_batch(rank: int, masked: bool) -> dict:
    b = global_batch(masked)
    return {k: v[rank * ROWS : (rank + 1) * ROWS] for k, v in b.items()}


class Capture(L.Callback):
    def __init__(self, hook=None):
        self.grads, self.loss, self.hook = None, None, hook

    def on_train_start(self, trainer, pl_module):
        if self.hook is not None:  # Lightning registers ddp_comm_hook on CUDA only
            trainer.strategy.model.register_comm_hook(state=None, hook=self.hook)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss = trainer.callback_metrics.get("train/loss")


def fit_one_step(rank: int, chunks: int, masked: bool, hook) -> Capture:
    from lightning.pytorch.strategies import DDPStrategy

    from mmpretrain.training.module import ContrastiveModule

    optim = {"lr": 1e-3, "weight_decay": 0.1, "grad_cache_chunks": chunks, "gradient_clip_val": None}
    module = ContrastiveModule(no_dropout(make_model()), InfoNCE(), optim)
    capture = Capture(hook)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=WORLD,
        strategy=DDPStrategy(process_group_backend="gloo"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[capture],
        limit_val_batches=0,
        log_every_n_steps=1,
        use_distributed_sampler=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader([local_batch(rank, masked)], batch_size=None))
    return capture


def worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        OMP_NUM_THREADS="1",
    )
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(None, bucket)

    results = {}
    for chunks in (1, CHUNKS):
        calls.clear()
        capture = fit_one_step(rank, chunks, masked=False, hook=counting_hook)
        results[f"allreduces_{chunks}"] = len(calls)
        results[f"grads_{chunks}"] = capture.grads
    results["masked_loss"] = fit_one_step(rank, 1, masked=True, hook=None).loss
    if rank == 0:  # as bytes: shared-memory tensors would die with this process
        buf = io.BytesIO()
        torch.save(results, buf)
        queue.put(buf.getvalue())


def test_ddp_grad_cache_syncs_once_and_logs_the_global_loss():
    (payload,) = run_workers(worker, world=WORLD, timeout=300)
    results = torch.load(io.BytesIO(payload))

    # GradCache with 4 micro-batches all-reduces as often as one plain backward (once per bucket)
    assert results["allreduces_1"] >= 1
    assert results[f"allreduces_{CHUNKS}"] == results["allreduces_1"], results
    # ... and its gradient is still the full global batch's
    model = no_dropout(make_model())
    sum(InfoNCE()(model(global_batch(masked=False))).values()).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(results[f"grads_{CHUNKS}"][name], p.grad, atol=1e-5), name

    # train/loss of a partial-pair batch = the single-process loss of the global batch (rank 0 has no
    # complete row: its own share is 0)
    with torch.no_grad():
        ref = sum(InfoNCE()(no_dropout(make_model())(global_batch(masked=True))).values())
    assert results["masked_loss"] is not None and ref > 0
    assert torch.allclose(results["masked_loss"], ref, atol=1e-5), (results["masked_loss"], ref)
