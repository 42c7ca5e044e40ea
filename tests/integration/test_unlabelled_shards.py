"""Unlabelled multi-caption shards (no cls, no classnames.txt) through the console script, as a user
runs them: training and validation run, the best checkpoint follows the retrieval metric (no
'could not find the monitored key' warning), the protocol's metrics, the compositional probe, a
zero-shot task and NegCLIP hard negatives all come out; without validation there is no warning either."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
COLORS = ["red", "green", "blue"]
TINY = [
    "data=shards",
    "debug=fast",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.shuffle_buffer=10",
    "data.caption_keys=[json]",
    "data.caption_field=captions",
    "loss.hard_negatives=true",
    "loss.max_negatives=2",
    "export_at_end=false",
    "callbacks.plots=null",
    "logger=csv",
    "model.towers.image.model_name=test_vit",
    "model.towers.image.img_size=16",
    "+model.towers.image.model_kwargs.img_size=16",
    "model.towers.text.config.text_cfg.width=32",
    "model.towers.text.config.text_cfg.heads=2",
    "model.towers.text.config.text_cfg.layers=1",
    "model.towers.text.config.text_cfg.context_length=16",
    "model.embed_dim=32",
]


def scene(i):
    color = i % 3
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), tuple(255 if c == color else 0 for c in range(3))).save(buf, format="PNG")
    meta = {
        "captions": [f"a {COLORS[color]} square", f"a square colored {COLORS[color]}"][: 1 + i % 2],
        "negatives": [f"a {COLORS[(color + 1) % 3]} square"],
        "negative_kinds": ["replace_att"],
        "labels": {"color": color},
    }
    return {
        "__key__": f"s{i:04d}",
        "png": buf.getvalue(),
        "txt": meta["captions"][0],
        "json": json.dumps(meta),
    }


@pytest.fixture(scope="module")
def unlabelled_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabelled")
    for split, n in (("train", 48), ("val", 24)):
        (root / split).mkdir()
        with wds.TarWriter(str(root / split / "000.tar")) as sink:
            for i in range(n):
                sink.write(scene(i))
    (root / "tasks" / "color").mkdir(parents=True)
    (root / "tasks" / "color" / "classnames.txt").write_text("\n".join(COLORS) + "\n")
    (root / "tasks" / "color" / "templates.txt").write_text("a {} square\n")
    return root


def train(root, run, *overrides, tiny=TINY):
    cmd = [
        str(Path(sys.executable).parent / "mmpretrain"),
        "train",
        *tiny,
        f"data.root={root}",
        f"hydra.run.dir={run}",
        *overrides,
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        cmd, cwd=run.parent, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-6000:]}"
    assert "could not find the monitored key" not in out, out[-6000:]
    return out


def test_unlabelled_shards_train_validate_and_keep_a_best_checkpoint(unlabelled_root, tmp_path):
    out = train(unlabelled_root, tmp_path / "run")
    assert "monitoring val/retrieval_mean_R@1/image_text" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in (
        "val/retrieval_mean_R@1/image_text",
        "val/retrieval_rsum/image_text",
        "val/probe/replace_att",
        "val/probe/mean",
        "val/zeroshot_top1/color/image_text",
    ):
        assert key in metrics, sorted(metrics)
    assert "val/zeroshot_top1/image_text" not in metrics
    assert list((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))


def test_class_names_beside_shards_without_labels_keep_a_best_checkpoint(unlabelled_root, tmp_path):
    """classnames.txt and templates.txt at the root, as the README's layout asks, over shards whose rows
    carry no cls: the run used to stop at its first validation (the monitored zero-shot metric was
    never logged), and then at its end (the embedding plots had no labelled row); now the best
    checkpoint follows retrieval, the plots without labels are skipped, and the run says why."""
    root = tmp_path / "named"
    shutil.copytree(unlabelled_root, root)
    (root / "classnames.txt").write_text("\n".join(COLORS) + "\n")
    (root / "templates.txt").write_text("a {} square\n")
    out = train(root, tmp_path / "run", tiny=[o for o in TINY if o != "callbacks.plots=null"])
    assert "the val shards carry no class labels (cls) for zero-shot: monitoring" in out
    assert "plots: no val row has a class label (cls)" in out
    assert list((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    assert (tmp_path / "run" / "plots" / "loss.png").exists()


def test_without_validation_no_monitor_warning(unlabelled_root, tmp_path):
    train(unlabelled_root, tmp_path / "run", "trainer.limit_val_batches=0")
    assert list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))


def first_train_loss(run: Path) -> float:
    import csv

    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("train/loss")]
    return float(rows[0]["train/loss"])


def test_several_captions_per_sample_train_from_the_console_script(unlabelled_root, tmp_path):
    """data.captions_per_sample=2 with the hard negatives: the same first batch scores more caption
    columns, so its loss differs from one caption's; the run trains, validates and checkpoints."""
    losses = {}
    for k in (1, 2):
        run = tmp_path / f"k{k}"
        train(unlabelled_root, run, f"data.captions_per_sample={k}", "trainer.log_every_n_steps=1")
        losses[k] = first_train_loss(run)
        assert list((run / "checkpoints").glob("*.ckpt"))
    assert losses[1] != pytest.approx(losses[2], abs=1e-4), losses
