"""Run a test's worker in 2 (or more) CPU processes joined by gloo."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """Join the ranks' gloo group for the block, and leave it together: the barrier keeps a rank
    from tearing its group down while a peer still waits on it. A block that raises skips the
    barrier, so one failing rank does not hang the other."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _leave_at_once(target: Callable, rank: int, world: int, port: int, queue) -> None:
    """Run ``target`` and, when it returns, flush ``queue`` and exit without the interpreter's
    teardown. A gloo worker thread can still be freeing a finished collective (the tensors whose
    Python objects died first need the GIL) when the main thread reaches the exit: if that lands
    in the interpreter's finalization, the thread is killed inside a C++ destructor and the whole
    process aborts ("terminate called without an active exception", exit -6) after a correct run.
    A ``target`` that raises still exits the usual way, with its traceback and exit code 1."""
    target(rank, world, port, queue)
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(target: Callable, world: int = 2, results: int = 1, timeout: float = 120) -> list[Any]:
    """Spawn ``target(rank, world, port, queue)`` on every rank; return the first ``results`` items
    the workers put on ``queue``, after checking that every process exited cleanly."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_leave_at_once, args=(target, r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=timeout) for _ in range(results)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"a worker exited with {p.exitcode}"
    return out
