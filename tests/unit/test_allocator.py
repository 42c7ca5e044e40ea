"""mmpretrain.runtime.allocator: after keep_freed_memory(), a block allocated, touched and freed every
"step" stops page-faulting in again (the cost it removes from every CPU training step)."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from mmpretrain.runtime.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
def step():  # one training step's activations: blocks of 1-7 MB, 160 MB in all, touched and freed
    blocks = [np.ones((k % 7 + 1) << 17) for k in range(40)]
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def _faults_per_step(mode: str, env=None) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env
    )
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    _, plain = _faults_per_step("plain")
    applied, tuned = _faults_per_step("tuned")
    assert applied == "True"
    assert plain > 10_000  # under glibc's defaults most of the 160 MB is faulted in again every step
    assert tuned < plain / 20  # measured: ~20,000 -> 0


def test_the_system_allocator_can_be_kept(monkeypatch):
    import os

    env = dict(os.environ, MMPRETRAIN_MALLOC="system")
    applied, faults = _faults_per_step("tuned", env=env)
    assert applied == "False" and faults > 10_000
