"""Distillation terms against naive references, and through the Lightning module with grad caching."""

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mmpretrain.losses import InfoNCE
from mmpretrain.losses.distill import feature_distill_loss, logit_distill_loss
from mmpretrain.model import ContrastiveModel
from mmpretrain.training.distill import Distillation
from tests.unit.test_gradcache import DropoutTower, batch, make_model


def features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_logit_distillation_is_the_soft_cross_entropy_both_ways():
    a, b, ta, tb = features(5, 4, 0), features(5, 4, 1), features(5, 6, 2), features(5, 6, 3)
    s, t = torch.tensor(7.0), torch.tensor(30.0)
    expected = 0.0
    for q, k, tq, tk in ((a, b, ta, tb), (b, a, tb, ta)):
        for i in range(5):
            student = [s * (q[i] @ k[j]) for j in range(5)]
            teacher = [t * (tq[i] @ tk[j]) for j in range(5)]
            p = torch.softmax(torch.stack(teacher), 0)
            expected += -(p * torch.log_softmax(torch.stack(student), 0)).sum() / 10
    torch.testing.assert_close(logit_distill_loss(a, b, s, ta, tb, t), expected)


def test_a_student_that_matches_its_teacher_gets_no_logit_gradient():
    a, b = features(6, 4, 0).requires_grad_(), features(6, 4, 1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    loss = logit_distill_loss(a, b, scale, a.detach(), b.detach(), torch.tensor(10.0))
    grads = torch.autograd.grad(loss, [a, b, scale])
    assert all(g.abs().max() < 1e-6 for g in grads)


def test_feature_losses():
    s, t = features(4, 3, 0), features(4, 3, 1)
    torch.testing.assert_close(feature_distill_loss(s, t, "cosine"), (1 - (s * t).sum(1)).mean())
    torch.testing.assert_close(feature_distill_loss(s, t, "mse"), ((s - t) ** 2).sum(1).mean())
    assert feature_distill_loss(3 * s, s, "cosine") < 1e-6
    with pytest.raises(ValueError, match="cosine"):
        feature_distill_loss(s, t, "l1")


def teacher_model():
    torch.manual_seed(5)
    model = ContrastiveModel({"image": DropoutTower("image", 6), "text": DropoutTower("text", 5)}, 6)
    return model.eval().requires_grad_(False)


class CaptureGrads(L.Callback):
    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def first_step(chunks, distill):
    from mmpretrain.training.module import ContrastiveModule

    model = make_model()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    optim = {"lr": 1e-3, "weight_decay": 0.1, "grad_cache_chunks": chunks, "fused": False}
    module = ContrastiveModule(model, InfoNCE(), optim, distill=distill)
    capture = CaptureGrads()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[capture],
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch(12)], batch_size=None))
    return capture.grads


@pytest.mark.parametrize("chunks", [3])
def test_grad_cache_with_a_teacher_gives_the_full_batch_gradient(chunks):
    def distill():
        torch.manual_seed(9)  # the same projection heads (4 -> 6) in both runs
        return Distillation(teacher_model(), {"image": 4, "text": 4}, {"image": 6, "text": 6}, 1.0, 0.5)

    full, cached = first_step(1, distill()), first_step(chunks, distill())
    assert {"distill.heads.image.weight", "model.towers.image.net.0.weight"} <= set(full)
    assert set(full) == set(cached)
    for name, g in full.items():
        torch.testing.assert_close(cached[name], g, atol=1e-5, rtol=1e-4, msg=name)
    # the distillation terms moved the gradient: a run without them differs
    alone = first_step(1, None)
    assert not torch.allclose(
        alone["model.towers.image.net.0.weight"], full["model.towers.image.net.0.weight"]
    )


def test_the_teacher_stays_out_of_the_module():
    from mmpretrain.training.module import ContrastiveModule

    distill = Distillation(teacher_model(), {"image": 4, "text": 4}, {"image": 6, "text": 6}, 1.0, 0.5)
    module = ContrastiveModule(make_model(), InfoNCE(), {"lr": 1e-3, "weight_decay": 0.1}, distill=distill)
    module.train()
    assert not distill.teacher.training
    keys = set(module.state_dict())
    assert "distill.heads.image.weight" in keys and not any("teacher" in k for k in keys)
    out = distill.teacher_outputs(batch(4))
    assert out["teacher_image_features"].shape == (4, 6) and not out["teacher_image_features"].requires_grad


def test_cached_teacher_embeddings_give_the_online_loss(digits_root, tmp_path):
    """`teacher-embeddings` stores what the online teacher computes for the crops a distill.cached stream
    yields (its pass p uses stored augmentation p mod K): the same terms within 1e-5, in both passes."""
    from mmpretrain.config import to_plain
    from mmpretrain.data.stream.pipeline import ShardStream
    from mmpretrain.data.stream.shards import Source
    from mmpretrain.export import export
    from mmpretrain.model import build_model
    from mmpretrain.training.distill import embedding_dims, load_teacher
    from mmpretrain.training.teacher_embeddings import build_teacher_embeddings
    from tests.conftest import compose_config

    vit = ["model.towers.image.model_name=test_vit", "model.towers.image.img_size=16"]
    vit += ["+model.towers.image.model_kwargs.img_size=16", "model.towers.text.config.text_cfg.layers=1"]
    cfg = compose_config("train", [f"data.root={digits_root}", *vit])
    torch.manual_seed(1)
    teacher_cfg = compose_config(
        "train", ["model.towers.text.config.text_cfg.layers=1", "model.embed_dim=64"]
    )
    export(build_model(teacher_cfg.model), tmp_path / "teacher")  # resnet10t at 32 px: another size
    shard = sorted((digits_root / "train").glob("*.tar"))[0]
    out = build_teacher_embeddings(
        str(tmp_path / "teacher"),
        [str(shard)],
        tmp_path / "cached",
        to_plain(cfg.model),
        to_plain(cfg.data),
        2,
    )
    from mmpretrain.data.stream import teacher_cache
    from mmpretrain.data.stream.tar_reader import read_samples

    _, _, first = next(read_samples(str(out / shard.name)))
    stored = teacher_cache.decode(first[teacher_cache.MEMBER])
    assert stored["image"].shape == (2, 64) and not np.allclose(stored["image"][0], stored["image"][1])
    student = build_model(cfg.model).eval()
    stream = ShardStream(
        [Source("cached", [str(out / shard.name)])],
        student.preprocess(True),
        batch_size=60,
        train=True,
        batches_per_worker=4,
        shuffle_buffer=10,
        caption_field=cfg.data.caption_field,
        caption_keys=to_plain(cfg.data.get("caption_keys")),
        teacher_augmentations=0,
    )
    teacher = load_teacher(str(tmp_path / "teacher"))
    dims, teacher_dims = embedding_dims(student), embedding_dims(teacher)
    torch.manual_seed(3)
    online = Distillation(teacher, dims, teacher_dims, 1.0, 1.0)
    cached = Distillation(None, dims, teacher_dims, 1.0, 1.0)
    cached.heads.load_state_dict(online.heads.state_dict())
    batches = iter(stream)
    for _ in range(4):  # 180 samples a pass: the last batch is the second pass's, augmentation 1
        batch = next(batches)
        with torch.no_grad():
            outputs = online.student(student)(batch)  # the heads of both are the same
            stored, computed = cached.teacher_outputs(batch), online.teacher_outputs(batch)
            for key in ("teacher_image_features", "teacher_text_features"):
                torch.testing.assert_close(stored[key], computed[key], atol=1e-5, rtol=0)
            a, b = cached(outputs | stored), online(outputs | computed)
        assert a.keys() == b.keys() == {"distill_logit_loss", "distill_feature_loss"}
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
