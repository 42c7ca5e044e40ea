"""NegCLIP: hard negative captions as extra columns of the image->text softmax, against a plain
reference, with gradients; padding columns change nothing."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.losses import InfoNCE, clip_loss, negclip_loss

B, M, D = 5, 2, 4


def reference(a, b, neg, valid, scale):
    """Written out: row i of image->text over every caption of the batch and every valid negative."""
    total = 0.0
    for i in range(B):
        cols = [scale * a[i] @ b[j] for j in range(B)]
        cols += [scale * a[i] @ neg[k, m] for k in range(B) for m in range(M) if valid[k, m]]
        logits = torch.stack(cols)
        total = total - (logits[i] - torch.logsumexp(logits, 0))
    for i in range(B):
        logits = torch.stack([scale * b[i] @ a[j] for j in range(B)])
        total = total - (logits[i] - torch.logsumexp(logits, 0))
    return total / (2 * B)


def problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)

    def unit(*s):
        return F.normalize(torch.randn(*s, generator=g, dtype=dtype), dim=-1)

    valid = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1], [0, 1]], dtype=torch.bool)
    return unit(B, D), unit(B, D), unit(B, M, D), valid, torch.tensor(3.0, dtype=dtype)


def test_negclip_equals_the_written_out_reference_with_gradients():
    a, b, neg, valid, scale = (t.requires_grad_() if t.is_floating_point() else t for t in problem())
    got = negclip_loss(a, b, neg, valid, scale)
    want = reference(a, b, neg, valid, scale)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    g_got = torch.autograd.grad(got, [a, b, neg, scale])
    g_want = torch.autograd.grad(want, [a, b, neg, scale])
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x, y)
    assert g_got[2][2].abs().max() == 0 and g_got[2][1, 1].abs().max() == 0  # padding: no gradient
    assert torch.autograd.gradcheck(lambda *x: negclip_loss(*x[:3], valid, x[3]), (a, b, neg, scale))


def test_no_valid_negative_is_clip_and_infonce_routes_the_text_side():
    a, b, neg, valid, scale = problem()
    none = torch.zeros_like(valid)
    assert negclip_loss(a, b, neg, none, scale).item() == pytest.approx(
        clip_loss(a, b, scale).item(), rel=1e-12
    )
    out = {
        "image_features": a,
        "text_features": b,
        "text_negatives_features": neg,
        "text_negatives_mask": valid,
        "logit_scale": scale,
    }
    assert InfoNCE(hard_negatives=True)(out)["image_text_loss"].item() == pytest.approx(
        reference(a, b, neg, valid, scale).item()
    )
    swapped = InfoNCE(pairs=[["text", "image"]], hard_negatives=True)(out)["text_image_loss"]
    assert swapped.item() == pytest.approx(
        reference(a, b, neg, valid, scale).item()
    )  # negatives go to image->text
    plain = InfoNCE()(out)["image_text_loss"]
    assert plain.item() == pytest.approx(clip_loss(a, b, scale).item()) and not math.isclose(
        plain.item(), swapped.item()
    )


def test_the_model_encodes_the_batchs_hard_negatives():
    from tests.unit.test_gradcache import make_model

    model = make_model().eval()
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(3, 6, generator=g),
        "text": torch.randn(3, 5, generator=g),
        "text_negatives": torch.randn(3, 2, 5, generator=g),
        "text_negatives_mask": torch.tensor([[1, 0], [1, 1], [0, 0]], dtype=torch.bool),
    }
    out = model(batch)
    assert out["text_negatives_features"].shape == (3, 2, 4)
    torch.testing.assert_close(
        out["text_negatives_features"][1, 0], model.encode("text", batch["text_negatives"][1, :1])[0]
    )
    hard = InfoNCE(hard_negatives=True)(out)["image_text_loss"]
    assert hard.item() > InfoNCE()(out)["image_text_loss"].item()  # more columns in the softmax
