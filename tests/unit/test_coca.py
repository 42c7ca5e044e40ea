"""CoCa: our caption decoder and open_clip's, the loss, exact grad caching, and generation with the cache
equal to generation without it, token for token."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.interop.open_clip import open_clip_model_config, to_open_clip_state_dict
from mmpretrain.losses import CoCa, InfoNCE, caption_loss
from mmpretrain.model import build_model
from mmpretrain.training.gradcache import grad_cache_backward

OC = "mmpretrain.towers.open_clip.OpenClipTower"
TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VIT = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
#: open_clip's CoCa layout, tiny: attentional pooling of the ViT, a class token on the text tower.
COCA = {
    "embed_dim": 32,
    "vision_cfg": VIT
    | {"attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8, "output_tokens": True},
    "text_cfg": TEXT | {"embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CAPTIONS = ["a red circle", "two blue squares left of a green triangle", "one small disc", "a purple box"]


def ours(image: str = "vit") -> torch.nn.Module:
    """Our decoder on an open_clip ViT (LayerNorm: micro-batches do not interact) or a timm CNN."""
    clip = {"embed_dim": 32, "vision_cfg": VIT, "text_cfg": TEXT}
    towers = {"text": {"_target_": OC, "modality": "text", "config": clip}}
    towers["image"] = (
        {"_target_": OC, "modality": "image", "config": clip}
        if image == "vit"
        else {"_target_": "mmpretrain.towers.timm.TimmTower", "model_name": "resnet10t", "img_size": 64}
    )
    cfg = {"embed_dim": 32, "towers": towers, "decoder": {"width": 32, "heads": 2, "layers": 2}}
    torch.manual_seed(0)
    return build_model(cfg)


def open_clip_coca() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(open_clip_model_config(copy.deepcopy(COCA)))


def batch(model, n: int = 4, size: int = 32) -> dict[str, torch.Tensor]:
    tokenize = model.towers["text"].preprocess(False)
    text = torch.stack([tokenize(CAPTIONS[i % len(CAPTIONS)]) for i in range(n)])
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    return {"image": images, "text": model.towers["text"].trim_input(text)}


def test_open_clip_coca_config_gives_open_clip_features_and_caption_loss():
    """model=openclip with a multimodal_cfg is open_clip's CoCa: the same image/text features and the same
    teacher-forced token cross-entropy as open_clip's own CoCa with these weights."""
    from open_clip.coca_model import CoCa as OpenClipCoCa

    model = open_clip_coca().eval()
    ref = OpenClipCoCa(COCA["embed_dim"], COCA["multimodal_cfg"], COCA["text_cfg"], COCA["vision_cfg"]).eval()
    ref.load_state_dict(to_open_clip_state_dict(model), strict=True)
    b = batch(model)
    images = b["image"].float() / 255  # open_clip's model takes floats: compare on normalised input
    images = model.towers["image"].normalize_input(b["image"])
    out = model({"image": images, "text": b["text"]})
    theirs = ref(images, b["text"])
    nll = F.cross_entropy(
        theirs["logits"].transpose(1, 2), theirs["labels"], ignore_index=0, reduction="none"
    )
    torch.testing.assert_close(out["caption_nll"], nll.sum(1))
    torch.testing.assert_close(out["caption_tokens"], theirs["labels"].ne(0).sum(1))
    torch.testing.assert_close(out["image_features"], theirs["image_features"])
    torch.testing.assert_close(out["text_features"], theirs["text_features"])


@pytest.mark.parametrize("make", [ours, open_clip_coca])
def test_coca_loss_is_weighted_infonce_plus_token_mean_cross_entropy(make):
    model = make()
    b = batch(model)
    out = model(b)
    losses = CoCa(contrastive_weight=0.5, caption_weight=2.0)(out)
    assert set(losses) == {"contrastive_loss", "caption_loss"}
    clip = InfoNCE()(out)["image_text_loss"]
    torch.testing.assert_close(losses["contrastive_loss"], 0.5 * clip)
    # The naive reference: the decoder's logits at every position, mean CE over the non-padding labels.
    tokens = model.image_tokens(b["image"])
    logits = model.decoder.logits(tokens, b["text"][:, :-1], model.towers["text"])
    ce = F.cross_entropy(logits.transpose(1, 2), b["text"][:, 1:], ignore_index=0)
    torch.testing.assert_close(losses["caption_loss"], 2.0 * ce, rtol=1e-4, atol=1e-5)


def test_caption_loss_counts_tokens_not_samples():
    nll, tokens = torch.tensor([6.0, 2.0]), torch.tensor([3, 1])
    assert caption_loss(nll, tokens).item() == pytest.approx(2.0)  # 8 nats over 4 tokens


def test_coca_loss_needs_a_decoder():
    model = build_model({"embed_dim": 32, "towers": ours().config()["towers"]})
    with pytest.raises(KeyError, match="caption decoder"):
        CoCa()(model(batch(model)))


@pytest.mark.parametrize("make", [ours, open_clip_coca])
def test_grad_cache_gives_the_full_batch_gradient(make):
    """optim.grad_cache_chunks=k: the caption term is per sample, so caching it is exact (k = 1, 2, 4)."""
    model, loss = make(), CoCa()
    b = batch(model, n=8)
    model.zero_grad()
    full = loss(model(b))
    sum(full.values()).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("decoder.") for n in reference)
    for chunks in (2, 4):
        model.zero_grad()
        terms = grad_cache_backward(model, loss, b, chunks)
        for k in full:
            torch.testing.assert_close(terms[k], full[k].detach(), rtol=1e-5, atol=1e-6)
        for n, p in model.named_parameters():
            if n in reference:
                # float32 sums in another order: atol relative to the gradient's scale (up to ~10 here)
                torch.testing.assert_close(
                    p.grad, reference[n], rtol=1e-4, atol=1e-6 * reference[n].abs().max().item(), msg=n
                )


# -- generation ------------------------------------------------------------------------------------
MODELS = {"ours_vit": lambda: ours("vit"), "ours_cnn": lambda: ours("cnn"), "open_clip_coca": open_clip_coca}


@pytest.mark.parametrize(
    "name, strategy",
    [(m, s) for m in ("ours_vit", "open_clip_coca") for s in ("greedy", "beam", "top_p")]
    + [("ours_cnn", "greedy")],
)
def test_cached_generation_equals_uncached_token_for_token(name, strategy):
    model = MODELS[name]().eval()
    images = batch(model, n=2, size=64 if name == "ours_cnn" else 32)["image"]
    options = {"max_len": 10, "num_beams": 3, "top_p": 0.8, "temperature": 0.3}
    runs = [
        model.generate(images, strategy, use_cache=c, generator=torch.Generator().manual_seed(3), **options)
        for c in (True, False)
    ]
    assert runs[0] == runs[1]
    assert all(len(c) > 0 for c in runs[0])


@pytest.mark.parametrize("make", [ours, open_clip_coca])
def test_cached_step_logits_equal_the_full_forward(make):
    """Prefill of several tokens, then one at a time: every position's logits as the uncached forward's."""
    model = make().eval()
    b = batch(model, n=2)
    tokens = model.image_tokens(b["image"])
    text_tower = model.towers["text"]
    ids = text_tower.preprocess(False)(CAPTIONS[1])[:8].repeat(2, 1)  # no padding: what generation feeds
    with torch.no_grad():
        full = model.decoder.logits(tokens, ids, text_tower)
        state = model.decoder.start(tokens, text_tower)
        parts = [model.decoder.step(state, ids[:, :5], text_tower)]
        parts += [model.decoder.step(state, ids[:, i : i + 1], text_tower) for i in range(5, 8)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_our_decoder_reads_a_cnn_feature_map_as_tokens():
    model = ours("cnn")
    assert model.decoder.config["image_tokens"] == 4  # resnet10t at 64 px: a 2 x 2 map
    assert model.decoder.config["image_dim"] == model.towers["image"].output_dim


def test_one_beam_is_greedy_and_a_tiny_nucleus_is_greedy():
    model = ours().eval()
    images = batch(model)["image"]
    greedy = model.generate(images, "greedy", max_len=12)
    assert model.generate(images, "beam", max_len=12, num_beams=1, length_penalty=0.0) == greedy
    assert model.generate(images, "top_p", max_len=12, top_p=1e-6) == greedy


def test_min_len_and_max_len_bound_the_caption():
    model = ours().eval()
    images = batch(model)["image"]
    for caption in model.generate(images, "greedy", max_len=6, min_len=3):
        assert 3 <= len(caption) <= 4  # 6 tokens: start, at most 4 words, end
    with pytest.raises(ValueError, match="context length"):
        model.generate(images, max_len=100)
    with pytest.raises(ValueError, match="unknown"):
        model.generate(images, "sample")


def test_a_model_without_decoder_says_how_to_get_one():
    model = build_model({"embed_dim": 32, "towers": ours().config()["towers"]})
    with pytest.raises(ValueError, match="loss=coca"):
        model.generate(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_the_model_config_rebuilds_the_decoder():
    model = ours()
    rebuilt = build_model(model.config())
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.decoder.config == model.decoder.config


def _open_clip_can_generate() -> bool:
    import open_clip.coca_model

    return bool(open_clip.coca_model._has_transformers)


@pytest.mark.skipif(
    not _open_clip_can_generate(),
    reason="open_clip's CoCa.generate needs `transformers` (a version open_clip can import); none here",
)
def test_greedy_equals_open_clip_generate_top_k_1():
    from open_clip.coca_model import CoCa as OpenClipCoCa

    model = open_clip_coca().eval()
    ref = OpenClipCoCa(COCA["embed_dim"], COCA["multimodal_cfg"], COCA["text_cfg"], COCA["vision_cfg"]).eval()
    ref.load_state_dict(to_open_clip_state_dict(model), strict=True)
    images = model.towers["image"].normalize_input(batch(model)["image"])
    theirs = ref.generate(images, generation_type="top_k", top_k=1, seq_len=12, min_seq_len=5)
    ours_ = model.generate(images, "greedy", max_len=12, min_len=4)
    for row, mine in zip(theirs.tolist(), ours_):
        ends = [i for i, t in enumerate(row) if i > 0 and t in (0, 49407)]
        assert row[0] == 49406 and row[1 : ends[0]] == mine


def test_hard_negatives_join_the_contrastive_term():
    """loss=coca with hard_negatives: the contrastive term is NegCLIP's, the caption term unchanged."""
    from mmpretrain.losses import negclip_loss

    model = ours()
    b = batch(model)
    tokenize = model.towers["text"].preprocess(False)
    negatives = torch.stack([tokenize("a green triangle"), tokenize("three red boxes")] * 4).view(4, 2, -1)
    b |= {"text_negatives": negatives, "text_negatives_mask": torch.ones(4, 2, dtype=torch.bool)}
    out = model(b)
    with_negatives = CoCa(hard_negatives=True)(out)
    expected = negclip_loss(
        out["image_features"],
        out["text_features"],
        out["text_negatives_features"],
        out["text_negatives_mask"],
        out["logit_scale"],
    )
    torch.testing.assert_close(with_negatives["contrastive_loss"], expected)
    torch.testing.assert_close(with_negatives["caption_loss"], CoCa()(out)["caption_loss"])
    with pytest.raises(ValueError, match="siglip has no options"):
        CoCa(contrastive="siglip", hard_negatives=True)


def test_pretrained_open_clip_coca_weights_load_the_decoder_too(tmp_path):
    """model=openclip model.config=<CoCa> model.pretrained=FILE: the towers, and the caption decoder, from
    the checkpoint (open_clip's layout)."""
    from safetensors.torch import save_file

    source = open_clip_coca()
    save_file(to_open_clip_state_dict(source), str(tmp_path / "coca.safetensors"))
    cfg = open_clip_model_config(copy.deepcopy(COCA)) | {
        "config": copy.deepcopy(COCA),
        "pretrained": str(tmp_path / "coca.safetensors"),
    }
    for tower in cfg["towers"].values():
        tower["pretrained"] = str(tmp_path / "coca.safetensors")
    torch.manual_seed(1)  # another random init: only the checkpoint can make them equal
    loaded = build_model(cfg)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, msg=k)


def test_a_video_tower_gives_its_frames_as_tokens_to_our_decoder():
    """A video-text model gets a decoder reading the per-frame features (T tokens); it trains and captions."""
    frame = {"_target_": "mmpretrain.towers.timm.TimmTower", "model_name": "resnet10t", "img_size": 32}
    video = {
        "_target_": "mmpretrain.towers.video.VideoTower",
        "frame": frame,
        "num_frames": 3,
        "pooling": "mean",
    }
    clip = {"embed_dim": 32, "text_cfg": TEXT}
    text = {"_target_": OC, "modality": "text", "config": clip}
    torch.manual_seed(0)
    model = build_model(
        {
            "embed_dim": 32,
            "towers": {"video": video, "text": text},
            "decoder": {"width": 32, "heads": 2, "layers": 1},
        }
    )
    assert model.decoder.source == "video" and model.decoder.config["image_tokens"] == 3
    tokenize = model.towers["text"].preprocess(False)
    clips = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)
    out = model({"video": clips, "text": torch.stack([tokenize(c) for c in CAPTIONS[:2]])})
    losses = CoCa()(out)
    assert torch.isfinite(losses["caption_loss"]) and out["video_features"].shape == (2, 32)
    model.eval()
    assert model.generate(clips, max_len=6) == model.generate(clips, max_len=6, use_cache=False)
