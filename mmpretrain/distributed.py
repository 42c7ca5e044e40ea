"""The only module that touches ``torch.distributed``.

Everything here degrades to the identity in a single process, so losses and metrics call it
unconditionally and the same code runs on one CPU or many GPUs.
"""

from __future__ import annotations

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


def all_gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (no grad) from every rank along dim 0; dim 0 may differ per rank."""
    if world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)], dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on at least one (one all_reduce(MAX))."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
