"""Validation under DDP when a rank has no val batch: 1 val shard for 2 ranks (the val stream splits
shards by rank, so rank 1 reads nothing). Rank 1 must still join every gather (it used to skip
them and leave rank 0 waiting forever) and the metrics must equal a 1-process eval.

Runs the installed entry point as users do (`mmpretrain eval ... trainer=ddp`), 2 gloo processes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import compose_config
from tests.integration.test_fault_tolerance import ROOT, TINY, env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_val_shard(tmp_path_factory):
    from mmpretrain.data.synthetic.digits import build_digits

    return build_digits(tmp_path_factory.mktemp("digits_1val"), image_size=16, train_shards=1, val_shards=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny untrained model, exported: many digits captions are identical, so its val scores have
    exact ties, which both runs must count the same way."""
    import lightning as L

    from mmpretrain.export import export
    from mmpretrain.model import build_model

    L.seed_everything(0)
    cfg = compose_config("train", TINY)
    return export(build_model(cfg.model).eval(), tmp_path_factory.mktemp("export"))


def test_ddp_validation_with_an_empty_rank_completes_and_matches_one_process(
    one_val_shard, exported, tmp_path
):
    from mmpretrain.commands.evaluate import evaluate

    assert len(list((one_val_shard / "val").glob("*.tar"))) == 1
    common = [
        f"ckpt={exported}",
        f"data.root={one_val_shard}",
        "data.num_workers=0",
        "data.batch_size=64",
        "trainer.enable_progress_bar=false",
    ]
    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "mmpretrain.cli",
        "eval",
        *common,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={run}",
    ]
    try:
        proc = subprocess.run(
            cmd, check=False, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"DDP validation hung\n{(e.stderr or b'')[-3000:]!r}") from None
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ddp = json.loads((run / "eval_metrics.json").read_text())

    single = evaluate(compose_config("eval", common, run_dir=tmp_path / "single"))
    assert "val/zeroshot_top1/image_text" in single and "val/retrieval_R@1/image_to_text" in single
    assert sorted(ddp) == sorted(single)
    # Rank 0 reads the one shard in the same order as the single process: the same numbers.
    for k in single:
        assert ddp[k] == pytest.approx(single[k], abs=1e-6), k
