"""SigLIP vs a brute-force reference; tiled InfoNCE equals the plain one in value and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.losses import InfoNCE, SigLIP, clip_loss, siglip_loss, tiled_clip_loss, tiled_cross_entropy
from mmpretrain.model import ContrastiveModel


def reference_siglip(a, b, scale, bias):
    """Loops: -log sigmoid(+z) for matching pairs, -log sigmoid(-z) otherwise, / number of rows."""
    total = 0.0
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            z = scale * (a[i] @ b[j]) + bias
            total = total - torch.log(torch.sigmoid(z if i == j else -z))
    return total / a.shape[0]


def features(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    return a, b


def test_siglip_matches_brute_force_in_value_and_gradients():
    a, b = features(6)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    inputs = [a, b, scale, bias]
    got = siglip_loss(a, b, scale, bias)
    want = reference_siglip(a, b, scale, bias)
    assert torch.allclose(got, want, atol=1e-5)
    for g, r in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        assert torch.allclose(g, r, atol=1e-5)


def test_siglip_module_reads_bias_from_model_outputs_and_explains_when_absent():
    model_like = {
        "image_features": features(4)[0],
        "text_features": features(4)[1],
        "logit_scale": torch.tensor(10.0),
    }
    with pytest.raises(KeyError, match="init_logit_bias"):
        SigLIP()(model_like)
    terms = SigLIP()(model_like | {"logit_bias": torch.tensor(-10.0)})
    expected = reference_siglip(model_like["image_features"], model_like["text_features"], 10.0, -10.0)
    assert torch.allclose(terms["image_text_loss"], expected, atol=1e-5)


def test_model_builds_siglip_bias_with_paper_init_and_exports_it():
    from torch import nn

    from mmpretrain.towers.base import Tower

    class Lin(Tower):
        def __init__(self, modality):
            super().__init__({})
            self.modality, self.output_dim, self.lin = modality, 4, nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x)

    model = ContrastiveModel(
        {"image": Lin("image"), "text": Lin("text")}, 4, init_logit_scale=math.log(10), init_logit_bias=-10.0
    )
    out = model({"image": torch.randn(2, 3), "text": torch.randn(2, 3)})
    assert out["logit_bias"].item() == -10.0 and math.isclose(out["logit_scale"].item(), 10.0, rel_tol=1e-6)
    assert out["logit_bias"].requires_grad and "logit_bias" in dict(model.named_parameters())
    assert model.config()["init_logit_bias"] == -10.0
    assert "logit_bias" not in ContrastiveModel({"image": Lin("image"), "text": Lin("text")}, 4)(
        {"image": torch.randn(2, 3), "text": torch.randn(2, 3)}
    )


@pytest.mark.parametrize("n,tile", [(7, 3), (50, 16), (64, 64), (33, 100)])
def test_tiled_infonce_equals_plain_in_value_and_gradients(n, tile):
    a, b = features(n, seed=n)
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    plain = clip_loss(a, b, scale)
    tiled = tiled_clip_loss(a, b, scale, tile=tile)
    assert torch.allclose(plain, tiled, atol=1e-5)
    for g, r in zip(torch.autograd.grad(tiled, [a, b, scale]), torch.autograd.grad(plain, [a, b, scale])):
        assert torch.allclose(g, r, atol=1e-5), (g - r).abs().max()


def test_tiled_cross_entropy_with_offset_positives_equals_cross_entropy():
    # the DDP case: this rank's 5 rows, positives at offset 5 among 12 gathered keys
    q, _ = features(5, seed=1)
    k = F.normalize(torch.randn(12, 8), dim=-1).requires_grad_()
    scale = torch.tensor(20.0, requires_grad=True)
    want = F.cross_entropy(scale * q @ k.T, torch.arange(5) + 5)
    got = tiled_cross_entropy(q, k, scale, offset=5, tile=4)
    assert torch.allclose(got, want, atol=1e-5)
    for g, r in zip(torch.autograd.grad(got, [q, k, scale]), torch.autograd.grad(want, [q, k, scale])):
        assert torch.allclose(g, r, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        tiled_cross_entropy(q, k, scale, offset=10)


def test_infonce_tiled_flag_gives_the_same_terms():
    a, b = features(9)
    out = {"image_features": a, "text_features": b, "logit_scale": torch.tensor(14.0)}
    plain, tiled = InfoNCE()(out), InfoNCE(tiled=True, tile_size=4)(out)
    assert torch.allclose(plain["image_text_loss"], tiled["image_text_loss"], atol=1e-6)


def test_tiled_loss_under_bf16_autocast_computes_in_float32():
    a, b = features(20)
    scale = torch.tensor(14.0, requires_grad=True)
    want = clip_loss(a, b, scale)
    ga = torch.autograd.grad(want, [a])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tiled_clip_loss(a, b, scale, tile=8)
        plain_bf16 = clip_loss(a, b, scale)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(torch.autograd.grad(got, [a])[0], ga, atol=1e-5)
    assert not torch.allclose(plain_bf16, want, atol=1e-5)  # autocast was really on
    # bf16 features in: grads come back in bf16, values agree to bf16 precision
    got16 = tiled_clip_loss(a.bfloat16(), b.bfloat16(), scale, tile=8)
    assert torch.allclose(got16, want, atol=0.05)
