"""Host syncs per training step of the default recipe (digits_clip, shrunk): none outside the steps
where logs are written and the progress bar redraws (both every 10 steps here), and one there: the
module's step log stacks every metric, the non-finite guard's counters and the preemption flag into
one tensor, read with one ``tolist()``.

``CountHostSyncs`` counts ``.item()``/``.tolist()``/``.cpu()``/``.numpy()``/``bool``/``float``/
``int`` of tensors in the main process per batch; the data pipeline runs in a worker process
(``data.num_workers=1``), so its CPU work is not counted. On CPU a read is no real sync; on a GPU
each one is. The progress bar is on (the stock one read its metrics after every batch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, compose_config

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 20, 10
RUN = [
    o
    for o in TINY_RUN
    if not o.startswith(("data.num_workers", "trainer.enable_progress_bar", "callbacks.progress_bar"))
]
RUN += [
    "data.num_workers=1",
    f"trainer.max_steps={STEPS}",
    f"trainer.log_every_n_steps={EVERY}",
    "trainer.limit_val_batches=1",
    "export_at_end=false",
    "callbacks.plots=null",
    "+callbacks.count._target_=mmpretrain.training.monitor.CountHostSyncs",
]


def syncs_by_step(run: Path, rank: int) -> dict[int, dict[str, int]]:
    return {
        int(step): counts
        for step, counts in json.loads((run / "syncs" / f"rank{rank}.json").read_text()).items()
    }


def check(counts: dict[int, dict[str, int]]) -> None:
    off_steps = {step: c for step, c in counts.items() if step % EVERY}
    assert off_steps == {}, f"host syncs at steps that neither log nor redraw: {off_steps}"
    # One stacked read per logging step: every metric, the guard's counters and the preemption flag.
    assert counts == {EVERY: {"tolist": 1}, 2 * EVERY: {"tolist": 1}}


def test_single_process_step_reads_the_device_only_when_logging(digits_root, tmp_path):
    from mmpretrain.commands.train import train

    run = tmp_path / "run"
    cfg = compose_config(
        "train",
        RUN
        + [
            f"data.root={digits_root}",
            f"data.train_samples={16 * STEPS}",
            f"+callbacks.count.dirpath={run}/syncs",
        ],
        run_dir=run,
    )
    train(cfg)
    check(syncs_by_step(run, 0))


@pytest.mark.slow
def test_two_process_ddp_step_reads_the_device_only_when_logging(digits_root, tmp_path):
    run = tmp_path / "ddp"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "-m",
        "mmpretrain.cli",
        "train",
        *RUN,
        f"data.root={digits_root}",
        f"data.train_samples={2 * 16 * STEPS}",
        f"+callbacks.count.dirpath={run}/syncs",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.run(
        cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        check(syncs_by_step(run, rank))
