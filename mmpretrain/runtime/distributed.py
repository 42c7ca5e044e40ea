"""The only module that touches ``torch.distributed``.

Everything here degrades to the identity in a single process, so losses and metrics call it
unconditionally and the same code runs on one CPU or many GPUs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    With a loss computed per rank against the gathered tensor, the sum over ranks of the
    gradients w.r.t. our slice is exactly the gradient of the global loss: DDP's gradient
    averaging then reproduces the single-process gradient of the global batch. all_reduce is
    used (not reduce_scatter) because gloo lacks reduce_scatter.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = rank(), world_size()
        ctx.batch = x.shape[0]
        out = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, differentiably. Equal shapes on all ranks."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (no grad) from every rank along dim 0. Equal shapes on all ranks: one
    collective, no host read of sizes."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (no grad) from every rank along dim 0; dim 0 may differ per rank, and may be 0.

    The other dims and the dtype must agree on every rank (pad-and-trim, since NCCL's all_gather
    needs equal shapes): a rank with no rows passes an empty tensor of the right shape, never skips.
    """
    if world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    if longest == 0:  # every rank is empty (all agree, so none makes the second gather)
        return x
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)], dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the identity in a single process)."""
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _exchange(x: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, send_to), dist.P2POp(dist.irecv, out, recv_from)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _PassToNext(torch.autograd.Function):
    """Send ``x`` to rank+1, receive rank-1's tensor; backward sends the gradient the other way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.next, ctx.prev = (rank() + 1) % world_size(), (rank() - 1) % world_size()
        return _exchange(x, ctx.next, ctx.prev)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # our output came from prev: its gradient goes back to prev; ours arrives from next
        return _exchange(grad, ctx.prev, ctx.next)


def pass_to_next_rank(x: torch.Tensor) -> torch.Tensor:
    """Ring step (differentiable): returns the tensor of rank-1. Equal shapes on all ranks."""
    if world_size() == 1:
        return x
    return _PassToNext.apply(x)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on at least one (one all_reduce(MAX))."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def share(n: int) -> slice:
    """This rank's contiguous share of ``n`` rows: rank order, sizes differing by at most one,
    so concatenating every rank's share (``all_gather_variable``) restores the order 0..n-1."""
    base, extra = divmod(n, world_size())
    r = rank()
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise max of ``x`` over ranks, for host-side bookkeeping (counts, flags): the tensor
    travels on the device the backend needs (CUDA for NCCL) and comes back where it was."""
    if world_size() == 1:
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else x.device
    y = x.to(device, copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y.to(x.device)


# -- sharded parameters (FSDP2 DTensors) ---------------------------------------------------------
def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``x``: the local shard of a DTensor (FSDP2), ``x`` itself otherwise."""
    return x.to_local() if hasattr(x, "to_local") else x


def all_reduce_mean_(x: torch.Tensor) -> torch.Tensor:
    """In place: the mean over ranks (the gradient of a parameter every rank holds whole)."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x.div_(world_size())
    return x


@torch.no_grad()
def total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of the gradients of ``params``, sharded (DTensors) or whole: the squares of every
    rank's shards are summed over ranks, those of whole parameters (identical on every rank) are
    counted once. Whole gradients only: torch's fused ``get_total_norm``, as ``clip_grad_norm_``."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [local_tensor(g) for g in grads if hasattr(g, "to_local")]
    whole = [g for g in grads if not hasattr(g, "to_local")]
    device = grads[0].device if grads else torch.device("cpu")
    if not sharded:
        return torch.nn.utils.get_total_norm(whole) if whole else torch.zeros((), device=device)
    sq_sharded = sum((g.float().pow(2).sum() for g in sharded), torch.zeros((), device=device))
    sq_whole = sum((g.float().pow(2).sum() for g in whole), torch.zeros((), device=device))
    return (all_reduce_sum(sq_sharded) + sq_whole).sqrt()


@torch.no_grad()
def clip_grads_with_norm_(params: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """Scale every gradient by ``min(1, max_norm / (total + 1e-6))``, torch's formula, on the device."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if not grads:
        return
    coef = (max_norm / (total.float() + 1e-6)).clamp(max=1.0)
    for dtype_grads in _by_dtype(grads).values():
        torch._foreach_mul_(dtype_grads, coef.to(dtype_grads[0].dtype))


def _by_dtype(tensors: list[torch.Tensor]) -> dict[Any, list[torch.Tensor]]:
    groups: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over parameters that are sharded (DTensors) or whole
    (:func:`total_grad_norm`, :func:`clip_grads_with_norm_`). Returns the norm."""
    total = total_grad_norm(params)
    clip_grads_with_norm_(params, max_norm, total)
    return total


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """In place: every rank's ``tensors`` become rank ``src``'s (one collective per tensor)."""
    if world_size() > 1:
        for t in tensors:
            dist.broadcast(t, src)
