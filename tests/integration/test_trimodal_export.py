"""A three-tower (image, text, audio) model: export -> load_pretrained gives identical embeddings,
and validation reports metrics for every modality pair, including pairs never trained together."""

import numpy as np
import torch
from PIL import Image

import mmpretrain
from mmpretrain.export import export
from mmpretrain.losses import InfoNCE
from mmpretrain.model import build_model

TEXT = {
    "embed_dim": 32,
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CONFIG = {
    "embed_dim": 16,
    "temperature_pairs": [["image", "text"], ["audio", "text"]],
    "towers": {
        "image": {
            "_target_": "mmpretrain.towers.timm.TimmTower",
            "model_name": "test_resnet",
            "img_size": 32,
        },
        "text": {"_target_": "mmpretrain.towers.open_clip.OpenClipTower", "modality": "text", "config": TEXT},
        "audio": {
            "_target_": "mmpretrain.towers.audio.AudioTower",
            "model_name": "test_resnet",
            "clip_seconds": 0.5,
            "frontend": {"n_mels": 32, "hop_length": 256, "top_db": 80.0},
            "spec_augment": {"freq_masks": 1, "freq_width": 4},
        },
    },
}


def test_three_tower_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(CONFIG)
    with torch.no_grad():  # make the temperatures differ from their init so the test sees them load
        model.logit_scales["image_text"].fill_(3.0)
        model.logit_scales["audio_text"].fill_(1.5)
    model.eval()
    export(model, tmp_path / "export")
    loaded = mmpretrain.load_pretrained(tmp_path / "export")
    prep = loaded.preprocess(train=False)
    image = prep["image"](Image.new("RGB", (40, 40), (200, 10, 10)))[None]
    text = torch.stack([prep["text"]("someone saying seven"), prep["text"]("7")])
    rng = np.random.default_rng(0)
    audio = torch.stack(
        [prep["audio"]((rng.standard_normal(12000).astype(np.float32), 22050)) for _ in range(3)]
    )
    assert audio.shape == (3, 8000)
    assert torch.equal(loaded.encode_image(image), model.encode_image(image))
    assert torch.equal(loaded.encode_text(text), model.encode_text(text))
    assert torch.equal(loaded.encode_audio(audio), model.encode_audio(audio))
    assert loaded.config() == model.config()
    assert torch.equal(loaded.logit_scale_outputs()["logit_scale_audio_text"], torch.tensor(1.5).exp())


def test_validation_reports_every_pair_including_untrained_ones():
    from mmpretrain.training.module import ContrastiveModule

    model = build_model(CONFIG).eval()
    module = ContrastiveModule(
        model,
        InfoNCE(pairs=[["image", "text"], ["audio", "text"]]),
        optim={},
        zeroshot={"classnames": ["zero", "one", "two"], "templates": ["{}"]},
    )
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    # Audio and image embeddings that encode the class exactly: prototype zero-shot and class
    # retrieval between them must be perfect, though no loss ever paired them.
    basis = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    noise = 0.01 * torch.randn(8, 16)
    local = {
        "image": basis[labels] + noise,
        "audio": basis[labels] - noise,
        "text": torch.randn(8, 16),
        "audio_mask": torch.tensor([1, 1, 1, 1, 1, 1, 0, 0]).bool(),
        "cls": labels,
    }
    metrics = module.validation_metrics(local)
    assert metrics["val/zeroshot_top1/audio_image"] == 1.0 and metrics["val/zeroshot_top1/image_audio"] == 1.0
    assert metrics["val/retrieval_class_R@1/audio_to_image"] == 1.0
    assert metrics["val/retrieval_class_mAP/image_to_audio"] == 1.0
    assert {
        "val/zeroshot_top1/audio_text",
        "val/zeroshot_top1/image_text",
        "val/retrieval_R@1/audio_to_image",
        "val/image_text_loss",
        "val/audio_text_loss",
    } <= set(metrics)
    assert "val/audio_image_loss" not in metrics  # no such pair in the loss
    # mAP of a random ranking is near the class frequency, far from 1.
    local["audio"] = torch.randn(8, 16)
    assert module.validation_metrics(local)["val/retrieval_class_mAP/audio_to_image"] < 0.9


def test_eval_loss_of_a_per_pair_temperature_model_scores_only_its_pairs():
    from mmpretrain.commands.evaluate import all_pairs_loss as _InfoNCEForAllPairs

    model = build_model(CONFIG)
    loss = _InfoNCEForAllPairs(model)
    assert sorted(loss.pairs) == [("audio", "text"), ("image", "text")]
    feats = {
        f"{m}_features": torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
        for m in ("image", "text", "audio")
    }
    terms = loss(feats | model.logit_scale_outputs(), gather=False)  # crashed with a None temperature before
    assert set(terms) == {"image_text_loss", "audio_text_loss"} and all(
        torch.isfinite(v) for v in terms.values()
    )
