"""mmpretrain finetune task=vqa: from the console script on the scenes (a scenes_clip export, an
open_clip model from an offline hub cache, a timm image tower) and on a user's table with several
answers per question; metrics agree with the questions in the shards and the per-type confusion
matrices; the blind baselines see only their input; locked towers stay as loaded."""

import csv
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

import mmpretrain
from mmpretrain.data.synthetic.scenes import build_scenes
from mmpretrain.export import export
from mmpretrain.finetune.vqa import VQANet
from mmpretrain.io import read_checkpoint
from tests.conftest import compose_config
from tests.hub_cache import add_open_clip, add_timm
from tests.integration.test_launch import run_cli

QUESTION_TYPES = {"color", "shape", "size", "count", "exist", "relation", "compare"}
SCENES = ["train=60", "val=20", "test=20", "shard_size=30", "image_size_min=32", "image_size_max=48"]
# the scenes_clip experiment's model (open_clip ViT + text transformer), shrunk
SMALL_CLIP = [
    "experiment=scenes_clip",
    "model.config.embed_dim=32",
    "model.config.vision_cfg.image_size=32",
    "model.config.vision_cfg.layers=1",
    "model.config.vision_cfg.width=64",
    "model.config.vision_cfg.head_width=32",
    "model.config.text_cfg.layers=1",
    "model.config.text_cfg.width=64",
    "model.config.text_cfg.heads=2",
]
FAST = [
    "data.num_workers=0",
    "data.batch_size=16",
    "task.epochs=1",
    "task.width=32",
    "task.heads=2",
    "trainer.enable_progress_bar=false",
]


def small_clip_export(path: Path) -> mmpretrain.model.ContrastiveModel:
    torch.manual_seed(0)
    model = mmpretrain.create_model(compose_config("train", SMALL_CLIP).model)
    export(model, path)
    return model


def shard_questions(root: Path, split: str) -> list[dict]:
    urls = sorted(str(p) for p in (root / split).glob("*.tar"))
    return [qa for s in wds.WebDataset(urls, shardshuffle=False) for qa in json.loads(s["json"])["qa"]]


def check_run(run: Path, root: Path | None, splits: tuple[str, ...], types: set[str]) -> dict:
    """metrics.json, vqa_results.json, the confusion plots and the checkpoint agree with each other
    and with the questions in the shards (single answers: accuracy = the confusion's trace / questions)."""
    metrics = json.loads((run / "metrics.json").read_text())
    results = json.loads((run / "vqa_results.json").read_text())
    assert set(results) == set(splits)
    for split in splits:
        assert 0 <= metrics[f"{split}/vqa_accuracy"] <= 1
        assert results[split]["vqa_accuracy"] == pytest.approx(metrics[f"{split}/vqa_accuracy"], abs=1e-6)
        assert {
            k.split("/")[-1] for k in metrics if k.startswith(f"{split}/vqa_accuracy/question_type/")
        } == types
        if root is None:
            continue
        questions = shard_questions(root, split)
        assert results[split]["questions"] == len(questions)  # every question scored once
        for qtype in types:
            n = sum(q["question_type"] == qtype for q in questions)
            cm = torch.tensor(results[split]["confusion"][qtype]["matrix"])
            assert metrics[f"{split}/vqa_accuracy/question_type/{qtype}"] == pytest.approx(
                cm.trace().item() / n
            )
            assert (run / "plots" / f"confusion_{split}_{qtype}.png").stat().st_size > 1000
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "answers.txt").exists()
    return metrics


def test_vqa_on_the_scenes_from_a_scenes_clip_export_through_the_console_script(tmp_path):
    root, run = tmp_path / "scenes", tmp_path / "run"
    run_cli(["data", "scenes", f"out={root}", "workers=1", *SCENES], cwd=tmp_path / "elsewhere")
    model = small_clip_export(tmp_path / "exp")
    proc = run_cli(
        ["finetune", "task=vqa", f"pretrained={tmp_path}/exp", "data=scenes", f"data.root={root}", *FAST]
        + [f"hydra.run.dir={run}"],
        cwd=tmp_path / "elsewhere",
    )
    assert "val/vqa_accuracy" in proc.stdout and "test_compositional/vqa_accuracy" in proc.stdout
    check_run(run, root, ("val", "test_compositional"), QUESTION_TYPES)
    vocabulary = (run / "answers.txt").read_text().split()
    assert {"yes", "no", "red", "circle", "small", "0", "4"} <= set(vocabulary)
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    # locked towers (the default): the export's weights after training
    for name, value in model.towers.state_dict().items():
        assert torch.equal(state[f"net.model.towers.{name}"], value), name


def _tiny_vqa_net(inputs: str, fusion: str = "attention") -> tuple[VQANet, dict]:
    """Two images; questions 0 and 1 alike (on images 0 and 1), 1 and 2 about the same image."""
    torch.manual_seed(0)
    model = mmpretrain.create_model(compose_config("train", SMALL_CLIP).model)
    prep = model.preprocess(False)
    images = torch.stack([prep["image"](Image.new("RGB", (32, 32), c)) for c in ("red", "blue")])
    text = torch.stack([prep["text"](q) for q in ("what colour is it?", "what colour is it?", "is it red?")])
    task = {"inputs": inputs, "fusion": fusion, "width": 32, "layers": 1, "heads": 2, "towers": "locked"}
    net = VQANet(model, task, 5, {"image": images, "text": text}).eval()
    return net, {"image": images, "text": text, "owner": torch.tensor([0, 1, 1])}


@pytest.mark.parametrize("fusion", ["attention", "early", "late"])
def test_both_inputs_use_the_image_and_the_question(fusion):
    net, batch = _tiny_vqa_net("both", fusion)
    with torch.no_grad():
        logits = net(batch)
    assert logits.shape == (3, 5)
    assert not torch.allclose(logits[0], logits[1], atol=1e-5)  # same question, other image
    assert not torch.allclose(logits[1], logits[2], atol=1e-5)  # same image, other question


def test_blind_baselines_see_only_their_input():
    net, batch = _tiny_vqa_net("question_only")
    with torch.no_grad():
        logits = net({k: v for k, v in batch.items() if k != "image"})  # never asks for the image
    assert torch.allclose(logits[0], logits[1], atol=1e-6)  # the same question on two images
    assert not torch.allclose(logits[1], logits[2], atol=1e-5)
    net, batch = _tiny_vqa_net("image_only")
    with torch.no_grad():
        logits = net({k: v for k, v in batch.items() if k != "text"})
    assert torch.allclose(logits[1], logits[2], atol=1e-6)  # two questions about one image
    assert not torch.allclose(logits[0], logits[1], atol=1e-5)


def test_tuned_towers_get_their_own_lr_with_layer_decay_and_locked_ones_none():
    net, _ = _tiny_vqa_net("both")
    assert [g["name"] for g in net.param_groups(1.0, {"image": 0.1, "text": 0.2}, None)] == ["head"]
    torch.manual_seed(0)
    model = mmpretrain.create_model(compose_config("train", SMALL_CLIP).model)
    task = {"inputs": "both", "fusion": "attention", "width": 32, "layers": 1, "heads": 2, "towers": "tuned"}
    prep = model.preprocess(False)
    example = {"image": prep["image"](Image.new("RGB", (32, 32)))[None], "text": prep["text"]("q?")[None]}
    net = VQANet(model, task, 5, example)
    groups = net.param_groups(1.0, {"image": 0.1, "text": 0.2}, 0.5)
    for m, scale in (("image", 0.1), ("text", 0.2)):
        lrs = [g["lr"] for g in groups if g["name"].startswith(f"{m}.")]
        assert len(lrs) > 2 and lrs == pytest.approx(
            [scale * 0.5 ** (len(lrs) - 1 - i) for i in range(len(lrs))]
        )
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in net.parameters())


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    opts = dict(s.split("=") for s in SCENES)
    return build_scenes(
        tmp_path_factory.mktemp("scenes") / "s", workers=1, **{k: int(v) for k, v in opts.items()}
    )


def test_blind_baseline_and_cross_entropy_through_the_finetune_command(scenes_root, tmp_path):
    from mmpretrain.commands.finetune import finetune

    small_clip_export(tmp_path / "exp")
    run = tmp_path / "run"
    cfg = compose_config(
        "finetune",
        FAST
        + [
            "task=vqa",
            "task.inputs=question_only",
            "task.loss=ce",
            "task.test=null",
            f"pretrained={tmp_path}/exp",
            "data=scenes",
            f"data.root={scenes_root}",
        ],
        run_dir=run,
    )
    metrics = finetune(cfg)
    check_run(run, scenes_root, ("val",), QUESTION_TYPES)
    assert "train/loss" in metrics
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    # one input's encoder (no per-modality projections of the two-input fusion)
    assert "net.fusion.proj.weight" in state and "net.fusion.proj.image.weight" not in state


@pytest.mark.slow
def test_a_users_table_with_several_answers_per_question(tmp_path):
    """`mmpretrain data shards` on a table with question/answer columns (ten answers in a cell, one
    with an article and one wrong), then task=vqa on it: soft scores make the majority answer exact."""
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(24):
        colour = ("red", "blue")[i % 2]
        Image.new("RGB", (32, 32), colour).save(tmp_path / "img" / f"{i}.jpg")
        answers = [colour] * 8 + [f"the {colour}", "green"]
        rows.append(
            {"filepath": f"img/{i}.jpg", "question": "what colour is it?", "answer": "|".join(answers)}
        )
        rows.append(
            {"filepath": f"img/{i}.jpg", "question": "is it red?", "answer": "yes" if i % 2 == 0 else "no"}
        )
    rows.append({"filepath": "img/0.jpg", "question": "what is it?", "answer": ""})  # no answer: reported
    with open(tmp_path / "vqa.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["filepath", "question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    out, run = tmp_path / "out", tmp_path / "run"
    small_clip_export(tmp_path / "exp")
    proc = run_cli(
        ["data", "shards", f"in={tmp_path}/vqa.csv", f"out={out}", "val_fraction=0.3"], cwd=tmp_path
    )
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["reason"] for s in skipped] == ["question without answer"], proc.stdout
    questions = shard_questions(out, "train") + shard_questions(out, "val")
    assert len(questions) == 2 * 23  # the 23 images without the bad row, two questions each
    colour = next(q for q in questions if q["question"] == "what colour is it?")
    assert len(colour["answers"]) == 10 and "green" in colour["answers"]
    run_cli(
        ["finetune", "task=vqa", f"pretrained={tmp_path}/exp", "data=shards", f"data.root={out}"]
        + [*FAST, "data.batch_size=4", "task.epochs=5", "task.lr=3e-3", f"hydra.run.dir={run}"],
        cwd=tmp_path,
    )
    metrics = check_run(run, None, ("val",), {"all"})
    # the answers are "red"/"blue" (soft 1.0) and "green" (0.3): a trained model predicts the majority,
    # which scores exactly 1 on every question (9 normalised matches of 10)
    assert metrics["val/vqa_accuracy"] == pytest.approx(1.0)
    assert "green" in (run / "answers.txt").read_text().split()


@pytest.mark.slow
def test_vqa_from_an_open_clip_model_in_an_offline_hub_cache(scenes_root, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    reference = add_open_clip(cache, "org/tiny-clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    run = tmp_path / "run"
    run_cli(
        ["finetune", "task=vqa", "pretrained=hf-hub:org/tiny-clip", "data=scenes", f"data.root={scenes_root}"]
        + [*FAST, f"hydra.run.dir={run}"],
        cwd=tmp_path / "elsewhere",
    )
    check_run(run, scenes_root, ("val", "test_compositional"), QUESTION_TYPES)
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert torch.equal(
        state["net.model.towers.text.text.token_embedding.weight"], reference.text.token_embedding.weight
    )
    assert torch.equal(state["net.model.towers.image.visual.conv1.weight"], reference.visual.conv1.weight)


@pytest.mark.slow
def test_vqa_from_a_timm_image_tower_in_an_offline_hub_cache(scenes_root, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    reference = add_timm(cache, "org/tiny-resnet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    run = tmp_path / "run"
    run_cli(
        [
            "finetune",
            "task=vqa",
            "pretrained=model",
            "model=tiny",
            "model.towers.image.model_name=hf-hub:org/tiny-resnet",
        ]
        + ["data=scenes", f"data.root={scenes_root}", *FAST, f"hydra.run.dir={run}"],
        cwd=tmp_path / "elsewhere",
    )
    check_run(run, scenes_root, ("val", "test_compositional"), QUESTION_TYPES)
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    weights = {
        k: v for k, v in reference.state_dict().items() if v.is_floating_point() and not k.startswith("fc.")
    }
    assert len(weights) > 20  # every weight but the classifier (the tower has none): loaded, left alone
    for name, value in weights.items():
        assert torch.equal(state[f"net.model.towers.image.model.{name}"], value), name


RANK = ["task.answer_mode=rank", "task.decoder.width=32", "task.decoder.layers=1", "task.decoder.heads=2"]


def test_rank_mode_on_a_clip_export_trains_a_new_decoder_through_the_console_script(scenes_root, tmp_path):
    """answer_mode=rank from the console script: a CLIP export has no decoder, so a new one (task.decoder)
    learns "question answer" sequences; the answers are ranked by it and scored on every split."""
    model = small_clip_export(tmp_path / "exp")
    run = tmp_path / "run"
    proc = run_cli(
        ["finetune", "task=vqa", f"pretrained={tmp_path}/exp", "data=scenes", f"data.root={scenes_root}"]
        + [*FAST, *RANK, f"hydra.run.dir={run}"],
        cwd=tmp_path / "elsewhere",
    )
    assert "test_compositional/vqa_accuracy" in proc.stdout
    check_run(run, scenes_root, ("val", "test_compositional"), QUESTION_TYPES)
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    state = ckpt["state_dict"]
    assert ckpt["hyper_parameters"]["model"]["decoder"]["width"] == 32
    assert any(k.startswith("net.model.decoder.") for k in state)
    for name, value in model.towers.state_dict().items():  # locked towers: as exported
        assert torch.equal(state[f"net.model.towers.{name}"], value), name


@pytest.mark.slow
def test_rank_mode_on_a_coca_export_keeps_and_trains_its_decoder(scenes_root, tmp_path):
    from tests.unit.test_coca import ours

    coca = ours()  # our decoder (width 32, 2 layers) on an open_clip ViT: a loss=coca model
    export(coca, tmp_path / "exp")
    run = tmp_path / "run"
    run_cli(
        ["finetune", "task=vqa", f"pretrained={tmp_path}/exp", "data=scenes", f"data.root={scenes_root}"]
        + [*FAST, "task.answer_mode=rank", "task.test=null", f"hydra.run.dir={run}"],
        cwd=tmp_path / "elsewhere",
    )
    check_run(run, scenes_root, ("val",), QUESTION_TYPES)
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["hyper_parameters"]["model"]["decoder"]["layers"] == 2  # its own, not task.decoder's
    trained = ckpt["state_dict"]
    changed = [
        k
        for k, v in coca.decoder.state_dict().items()
        if not torch.equal(trained[f"net.model.decoder.{k}"], v)
    ]
    assert changed  # the decoder was fine-tuned from the CoCa's weights
