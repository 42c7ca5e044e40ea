"""A checkpoint and an export written by c00ec82 (before the code moved into its current folders)
still evaluate to the metrics c00ec82 printed, and the checkpoint resumes exactly: the resumed run's
losses are the ones the original run logged after it. Through the installed console script."""

from __future__ import annotations

import csv
import json
import shlex
import shutil
from pathlib import Path

import pytest

from tests.integration.test_launch import run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "c00ec82"
EVAL = ["data.build=null", "data.num_workers=0", "data.batch_size=64"]


def training_overrides(digits: Path) -> list[str]:
    """The overrides of the run that wrote the fixtures (overrides.sh), on ``digits``."""
    text = (FIXTURES / "overrides.sh").read_text()
    common = (
        text.split('COMMON="', 1)[1].split('"', 1)[0].replace("\\\n", " ").replace("$DIGITS", str(digits))
    )
    return shlex.split(common)


def losses(path: Path) -> dict[int, float]:
    with open(path, newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.parametrize(
    "source,expected",
    [("export", "eval_export_metrics.json"), ("step0000004.ckpt", "eval_ckpt_metrics.json")],
)
def test_eval_of_an_old_export_and_checkpoint_gives_the_old_metrics(digits_root, tmp_path, source, expected):
    run = tmp_path / "eval"
    run_cli(
        ["eval", f"ckpt={FIXTURES / source}", f"data.root={digits_root}", *EVAL, f"hydra.run.dir={run}"],
        cwd=tmp_path,
    )
    got = json.loads((run / "eval_metrics.json").read_text())
    want = json.loads((FIXTURES / expected).read_text())
    got.pop("val/caption_repeat_frac")  # measured since c00ec82, of the val data (not of the model)
    assert set(got) == set(want)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_an_old_checkpoint_resumes_exactly_and_exports(digits_root, tmp_path):
    ckpt = tmp_path / "old.ckpt"
    shutil.copy(FIXTURES / "step0000004.ckpt", ckpt)
    run = tmp_path / "resumed"
    run_cli(
        ["train", *training_overrides(digits_root), f"resume={ckpt}", f"hydra.run.dir={run}"], cwd=tmp_path
    )
    original, resumed = losses(FIXTURES / "metrics.csv"), losses(run / "metrics.csv")
    assert sorted(resumed) == [4, 5]  # steps 5 and 6 (Lightning counts from 0)
    assert [resumed[s] for s in (4, 5)] == pytest.approx([original[s] for s in (4, 5)], rel=1e-5)
    out = tmp_path / "exported"
    run_cli(["export", f"ckpt={ckpt}", f"out={out}"], cwd=tmp_path)
    assert (out / "model.safetensors").exists() and json.loads((out / "config.json").read_text())["model"][
        "towers"
    ]
