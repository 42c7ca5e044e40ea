"""train -> checkpoint -> export -> load_pretrained -> eval on the tiny digits, through the CLI functions."""

import json

import pytest
import torch

import mmpretrain
from mmpretrain.commands.evaluate import evaluate
from mmpretrain.commands.export import export_cmd
from mmpretrain.commands.train import train
from tests.conftest import TINY_RUN, compose_config

FAST = TINY_RUN + ["trainer.max_steps=6", "trainer.limit_val_batches=2"]


@pytest.fixture(scope="module")
def trained(digits_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        "train", FAST + [f"data.root={digits_root}", "trainer.val_check_interval=6"], run_dir=run
    )
    metrics = train(cfg)
    return run, metrics


def test_train_writes_the_run_directory(trained):
    run, metrics = trained
    for name in (
        "config.yaml",
        "metrics.csv",
        "metrics.json",
        "checkpoints/last.ckpt",
        "export/model.safetensors",
        "plots/loss.png",
        "plots/similarity_image_text.png",
        "plots/projection_image.png",
    ):
        assert (run / name).exists(), name
    assert "val/zeroshot_top1/image_text" in metrics
    assert "train/loss" in (run / "metrics.csv").read_text().splitlines()[0]


def test_export_load_and_eval_reproduce_the_checkpoint(trained, digits_root, tmp_path):
    run, _ = trained
    out = tmp_path / "exported"
    export_cmd(compose_config("export", [f"ckpt={run}/checkpoints/last.ckpt", f"out={out}"]))
    model = mmpretrain.load_pretrained(out)
    prep = model.preprocess(train=False)
    tokens = torch.stack([prep["text"]("a photo of the digit seven."), prep["text"]("digit 1")])
    ckpt_model = mmpretrain.export.model_from_checkpoint(run / "checkpoints" / "last.ckpt").eval()
    assert torch.equal(model.encode_text(tokens), ckpt_model.encode_text(tokens))

    base = [f"data.root={digits_root}", "data.num_workers=0", "trainer.enable_progress_bar=false"]
    from_ckpt = evaluate(
        compose_config("eval", base + [f"ckpt={run}/checkpoints/last.ckpt"], run_dir=tmp_path / "e1")
    )
    from_export = evaluate(compose_config("eval", base + [f"ckpt={out}"], run_dir=tmp_path / "e2"))
    key = "val/zeroshot_top1/image_text"
    assert from_ckpt[key] == pytest.approx(from_export[key])
    assert json.loads((tmp_path / "e2" / "eval_metrics.json").read_text())[key] == pytest.approx(
        from_export[key]
    )
    assert {"val/retrieval_R@1/image_to_text", "val/retrieval_R@10/text_to_image"} <= set(from_export)


def test_corrupt_samples_are_skipped_counted_and_reported(digits_root, tmp_path):
    import shutil

    import webdataset as wds

    root = tmp_path / "data"
    shutil.copytree(digits_root, root)
    bad = root / "train" / "train-0000.tar"
    samples = list(wds.WebDataset(str(bad), shardshuffle=False))
    for s in samples[:3]:
        s["png"] = b"corrupt"
    with wds.TarWriter(str(bad)) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k != "__url__" and not k.startswith("__local")})
    for other in (root / "train").glob("train-000[1-9].tar"):
        other.unlink()
    good = len(samples) - 3
    steps = good // 16  # one pass over the shard (the corrupt samples come first), no second pass
    cfg = compose_config(
        "train",
        FAST
        + [
            f"data.root={root}",
            f"trainer.max_steps={steps}",
            "trainer.limit_val_batches=0",
            "export_at_end=false",
            "data.shuffle_buffer=1",
            "data.train_samples=16",
        ],
        run_dir=tmp_path / "run",
    )
    metrics = train(cfg)
    assert metrics["skipped_samples"] == 3
