"""mmpretrain finetune: linear probe, full and fusion on the digits, from an open_clip trainer checkpoint
and from an mmpretrain export; metrics agree with the confusion matrix written beside them."""

import json

import pytest
import torch

import mmpretrain
from mmpretrain.commands.finetune import finetune
from mmpretrain.export import export
from mmpretrain.finetune.heads import FusionClassifier, TowerClassifier
from mmpretrain.interop.open_clip import open_clip_model_config
from mmpretrain.io import read_checkpoint
from tests.conftest import compose_config
from tests.integration.test_export_interop import OC_CFG, _open_clip_trainer_checkpoint

FAST = ["trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=64"]


def _check_run(run, metrics, n_val):
    assert json.loads((run / "metrics.json").read_text())["val/accuracy"] == pytest.approx(
        metrics["val/accuracy"]
    )
    cm = torch.tensor(json.loads((run / "confusion_matrix.json").read_text())["matrix"])
    assert cm.sum() == n_val  # every val sample scored exactly once
    assert metrics["val/accuracy"] == pytest.approx((cm.trace() / cm.sum()).item(), abs=1e-6)
    per_class_f1 = 2 * cm.diag() / (cm.sum(0) + cm.sum(1)).clamp_min(1)
    assert metrics["val/f1_macro"] == pytest.approx(per_class_f1.mean().item(), abs=1e-5)
    assert (run / "plots" / "confusion_matrix.png").stat().st_size > 1000
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "metrics.csv").exists()


@pytest.fixture(scope="module")
def oc_trainer_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("oc")
    oc = _open_clip_trainer_checkpoint(d / "epoch_3.pt")
    (d / "cfg.json").write_text(json.dumps(OC_CFG))
    return d, oc


def test_linear_probe_from_open_clip_trainer_checkpoint(oc_trainer_ckpt, digits_root, tmp_path):
    d, _ = oc_trainer_ckpt
    cfg = compose_config(
        "finetune",
        FAST
        + [
            "task=linear_probe",
            f"pretrained={d}/epoch_3.pt",
            "model=openclip",
            f"model.config={d}/cfg.json",
            f"data.root={digits_root}",
            "task.epochs=2",
        ],
        run_dir=tmp_path / "run",
    )
    metrics = finetune(cfg)
    _check_run(tmp_path / "run", metrics, n_val=359)


def test_fusion_from_open_clip_trainer_checkpoint_keeps_the_loaded_towers(
    oc_trainer_ckpt, digits_root, tmp_path
):
    d, oc = oc_trainer_ckpt
    cfg = compose_config(
        "finetune",
        FAST
        + [
            "task=fusion",
            "fusion=attention",
            f"pretrained={d}/epoch_3.pt",
            "model=openclip",
            f"model.config={d}/cfg.json",
            f"data.root={digits_root}",
            "task.epochs=1",
            "task.width=32",
            "task.layers=1",
            "trainer.limit_train_batches=3",
        ],
        run_dir=tmp_path / "run",
    )
    metrics = finetune(cfg)
    _check_run(tmp_path / "run", metrics, n_val=359)
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    # frozen towers: still exactly the open_clip trainer's weights after training the fusion head
    assert torch.equal(state["net.model.towers.image.visual.conv1.weight"], oc.visual.conv1.weight)
    assert torch.equal(state["net.model.towers.text.text.token_embedding.weight"], oc.token_embedding.weight)


def test_full_finetune_from_an_export_trains_the_tower_at_its_own_lr(digits_root, tmp_path):
    cfg = compose_config("train", ["model=tiny", "model.towers.text.config.text_cfg.layers=1"])
    torch.manual_seed(0)
    model = mmpretrain.create_model(cfg.model)
    export(model, tmp_path / "exp")
    before = {k: v.clone() for k, v in model.towers.image.state_dict().items()}
    run = tmp_path / "run"
    metrics = finetune(
        compose_config(
            "finetune",
            FAST
            + [
                "task=full",
                f"pretrained={tmp_path}/exp",
                f"data.root={digits_root}",
                "task.epochs=1",
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=2",
            ],
            run_dir=run,
        )
    )
    assert 0 <= metrics["val/accuracy"] <= 1 and "train/loss" in metrics
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    changed = [
        k
        for k, v in before.items()
        if v.is_floating_point() and not torch.equal(state[f"net.model.towers.image.{k}"], v)
    ]
    assert changed, "the tower did not train"
    assert "net.model.towers.text.text.token_embedding.weight" in state  # the whole model is kept


def test_layer_decay_groups_scale_lr_from_the_top():
    cfg = compose_config("train", ["model=tiny"])
    net = TowerClassifier(mmpretrain.create_model(cfg.model), "image", 10)
    groups = net.param_groups(lr=1.0, tower_lr_scale=0.1, layer_decay=0.5)
    tower = [g for g in groups if g["name"].startswith("tower.")]
    assert len(tower) > 2
    assert [g["lr"] for g in tower] == pytest.approx(
        [0.1 * 0.5 ** (len(tower) - 1 - i) for i in range(len(tower))]
    )
    assert groups[0]["name"] == "head" and groups[0]["lr"] == 1.0
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(net.head.parameters())) + len(list(net.model.towers.image.parameters()))


@pytest.mark.parametrize("fusion", ["early", "late", "attention"])
def test_fusion_modes_use_every_modality_and_never_the_frozen_towers(fusion):
    torch.manual_seed(0)
    model = mmpretrain.create_model(open_clip_model_config(OC_CFG))
    prep = model.preprocess(False)
    from PIL import Image

    images = torch.stack([prep["image"](Image.new("RGB", (32, 32), c)) for c in ("red", "blue", "white")])
    text = torch.stack([prep["text"](t) for t in ("one", "a photo of the digit two", "3")])
    net = FusionClassifier(
        model, ["image", "text"], 10, fusion, {"image": images, "text": text}, width=32, layers=1
    )
    net.train()
    logits = net({"image": images, "text": text})
    assert logits.shape == (3, 10)
    logits.sum().backward()
    assert all(p.grad is None for p in model.parameters())
    # changing only the text changes the logits (the text branch is used), and only the image likewise
    net.eval()
    base = net({"image": images, "text": text})
    assert not torch.allclose(base, net({"image": images, "text": text.roll(1, 0)}))
    assert not torch.allclose(base, net({"image": images.roll(1, 0), "text": text}))


def test_bad_task_inputs_fail_with_clear_messages(digits_root, tmp_path):
    cfg = compose_config("train", ["model=tiny", "model.towers.text.config.text_cfg.layers=1"])
    export(mmpretrain.create_model(cfg.model), tmp_path / "exp")
    base = FAST + [f"pretrained={tmp_path}/exp", f"data.root={digits_root}"]
    with pytest.raises(ValueError, match="the pretrained model has"):
        finetune(
            compose_config(
                "finetune", base + ["task=linear_probe", "task.modality=audio"], run_dir=tmp_path / "a"
            )
        )
    with pytest.raises(ValueError, match="fusion=mid is unknown"):
        finetune(compose_config("finetune", base + ["task=fusion", "fusion=mid"], run_dir=tmp_path / "b"))
    with pytest.raises(ValueError, match="model=openclip model.config="):
        finetune(
            compose_config(
                "finetune",
                FAST + [f"pretrained={tmp_path}/exp/model.safetensors", f"data.root={digits_root}"],
                run_dir=tmp_path / "c",
            )
        )


@pytest.mark.slow
def test_frozen_fusion_towers_keep_their_norm_statistics(digits_root, tmp_path):
    cfg = compose_config("train", ["model=tiny", "model.towers.text.config.text_cfg.layers=1"])
    torch.manual_seed(0)
    model = mmpretrain.create_model(cfg.model)  # timm CNN with BatchNorm, in train mode
    before = {k: v.clone() for k, v in model.towers.image.state_dict().items() if "running" in k}
    from mmpretrain.finetune import run

    fcfg = compose_config(
        "finetune",
        [
            "task=fusion",
            "fusion=late",
            "pretrained=unused",
            f"data.root={digits_root}",
            "data.num_workers=0",
            "data.batch_size=32",
        ],
    )
    task = dict(fcfg.task) | {"epochs": 1, "fusion": "late"}
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(fcfg.data, resolve=True)
    trainer = OmegaConf.to_container(fcfg.trainer, resolve=True) | {
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "enable_progress_bar": False,
    }
    run(task, model, data, trainer, tmp_path, classnames=[str(i) for i in range(10)])
    after = model.towers.image.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
