"""The launch path as users take it: the installed console script, from another directory.

DDP with 2 CPU processes (Lightning re-executes the command line for rank 1), bf16-mixed with
gradient clipping and the fused optimiser, and a wheel installed without the source tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.integration import stacks

ROOT = Path(__file__).resolve().parents[2]
SMALL_TEXT = [
    "model.towers.text.config.text_cfg.width=32",
    "model.towers.text.config.text_cfg.heads=2",
    "model.towers.text.config.text_cfg.layers=1",
]
#: Known-harmless third-party messages the CLI filters (a real warning would still show).
NOISE = (
    "litlogger",
    "Tip:",
    "`IterableDataset` has `__len__` defined",
    "will be deleted when the new ones",
    "LeafSpec",
)


def console_script(python: str | Path = sys.executable) -> Path:
    return Path(python).parent / "mmpretrain"


def run_cli(
    args: list[str], cwd: Path, script: Path | None = None, timeout: float = 420
) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cwd.mkdir(parents=True, exist_ok=True)
    proc = stacks.run([str(script or console_script()), *args], cwd=cwd, env=env, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_ddp_from_the_console_script_runs_both_ranks(digits_root, tmp_path):
    """`trainer=ddp` from the installed `mmpretrain`: rank 1 used to die with "can't open file
    '<cwd>/mmpretrain train'" because the CLI rewrote sys.argv[0], which Lightning re-executes."""
    run, record = tmp_path / "run", tmp_path / "record"
    proc = run_cli(
        [
            "train",
            "debug=fast",
            "trainer=ddp",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            "data.num_workers=0",
            f"data.root={digits_root}",
            f"hydra.run.dir={run}",
            *SMALL_TEXT,
            "+callbacks.record._target_=mmpretrain.training.callbacks.RecordBatches",
            f"+callbacks.record.dirpath={record}",
        ],
        cwd=tmp_path / "elsewhere",
    )
    for rank in (0, 1):
        steps = [json.loads(line) for line in (record / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2, 3, 4], f"rank {rank} ran {steps}"
    keys = [
        set(json.loads(line)["keys"])
        for r in (0, 1)
        for line in (record / f"rank{r}.jsonl").read_text().splitlines()[:1]
    ]
    assert not keys[0] & keys[1], "the two ranks saw the same samples"
    metrics = json.loads((run / "metrics.json").read_text())
    assert "val/zeroshot_top1/image_text" in metrics  # debug=fast validates once, across both ranks
    output = proc.stdout + proc.stderr
    assert not [n for n in NOISE if n in output], output[-4000:]
    # the run directory is printed at start and at end by rank 0 only (each rank used to print it)
    assert proc.stdout.count(f"run directory: {run}") == 2, proc.stdout[-3000:]


def test_bf16_mixed_with_clipping_from_the_console_script(digits_root, tmp_path):
    """`trainer.precision=bf16-mixed` (what trainer=gpu sets) with the default clipping used to fail at
    step 1: Lightning refuses to clip for a fused optimizer under mixed precision."""
    run = tmp_path / "run"
    run_cli(
        [
            "train",
            "debug=fast",
            "trainer.precision=bf16-mixed",
            f"data.root={digits_root}",
            f"hydra.run.dir={run}",
            "export_at_end=false",
            *SMALL_TEXT,
        ],
        cwd=tmp_path / "elsewhere",
    )
    assert json.loads((run / "metrics.json").read_text())["train/loss"] > 0


@pytest.mark.slow
def test_the_wheel_installs_beside_the_users_packages_and_trains(digits_root, tmp_path):
    """`pip install .` (not editable) then `mmpretrain train` from an unrelated directory: the wheel
    must carry conf/ (it used to fail with "Primary config directory not found")."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("mmpretrain-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # The project venv's packages (torch, lightning ...) as the user's own; its editable mmpretrain is
    # not seen: .pth files of a directory added this way are not processed.
    (site / "project_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.check_output(
        [str(python), "-c", "import mmpretrain.cli as c; print(c.__file__); print(c.CONF_DIR)"],
        cwd=elsewhere,
        env=env,
        text=True,
    ).split()
    assert where[0].startswith(str(site)) and where[1] == str(site / "mmpretrain" / "conf"), where
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            str(console_script(python)),
            "train",
            "debug=fast",
            f"data.root={digits_root}",
            f"hydra.run.dir={run}",
            *SMALL_TEXT,
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=420,
        env=env | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert (run / "export" / "model.safetensors").exists()
