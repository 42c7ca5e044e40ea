import math

import torch
import torch.nn.functional as F

from mmpretrain.losses import InfoNCE, clip_loss


def reference_clip_loss(a, b, scale):
    """Brute force: per-row softmax cross-entropy in both directions, by explicit loops."""
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        logits_i = torch.stack([scale * a[i] @ b[j] for j in range(n)])
        total = total - torch.log_softmax(logits_i, 0)[i]
        logits_t = torch.stack([scale * b[i] @ a[j] for j in range(n)])
        total = total - torch.log_softmax(logits_t, 0)[i]
    return total / (2 * n)


def test_clip_loss_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(7, 5, generator=g), dim=-1)
    b = F.normalize(torch.randn(7, 5, generator=g), dim=-1)
    scale = torch.tensor(1 / 0.07)
    assert torch.allclose(clip_loss(a, b, scale), reference_clip_loss(a, b, scale), atol=1e-6)


def test_perfect_alignment_gives_low_loss_and_random_gives_log_n():
    a = torch.eye(8)
    assert clip_loss(a, a, torch.tensor(100.0)).item() < 1e-3
    same = F.normalize(torch.ones(8, 4), dim=-1)
    assert math.isclose(clip_loss(same, same, torch.tensor(10.0)).item(), math.log(8), rel_tol=1e-5)


def test_infonce_sums_weighted_pairs_and_skips_absent_modalities():
    g = torch.Generator().manual_seed(1)
    feats = {m: F.normalize(torch.randn(6, 4, generator=g), dim=-1) for m in ("image", "text", "audio")}
    out = {f"{m}_features": f for m, f in feats.items()} | {"logit_scale": torch.tensor(5.0)}
    loss = InfoNCE(pairs=[["image", "text"], ["audio", "text"]], weights=[1.0, 0.5])
    terms = loss(out)
    assert set(terms) == {"image_text_loss", "audio_text_loss"}
    assert torch.allclose(
        terms["audio_text_loss"], 0.5 * clip_loss(feats["audio"], feats["text"], torch.tensor(5.0))
    )
    del out["audio_features"]
    assert set(loss(out)) == {"image_text_loss"}
