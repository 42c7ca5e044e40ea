"""Several captions of a sample in one step (data.captions_per_sample): the multi-positive InfoNCE
against a written-out reference with gradients, its K=1 and NegCLIP cases, the model's encoding of
the extra captions and the stream's seeded choice of distinct captions."""

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.data.stream.captions import pick_caption, pick_captions
from mmpretrain.losses import InfoNCE, clip_loss, multi_positive_loss, negclip_loss

B, K, M, D = 5, 3, 2, 4


def reference(a, c, valid, scale, neg=None, neg_valid=None):
    """Written out: each valid (image i, caption k) pair against the other images' valid captions
    (and image i's valid hard negatives: every image's, as NegCLIP's columns), and each valid caption
    against every image."""
    total, pairs = 0.0, 0
    for i in range(B):
        for k in range(K):
            if not valid[i, k]:
                continue
            cols = [scale * a[i] @ c[i, k]]
            cols += [scale * a[i] @ c[j, kk] for j in range(B) for kk in range(K) if j != i and valid[j, kk]]
            if neg is not None:
                cols += [scale * a[i] @ neg[j, m] for j in range(B) for m in range(M) if neg_valid[j, m]]
            total = total - (cols[0] - torch.logsumexp(torch.stack(cols), 0))
            logits = torch.stack([scale * c[i, k] @ a[j] for j in range(B)])
            total = total - (logits[i] - torch.logsumexp(logits, 0))
            pairs += 1
    return total / (2 * pairs)


def problem():
    g = torch.Generator().manual_seed(0)

    def unit(*s):
        return F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)

    valid = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    neg_valid = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1], [0, 1]], dtype=torch.bool)
    return unit(B, D), unit(B, K, D), valid, unit(B, M, D), neg_valid, torch.tensor(3.0, dtype=torch.float64)


@pytest.mark.parametrize("with_negatives", [False, True])
def test_multi_positive_equals_the_written_out_reference_with_gradients(with_negatives):
    a, c, valid, neg, neg_valid, scale = problem()
    inputs = [a, c, neg, scale]
    for t in inputs:
        t.requires_grad_()
    extra = (neg, neg_valid) if with_negatives else (None, None)
    got = multi_positive_loss(a, c, valid, scale, False, *extra)
    want = reference(a, c, valid, scale, *extra)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got, inputs, allow_unused=True)
    want_grads = torch.autograd.grad(want, inputs, allow_unused=True)
    for g, w in zip(grads, want_grads):
        if w is None:
            assert g is None or not g.abs().sum()
        else:
            torch.testing.assert_close(g, w)


def test_one_caption_is_clips_loss_and_with_negatives_negclips():
    a, c, _, neg, neg_valid, scale = problem()
    one = torch.ones(B, 1, dtype=torch.bool)
    torch.testing.assert_close(
        multi_positive_loss(a, c[:, :1], one, scale, False), clip_loss(a, c[:, 0], scale, False)
    )
    torch.testing.assert_close(
        multi_positive_loss(a, c[:, :1], one, scale, False, neg, neg_valid),
        negclip_loss(a, c[:, 0], neg, neg_valid, scale, False),
    )
    # padded captions (mask False) change nothing
    padded = torch.tensor([[True, False, False]] * B)
    torch.testing.assert_close(
        multi_positive_loss(a, c, padded, scale, False), clip_loss(a, c[:, 0], scale, False)
    )


def test_infonce_trains_every_caption_of_the_batch():
    """InfoNCE uses the multi-positive form when the batch carries the extra captions, from either
    side of the pair; tiled or partial-pair batches are refused by name."""
    a, c, valid, _, _, scale = problem()
    out = {
        "image_features": a,
        "text_features": c[:, 0],
        "text_positives_features": c[:, 1:],
        "text_positives_mask": valid[:, 1:],
        "logit_scale": scale,
    }
    want = multi_positive_loss(a, c, valid, scale, False)
    torch.testing.assert_close(InfoNCE()(out, gather=False)["image_text_loss"], want)
    torch.testing.assert_close(InfoNCE(pairs=[["text", "image"]])(out, gather=False)["text_image_loss"], want)
    assert (
        InfoNCE()(out, gather=False)["image_text_loss"]
        != InfoNCE()({k: v for k, v in out.items() if "positives" not in k}, gather=False)["image_text_loss"]
    )
    with pytest.raises(ValueError, match="captions_per_sample"):
        InfoNCE(tiled=True)(out, gather=False)


def test_the_model_encodes_the_batchs_other_captions():
    from tests.unit.test_gradcache import make_model

    model = make_model().eval()
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(3, 6, generator=g),
        "text": torch.randn(3, 5, generator=g),
        "text_positives": torch.randn(3, 2, 5, generator=g),
        "text_positives_mask": torch.tensor([[1, 0], [1, 1], [0, 0]], dtype=torch.bool),
    }
    out = model(batch)
    assert out["text_positives_features"].shape == (3, 2, 4)
    torch.testing.assert_close(
        out["text_positives_features"][1, 1], model.encode("text", batch["text_positives"][1, 1:])[0]
    )


def test_captions_are_distinct_seeded_and_one_is_the_old_choice():
    captions = [f"caption {i}" for i in range(5)]
    for pass_idx in range(20):
        picked = pick_captions(captions, 3, 7, "key", pass_idx)
        assert len(set(picked)) == 3 and set(picked) <= set(captions)
        assert picked == pick_captions(captions, 3, 7, "key", pass_idx)  # a pure function: exact resume
    assert sorted(pick_captions(captions, 9, 7, "key", 0)) == captions  # more than it has: all of them
    assert pick_captions(["only"], 3, 7, "key", 0) == ["only"]
    firsts = {pick_captions(captions, 3, 7, "key", p)[0] for p in range(40)}
    assert len(firsts) == 5  # every caption leads some pass
    assert pick_caption(captions, 7, "key", 3) in captions
