"""Contrastive gradient accumulation by feature caching (GradCache), in plain torch.

Plain gradient accumulation over k micro-batches of B changes a contrastive objective: each
micro-batch only sees its own B-1 negatives. Feature caching keeps the objective of the full
k×B batch with the activation memory of one micro-batch:

1. encode every micro-batch without autograd and concatenate the features;
2. compute the loss on the full batch and its gradient with respect to the features (and the
   loss's scalar parameters: temperature, bias) — only features are kept, no tower activations;
3. re-encode each micro-batch with autograd and backpropagate the cached feature gradients.

Pass 3 must see the same dropout/stochastic-depth draws as pass 1, so the RNG state before each
micro-batch of pass 1 is recorded and restored for pass 3. The result is the gradient of the full
batch's loss (up to float rounding), whatever k is. Batch-norm layers normalise per micro-batch
(as in any micro-batched training); their running statistics are updated once per micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from itertools import pairwise
from typing import Any

import torch


def split_batch(batch: Mapping[str, Any], chunks: int) -> list[dict[str, Any]]:
    """Split every per-sample entry (tensor or list with the batch's length) into ``chunks`` parts."""
    size = batch_size(batch)
    if size < chunks:
        raise ValueError(
            f"a batch of {size} cannot be split into {chunks} grad-cache chunks; lower "
            "optim.grad_cache_chunks"
        )
    bounds = [round(i * size / chunks) for i in range(chunks + 1)]
    parts = []
    for lo, hi in pairwise(bounds):
        part = {}
        for k, v in batch.items():
            per_sample = (torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == size) or (
                isinstance(v, (list, tuple)) and len(v) == size
            )
            part[k] = v[lo:hi] if per_sample else v
        parts.append(part)
    return parts


def batch_size(batch: Mapping[str, Any]) -> int:
    """The number of samples of a batch: the first dimension of its first tensor that has one."""
    for v in batch.values():
        if torch.is_tensor(v) and v.ndim > 0:
            return v.shape[0]
    raise ValueError("a batch needs at least one tensor of samples")


class _RngState:
    """CPU and (when used) CUDA generator states, restorable in a forked RNG context."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )

    @contextlib.contextmanager
    def replay(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def _is_grad_output(v: Any) -> bool:
    return torch.is_tensor(v) and v.is_floating_point()


def grad_cache_backward(
    model: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
    loss_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    batch: Mapping[str, Any],
    chunks: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, torch.Tensor]:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(model(batch))`` using ``chunks`` passes.

    ``model`` returns per-sample outputs (``[b, ...]``, e.g. features) and scalar ones (0-d, e.g.
    ``logit_scale``); ``loss_fn`` returns ``{name: term}`` summed into the objective. ``backward``
    runs each micro-batch's backward (a LightningModule passes ``manual_backward``). ``no_sync``
    (default: ``model.no_sync`` of a DDP model) wraps the forward and backward of every micro-batch
    but the last, so DDP all-reduces the accumulated gradient once per step, not once per
    micro-batch (a LightningModule passes its strategy's ``block_backward_sync``). Returns the
    loss terms, detached.
    """
    if no_sync is None:
        no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    micro = split_batch(batch, chunks)
    states, outputs = [], []
    with torch.no_grad():
        for mb in micro:
            states.append(_RngState())
            outputs.append(model(mb))
    sizes = [batch_size(mb) for mb in micro]
    # Pass 1 already updated running statistics (BatchNorm) once per micro-batch, as training on
    # micro-batches would; the replay must not update them a second time.
    buffers = (
        [b for b in model.buffers() if b.is_floating_point() or b.dtype == torch.long]
        if isinstance(model, torch.nn.Module)
        else []
    )
    saved = [b.clone() for b in buffers]

    # The full-batch loss on cached (leaf) outputs; its gradient w.r.t. them, nothing else.
    merged, leaves = {}, {}
    for key, first in outputs[0].items():
        if torch.is_tensor(first) and first.ndim > 0:
            merged[key] = torch.cat([o[key] for o in outputs])
        else:
            merged[key] = first
        if _is_grad_output(merged[key]):
            merged[key] = leaves[key] = merged[key].detach().requires_grad_()
    terms = loss_fn(merged)
    total = sum(terms.values())
    grads = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()), allow_unused=True)))

    # Re-encode each micro-batch with autograd and push the cached gradients through it. Scalar
    # outputs get 1/k of their gradient in every micro-batch so every parameter is used each time
    # (DDP without find_unused_parameters needs that).
    start = 0
    for i, (mb, state, size) in enumerate(zip(micro, states, sizes)):
        with no_sync() if i < len(micro) - 1 else contextlib.nullcontext():
            with state.replay():
                out = model(mb)
            surrogate = 0.0
            for key, grad in grads.items():
                if grad is None:
                    continue
                if out[key].ndim > 0:
                    surrogate = surrogate + (out[key] * grad[start : start + size]).sum()
                else:
                    surrogate = surrogate + (out[key] * grad).sum() / len(micro)
            if torch.is_tensor(surrogate) and surrogate.requires_grad:
                backward(surrogate)
        start += size
    with torch.no_grad():
        for b, s in zip(buffers, saved):
            b.copy_(s)
    return {k: v.detach() for k, v in terms.items()}
