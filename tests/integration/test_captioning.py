"""Captioning as users run it: `mmpretrain train experiment=scenes_coca`, `mmpretrain caption` on a folder
of images and on shards, `mmpretrain eval` of a CoCa checkpoint, `mmpretrain finetune task=caption` on
a CLIP export, and a CoCa export in open_clip's layout loaded by open_clip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmpretrain
from mmpretrain.evaluation.captioning import read_captioned
from mmpretrain.export import model_from_checkpoint
from tests.integration.test_launch import run_cli

#: scenes_coca and scenes_clip shrunk to seconds: 1-block towers, a narrow 1-block decoder, few captions.
SMALL = [
    "debug=fast",
    "data.batch_size=8",
    "model.config.vision_cfg.layers=1",
    "model.config.text_cfg.layers=1",
    "data.val.captioning.samples=4",
    "data.val.captioning.compositional_samples=4",
    "data.val.captioning.retrieval_pool=8",
    "data.val.captioning.max_len=8",
]
DECODER = ["model.decoder.width=64", "model.decoder.layers=1", "model.decoder.heads=2"]


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory) -> Path:
    from mmpretrain.data.synthetic.scenes import build_scenes

    return build_scenes(
        tmp_path_factory.mktemp("scenes") / "s",
        workers=1,
        train=64,
        val=16,
        test=16,
        shard_size=8,  # 2 val shards: one per rank under trainer=fsdp with 2 processes
        image_size_min=64,
        image_size_max=80,
    )


@pytest.fixture(scope="module")
def coca_run(scenes_root, tmp_path_factory) -> Path:
    """experiment=scenes_coca from the console script, with grad caching (2 chunks)."""
    run = tmp_path_factory.mktemp("coca") / "run"
    run_cli(
        ["train", "experiment=scenes_coca", *SMALL, *DECODER, "optim.grad_cache_chunks=2"]
        + [f"data.root={scenes_root}", f"paths.output_dir={run}"],
        cwd=run.parent / "cwd",
    )
    return run


def test_scenes_coca_trains_logs_both_terms_and_captions_validation(coca_run):
    metrics = json.loads((coca_run / "metrics.json").read_text())
    for key in ("train/caption_loss", "train/contrastive_loss", "val/retrieval_mean_R@1/image_text"):
        assert key in metrics
    for prefix in ("val/caption/", "val/caption_retrieval/"):
        for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D", "heldout_naming_rate"):
            assert 0.0 <= metrics[prefix + name] <= (10.0 if name == "CIDEr-D" else 1.0)
    lines = [json.loads(line) for line in (coca_run / "captions_val.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(len(line["references"]) == 5 for line in lines)
    assert {"generated", "retrieved", "reference"} <= set(lines[0])
    assert (coca_run / "plots" / "captions.png").stat().st_size > 1000


def test_caption_command_on_a_folder_and_on_shards_matches_the_python_api(coca_run, scenes_root, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    samples = read_captioned(sorted(str(p) for p in (scenes_root / "val").glob("*.tar")), limit=3)
    for i, image in enumerate(samples.images):
        image.save(folder / ("sub" if i else "") / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    proc = run_cli(
        ["caption", f"ckpt={coca_run / 'export'}", f"in={folder}", "out=caps/captions.jsonl", "max_len=8"]
        + [f"paths.output_dir={tmp_path / 'run1'}"],
        cwd=tmp_path,
    )
    assert "skipped 1 unreadable" in proc.stdout
    lines = [json.loads(line) for line in (tmp_path / "caps" / "captions.jsonl").read_text().splitlines()]
    assert [line["key"] for line in lines] == ["img0.png", "sub/img1.png", "sub/img2.png"]
    # The export loads into the Python API and captions the same images the same way.
    model = mmpretrain.load_pretrained(coca_run / "export")
    images = torch.stack([model.transforms["image"](Image.open(folder / line["key"])) for line in lines])
    assert model.caption(images, max_len=8) == [line["caption"] for line in lines]

    # Shards (from the training checkpoint): every sample once, its references, the scores.
    proc = run_cli(
        ["caption", f"ckpt={coca_run / 'checkpoints' / 'last.ckpt'}", f"in={scenes_root / 'val'}/*.tar"]
        + [
            "out=shards.jsonl",
            "strategy=beam",
            "num_beams=2",
            "max_len=8",
            f"paths.output_dir={tmp_path / 'r2'}",
        ],
        cwd=tmp_path,
    )
    lines = [json.loads(line) for line in (tmp_path / "shards.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and len({line["key"] for line in lines}) == 16
    assert all(len(line["references"]) == 5 for line in lines)
    scores = json.loads((tmp_path / "r2" / "caption_metrics.json").read_text())
    assert scores["captioned"] == 16 and "CIDEr-D" in scores and "CIDEr-D" in proc.stdout


@pytest.mark.slow
def test_eval_of_a_coca_checkpoint_reports_captioning(coca_run, scenes_root, tmp_path):
    proc = run_cli(
        [
            "eval",
            f"ckpt={coca_run / 'export'}",
            "data=scenes",
            f"data.root={scenes_root}",
            "data.num_workers=0",
        ]
        + ["data.val.captioning.samples=4", "data.val.captioning.max_len=8", f"paths.output_dir={tmp_path}"],
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert "val/caption/CIDEr-D" in metrics and "val/caption_retrieval/CIDEr-D" in metrics
    assert "val/caption/BLEU-4" in proc.stdout


@pytest.mark.slow
def test_finetune_task_caption_on_a_clip_export_keeps_the_locked_tower(scenes_root, tmp_path):
    clip = tmp_path / "clip"
    run_cli(
        ["train", "experiment=scenes_clip", *SMALL, f"data.root={scenes_root}", f"paths.output_dir={clip}"],
        cwd=tmp_path,
    )
    run = tmp_path / "ft"
    run_cli(
        [
            "finetune",
            "task=caption",
            f"pretrained={clip / 'export'}",
            "data=scenes",
            f"data.root={scenes_root}",
        ]
        + ["data.num_workers=0", "data.batch_size=8", "task.epochs=2", "task.decoder.width=64"]
        + ["task.decoder.layers=1", "data.val.captioning.samples=4", "data.val.captioning.max_len=8"]
        + ["data.val.captioning.compositional_samples=4", "data.val.captioning.retrieval_pool=8"]
        + ["trainer.enable_progress_bar=false", f"paths.output_dir={run}"],
        cwd=tmp_path,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/caption_loss"] > 0 and "val/caption/CIDEr-D" in metrics
    before, after = mmpretrain.load_pretrained(clip / "export"), mmpretrain.load_pretrained(run / "export")
    assert before.decoder is None and after.decoder is not None
    for k, v in before.towers["image"].state_dict().items():  # task.lock_image=true (the default)
        torch.testing.assert_close(after.towers["image"].state_dict()[k], v)
    run_cli(
        ["caption", f"ckpt={run / 'export'}", f"in={scenes_root / 'val'}", "out=c.jsonl", "max_len=8"]
        + [f"paths.output_dir={tmp_path / 'c'}"],
        cwd=tmp_path,
    )
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 16


@pytest.mark.slow
def test_open_clip_coca_trains_and_exports_in_open_clip_layout(scenes_root, tmp_path):
    """model=openclip with a CoCa model config (multimodal_cfg) and loss=coca, then `export format=open_clip`:
    open_clip loads the directory and, fed our greedy caption, predicts each of its tokens (greedy)."""
    import open_clip

    conf = Path(mmpretrain.__file__).resolve().parents[1] / "conf" / "model" / "open_clip"
    run = tmp_path / "run"
    run_cli(
        [
            "train",
            "model=openclip",
            f"model.config={conf / 'coca-4x192-p8-64.json'}",
            "loss=coca",
            "data=scenes",
        ]
        + ["debug=fast", "data.batch_size=8", f"data.root={scenes_root}", "data.val.captioning.samples=4"]
        + [
            "data.val.captioning.max_len=8",
            "data.val.captioning.compositional_samples=4",
            f"paths.output_dir={run}",
        ],
        cwd=tmp_path,
    )
    out = tmp_path / "oc"
    run_cli(
        ["export", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"out={out}", "format=open_clip"],
        cwd=tmp_path,
    )
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    theirs.eval()
    ours = model_from_checkpoint(out).eval()
    image = Image.new("RGB", (70, 70), (200, 30, 30))
    x = preprocess(image)[None]
    (caption,) = ours.generate(x, max_len=12)
    ids = torch.tensor([[49406, *caption, 49407]])
    with torch.no_grad():
        logits = theirs(x, ids, output_labels=False)["logits"]
    predicted = logits[0].argmax(-1).tolist()
    # Each caption token is open_clip's greedy choice after the tokens before it (the last one forced at
    # max_len, or the end token).
    assert predicted[: len(caption)] == caption


@pytest.mark.slow
def test_scenes_coca_under_fsdp_trains_and_captions(scenes_root, tmp_path):
    """trainer=fsdp on 2 CPU processes: the towers' forward_with_tokens and generate run with their
    weights gathered, so the caption loss trains and validation captions."""
    run = tmp_path / "run"
    run_cli(
        ["train", "experiment=scenes_coca", *SMALL, *DECODER, "trainer=fsdp", "trainer.devices=2"]
        + ["trainer.accelerator=cpu", f"data.root={scenes_root}", f"paths.output_dir={run}"],
        cwd=tmp_path,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert "train/caption_loss" in metrics and "val/caption/CIDEr-D" in metrics
    assert len((run / "captions_val.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_finetune_task_caption_on_a_model_configs_own_weights(scenes_root, tmp_path):
    """pretrained=model: the towers of the model config with their own starting weights (here a timm
    resnet10t from a local weights file, as a hub name's weights would come) get a caption decoder."""
    import timm
    from safetensors.torch import save_file

    weights = timm.create_model("resnet10t", num_classes=0).state_dict()
    save_file(weights, str(tmp_path / "resnet10t.safetensors"))
    run = tmp_path / "ft"
    run_cli(
        [
            "finetune",
            "task=caption",
            "pretrained=model",
            "model=tiny",
            "data=scenes",
            f"data.root={scenes_root}",
        ]
        + [f"model.towers.image.pretrained_path={tmp_path / 'resnet10t.safetensors'}", "data.num_workers=0"]
        + ["data.batch_size=8", "task.epochs=1", "task.decoder.width=32", "task.decoder.layers=1"]
        + ["task.decoder.heads=2", "data.val.captioning.samples=4", "data.val.captioning.max_len=6"]
        + ["data.val.captioning.compositional_samples=4", "data.val.captioning.retrieval_pool=8"]
        + ["trainer.enable_progress_bar=false", f"paths.output_dir={run}"],
        cwd=tmp_path,
    )
    model = mmpretrain.load_pretrained(run / "export")
    assert model.decoder is not None
    for k, v in weights.items():  # locked: the starting weights, unchanged
        torch.testing.assert_close(model.towers["image"].model.state_dict()[k], v)
