"""The 2-process gloo caption loss (and its gradient) equals the 1-process token mean of the global batch,
also when the ranks hold different numbers of caption tokens (a per-rank mean would not)."""

import io

import torch
import torch.distributed as dist

from mmpretrain.losses import caption_loss
from tests.integration.gloo import gloo_group, run_workers

#: tokens per caption: rank 0's half of the batch holds 10, rank 1's 26
TOKENS = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])


def make_problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, generator=g), torch.randn(8, 5, generator=g)


def loss_and_grad(x, tokens):
    w0, _ = make_problem()
    w = w0.clone().requires_grad_()
    nll = (x @ w).exp() * tokens  # a per-sample summed NLL that grows with the caption's length
    loss = caption_loss(nll, tokens)
    loss.backward()
    return loss.detach(), w.grad


def worker(rank, world, port, queue):
    with gloo_group(rank, world, port):
        _, x = make_problem()
        n = x.shape[0] // world
        rows = slice(rank * n, (rank + 1) * n)
        loss, grad = loss_and_grad(x[rows], TOKENS[rows])
        dist.all_reduce(grad)  # what DDP does: average over ranks
        grad /= world
        dist.all_reduce(loss)
        if rank == 0:
            buf = io.BytesIO()
            torch.save((loss / world, grad.clone()), buf)
            queue.put(buf.getvalue())


def test_two_process_caption_loss_and_gradient_equal_the_global_token_mean():
    _, x = make_problem()
    ref_loss, ref_grad = loss_and_grad(x, TOKENS)
    (payload,) = run_workers(worker)
    loss, grad = torch.load(io.BytesIO(payload))
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
