"""The validation module's columns: the same keys, dtypes and widths on a rank with no val batch as on
one with batches (so every rank makes the same gathers), and rows aligned when batches differ."""

import pytest
import torch

from mmpretrain.losses import InfoNCE


@pytest.fixture(scope="module")
def module():
    from mmpretrain.model import build_model
    from mmpretrain.training.module import ContrastiveModule

    model = build_model(
        {
            "embed_dim": 8,
            "towers": {
                "image": {
                    "_target_": "mmpretrain.towers.timm.TimmTower",
                    "model_name": "test_resnet",
                    "img_size": 32,
                },
                "audio": {
                    "_target_": "mmpretrain.towers.audio.AudioTower",
                    "model_name": "test_resnet",
                    "clip_seconds": 0.25,
                    "frontend": {"n_mels": 16, "hop_length": 256},
                },
            },
        }
    ).eval()
    return ContrastiveModule(model, InfoNCE(pairs=[["image", "audio"]]), optim={})


def columns_after(module, batches):
    module.val.take()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            module.validation_step(batch, i)
    return module.val.take()


def test_a_rank_without_batches_has_the_same_columns_empty(module):
    full = columns_after(
        module,
        [{"image": torch.randn(3, 3, 32, 32), "audio": torch.randn(3, 4000), "cls": torch.tensor([0, 1, 2])}],
    )
    empty = module.val.row_columns(columns_after(module, []))
    assert list(empty) == list(full) == ["image", "image_mask", "audio", "audio_mask", "cls"]
    for k in full:
        assert empty[k].dtype == full[k].dtype and empty[k].shape == (0, *full[k].shape[1:]), k
    assert full["image"].shape == (3, 8) and full["cls"].dtype == torch.long
    assert (
        module.validation_metrics(columns_after(module, [])) == {}
    )  # nothing anywhere: no metrics, no error


def test_batches_missing_a_modality_or_labels_keep_rows_aligned(module):
    with_audio = {
        "image": torch.randn(4, 3, 32, 32),
        "audio": torch.randn(4, 4000),
        "cls": torch.tensor([0, 1, 0, 1]),
    }
    image_only = {"image": torch.randn(2, 3, 32, 32)}
    cols = columns_after(module, [with_audio, image_only])
    assert {k: len(v) for k, v in cols.items()} == dict.fromkeys(cols, 6)
    assert cols["audio_mask"].tolist() == [True] * 4 + [False] * 2 and cols["cls"].tolist() == [
        0,
        1,
        0,
        1,
        -1,
        -1,
    ]
    assert cols["audio"][4:].abs().max() == 0
    metrics = module.validation_metrics(cols)
    # Retrieval over the 4 rows with both; class retrieval needs every such row labelled (they are).
    with torch.no_grad():
        ref = module.validation_metrics({k: v[:4] for k, v in cols.items()})
    assert metrics == pytest.approx(ref)
    assert (
        "val/retrieval_R@1/image_to_audio" in metrics and "val/retrieval_class_mAP/audio_to_image" in metrics
    )


def test_kept_val_embeddings_are_the_labelled_rows_of_each_modality_up_to_the_limit(module):
    with_audio = {
        "image": torch.randn(4, 3, 32, 32),
        "audio": torch.randn(4, 4000),
        "cls": torch.tensor([0, 1, 0, 1]),
    }
    image_only = {"image": torch.randn(2, 3, 32, 32), "cls": torch.tensor([1, 1])}
    unlabelled = {"image": torch.randn(1, 3, 32, 32), "audio": torch.randn(1, 4000)}
    cols = columns_after(module, [with_audio, image_only, unlabelled])
    kept = module.val.labelled_embeddings(cols, limit=5, step=module.global_step)
    assert kept["step"] == module.global_step
    assert torch.equal(kept["features"]["image"], cols["image"][:5]) and kept["labels"]["image"].tolist() == [
        0,
        1,
        0,
        1,
        1,
    ]
    assert torch.equal(kept["features"]["audio"], cols["audio"][:4]) and kept["labels"]["audio"].tolist() == [
        0,
        1,
        0,
        1,
    ]
