"""Export round trips: mmpretrain layout, open_clip's own layout (loaded in a clean process), TorchScript,
an open_clip trainer checkpoint as input, and a malicious pickle refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmpretrain
from mmpretrain.commands.export import export_cmd
from mmpretrain.export import export, model_from_checkpoint
from mmpretrain.interop.open_clip import export_open_clip, open_clip_model_config
from mmpretrain.io import UnsafeCheckpointError
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[2]
# A small open_clip-native model (ViT 1x64 patch 8 at 32 px + text 1x64): random weights, CPU-cheap.
OC_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _images(n=3):
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


CAPTIONS = ["a photo of the digit seven.", "digit 1", "the number three"]


@pytest.fixture(scope="module")
def oc_model():
    torch.manual_seed(0)
    model = mmpretrain.create_model(open_clip_model_config(OC_CFG)).eval()
    with torch.no_grad():
        model.logit_scales["shared"].fill_(3.0)
    return model


def _embed(model):
    prep = model.preprocess(train=False)
    with torch.no_grad():
        img = model.encode_image(torch.stack([prep["image"](im) for im in _images()]))
        txt = model.encode_text(torch.stack([prep["text"](c) for c in CAPTIONS]))
    return img, txt


def test_export_then_load_pretrained_gives_identical_embeddings(oc_model, tmp_path):
    export(oc_model, tmp_path / "exp", extra={"metrics": {"val/zeroshot_top1/image_text": 0.5}})
    loaded = mmpretrain.load_pretrained(tmp_path / "exp")
    a, b = _embed(oc_model), _embed(loaded)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # transforms and tokenizer come with it; the same text through encode(modality, x)
    tokens = torch.stack([loaded.tokenizer(c) for c in CAPTIONS])
    assert torch.equal(loaded.encode("text", tokens), a[1])
    assert set(loaded.transforms) == {"image", "text"}
    settings = json.loads((tmp_path / "exp" / "preprocess.json").read_text())
    assert settings["text"]["context_length"] == 16 and settings["image"]["size"] == 32
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "val/zeroshot_top1/image_text | 0.5000" in card


CHILD = r"""
import sys, json, torch, open_clip
from PIL import Image
d = sys.argv[1]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + d)
tokenizer = open_clip.get_tokenizer("local-dir:" + d)
model.eval()
g = torch.Generator().manual_seed(0)
ims = [Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).byte().numpy()) for _ in range(3)]
with torch.no_grad():
    img = model.encode_image(torch.stack([preprocess(im) for im in ims]), normalize=True)
    txt = model.encode_text(tokenizer(json.loads(sys.argv[2])), normalize=True)
assert "mmpretrain" not in sys.modules, "mmpretrain was imported"
torch.save({"image": img, "text": txt, "logit_scale": model.logit_scale.detach()}, sys.argv[3])
"""


def test_open_clip_layout_loads_in_a_process_without_mmpretrain(oc_model, tmp_path):
    out = export_open_clip(oc_model, tmp_path / "oc")
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = tmp_path / "emb.pt"
    subprocess.run(
        [sys.executable, "-c", CHILD, str(out), json.dumps(CAPTIONS), str(result)],
        env=env,
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    theirs = torch.load(result, weights_only=True)
    img, txt = _embed(oc_model)
    torch.testing.assert_close(theirs["image"], img, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs["text"], txt, atol=1e-5, rtol=0)
    assert theirs["logit_scale"].item() == pytest.approx(3.0)
    # ... and back: the open_clip directory is also a `pretrained=`/`ckpt=` source for mmpretrain
    back = model_from_checkpoint(out).eval()
    assert torch.equal(_embed(back)[1], txt)


def test_open_clip_format_is_refused_for_non_open_clip_towers(tmp_path):
    cfg = compose_config("train", ["model=tiny"])
    model = mmpretrain.create_model(cfg.model)
    with pytest.raises(
        ValueError, match="format=open_clip needs an image and a text tower both built by open_clip"
    ):
        export_open_clip(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _open_clip_trainer_checkpoint(path: Path, seed: int = 1) -> dict:
    """What open_clip's trainer saves: {"epoch", "name", "state_dict" with module. prefixes, "optimizer"},
    here from an open_clip CLIP built by open_clip itself (CLIP text layout, not CustomTextCLIP)."""
    import open_clip

    torch.manual_seed(seed)
    oc = open_clip.CLIP(**OC_CFG)
    state = {f"module.{k}": v for k, v in oc.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return oc.eval()


def test_open_clip_trainer_checkpoint_loads_with_its_model_config(tmp_path):
    oc = _open_clip_trainer_checkpoint(tmp_path / "epoch_3.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(OC_CFG))
    cfg = compose_config(
        "export",
        [
            "model=openclip",
            f"model.config={tmp_path}/cfg.json",
            f"ckpt={tmp_path}/epoch_3.pt",
            f"out={tmp_path}/exp",
        ],
    )
    export_cmd(cfg)
    ours = mmpretrain.load_pretrained(tmp_path / "exp")
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.encode_text(tok), oc.encode_text(tok, normalize=True), atol=1e-5, rtol=0
        )
    with pytest.raises(ValueError, match="model=openclip model.config="):
        model_from_checkpoint(tmp_path / "epoch_3.pt")


class _WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"model": _WritesAFile(str(marker))}}, tmp_path / "evil.ckpt"
    )
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.ckpt"):
        model_from_checkpoint(tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError):
        export_cmd(compose_config("export", [f"ckpt={tmp_path}/evil.ckpt", f"out={tmp_path}/o"]))
    assert not marker.exists()


@pytest.mark.slow
def test_torchscript_export_matches(oc_model, tmp_path):
    export_cmd_model = oc_model
    from mmpretrain.interop.torchscript import export_torchscript

    out = export_torchscript(export_cmd_model, tmp_path / "ts")
    prep = oc_model.preprocess(train=False)
    x = torch.stack([prep["image"](im) for im in _images()])
    t = torch.stack([prep["text"](c) for c in CAPTIONS])
    img, txt = _embed(oc_model)
    torch.testing.assert_close(torch.jit.load(str(out / "encode_image.pt"))(x), img, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.jit.load(str(out / "encode_text.pt"))(t), txt, atol=1e-5, rtol=0)


def test_eval_reads_prompts_from_files_and_accepts_an_open_clip_directory(oc_model, digits_root, tmp_path):
    from mmpretrain.commands.evaluate import evaluate
    from mmpretrain.data import ShardStream, Source, expand_shards
    from mmpretrain.evaluation import class_embeddings, zero_shot_accuracy

    out = export_open_clip(oc_model, tmp_path / "oc")
    names = ["nought", "uno", "deux", "drei", "quattro", "cinco", "sei", "sieben", "huit", "nueve"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "templates.txt").write_text("digit {}\n{} written by hand\n")
    metrics = evaluate(
        compose_config(
            "eval",
            [
                f"ckpt={out}",
                f"data.root={digits_root}",
                "data.num_workers=0",
                "data.batch_size=40",
                "trainer.limit_val_batches=1",
                "trainer.enable_progress_bar=false",
                f"classnames={tmp_path}/classes.txt",
                f"templates={tmp_path}/templates.txt",
            ],
            run_dir=tmp_path / "e",
        )
    )
    # the same 40 samples scored by hand with those prompts
    prep = oc_model.preprocess(False)
    batch = next(
        iter(
            ShardStream(
                [Source("v", expand_shards(f"{digits_root}/val/*.tar"))], prep, batch_size=40, train=False
            )
        )
    )
    with torch.no_grad():
        classes = class_embeddings(
            names,
            ["digit {}", "{} written by hand"],
            lambda p: oc_model.encode_text(torch.stack([prep["text"](x) for x in p])),
        )
        expected = zero_shot_accuracy(oc_model.encode_image(batch["image"]), batch["cls"], classes)
    assert metrics["val/zeroshot_top1/image_text"] == pytest.approx(expected["top1"])
    assert metrics["val/zeroshot_top5/image_text"] == pytest.approx(expected["top5"])
    assert {"val/retrieval_mean_rank/image_to_text", "val/retrieval_median_rank/text_to_image"} <= set(
        metrics
    )


def test_open_clip_safetensors_state_dict_loads_like_the_trainer_checkpoint(tmp_path):
    from safetensors.torch import save_file

    oc = _open_clip_trainer_checkpoint(tmp_path / "epoch_3.pt", seed=2)
    save_file(
        {f"module.{k}": v.contiguous() for k, v in oc.state_dict().items()}, str(tmp_path / "oc.safetensors")
    )
    a = model_from_checkpoint(tmp_path / "oc.safetensors", open_clip_model_config(OC_CFG)).eval()
    b = model_from_checkpoint(tmp_path / "epoch_3.pt", open_clip_model_config(OC_CFG)).eval()
    assert torch.equal(_embed(a)[0], _embed(b)[0])
    with torch.no_grad():
        x = torch.stack([a.preprocess(False)["image"](im) for im in _images()])  # uint8: our tower normalises
        pixels = a.towers["image"].normalize_input(x)  # what open_clip's own float transform gives
        torch.testing.assert_close(
            a.encode_image(x), oc.encode_image(pixels, normalize=True), atol=1e-5, rtol=0
        )
    wrong = dict(OC_CFG, vision_cfg=dict(OC_CFG["vision_cfg"], width=32, head_width=16))
    with pytest.raises(ValueError, match="another model config"):
        model_from_checkpoint(tmp_path / "oc.safetensors", open_clip_model_config(wrong))
