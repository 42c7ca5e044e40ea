"""Run a test's worker in 2 (or more) CPU processes joined by gloo."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(target: Callable, world: int = 2, results: int = 1, timeout: float = 120) -> list[Any]:
    """Spawn ``target(rank, world, port, queue)`` on every rank; return the first ``results`` items
    the workers put on ``queue``, after checking that every process exited cleanly."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=timeout) for _ in range(results)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"a worker exited with {p.exitcode}"
    return out
