"""Text inputs are trimmed to the batch's longest caption: exactly the full-length result, cheaper."""

import copy
import json

import pytest
import torch

from mmpretrain.data import ShardStream, Source
from mmpretrain.towers.open_clip import OpenClipTower, build_tokenizer
from tests.unit.test_data import png_bytes, write_shard

CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CAPTIONS = ["a 3", "the handwritten digit seven, drawn small!", "!", "zero"]


def _tokens(tower):
    """The captions' token ids, with a real token 0 ("!" in CLIP's vocabulary, also the padding id)
    inside the longest caption: a 0 before the end token must not be taken for padding."""
    tokens = build_tokenizer(tower.model_cfg)(CAPTIONS)
    tokens[1, 2] = 0
    return tokens, int(tokens.ne(0).cumsum(1).argmax(1).max()) + 1


def _tower(text_cfg=None):
    torch.manual_seed(0)
    cfg = copy.deepcopy(CFG)
    cfg["text_cfg"].update(text_cfg or {})
    return OpenClipTower("text", cfg)


def test_trimmed_text_gives_the_full_length_features_and_gradients():
    tower = _tower()
    tokens, n = _tokens(tower)
    short = tower.trim_input(tokens)
    assert short.shape[1] == n == 10 < tokens.shape[1]
    assert short[1, -1] == 49407 and short[1, 2] == 0

    grads = []
    for x in (tokens, short):
        tower.zero_grad()
        out = tower(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
        if x is tokens:
            full = out.detach()
    torch.testing.assert_close(out.detach(), full, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        scale = float(grads[0][name].abs().max())  # float rounding differs with the shape: relative
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_trim_keeps_leading_dims_and_at_least_one_column():
    tower = _tower()
    tokens, n = _tokens(tower)
    negatives = torch.stack([tokens, tokens.flip(0)])  # [B, M, L] as hard negatives come
    assert tower.trim_input(negatives).shape == (2, 4, n)
    assert tower.trim_input(torch.zeros(3, 24, dtype=torch.long)).shape == (3, 1)


@pytest.mark.parametrize("text_cfg", [{"no_causal_mask": True, "pool_type": "last"}, {"pool_type": "last"}])
def test_towers_that_can_see_padding_are_not_trimmed(text_cfg):
    tower = _tower(text_cfg)
    tokens, _ = _tokens(tower)
    assert tower.pad_id is None
    assert tower.trim_input(tokens) is tokens


def test_the_data_stream_trims_every_text_tensor_of_a_batch_in_its_workers(tmp_path):
    """Training captions and hard negatives, val captions, further captions and probe negatives: each
    cut to its own longest row by the text tower's preprocess, in the worker (no host read in the
    training process), and the model's features from them are those of the full-length captions."""
    text = _tower()
    preprocess = {"image": lambda img: torch.zeros(3, 4, 4, dtype=torch.uint8), "text": text.preprocess(True)}
    tokenize = build_tokenizer(text.model_cfg)
    second = "a much longer second caption of this sample, with many more words"
    samples = []
    for i, caption in enumerate(CAPTIONS * 2):
        meta = {
            "captions": [caption, second],
            "negatives": ["a short negative"],
            "negative_kinds": ["swap_att"],
        }
        samples.append(
            {"__key__": f"k{i}", "png": png_bytes(i), "txt": caption, "json": json.dumps(meta).encode()}
        )
    urls = [write_shard(tmp_path / "a.tar", samples)]
    common = dict(batch_size=4, shuffle_buffer=1, caption_keys=["json"], caption_field="captions")
    train = next(
        iter(
            ShardStream(
                [Source("s", urls)], preprocess, train=True, batches_per_worker=2, negatives=1, **common
            )
        )
    )
    val = next(iter(ShardStream([Source("s", urls)], preprocess, train=False, **common)))
    longest = lambda captions: int(tokenize(captions).ne(0).sum(1).max())  # noqa: E731
    assert val["text"].shape == (4, longest(CAPTIONS))
    assert val["text_more"].shape[-1] == longest([second])
    assert val["probe_negatives"].shape[-1] == longest(["a short negative"])
    assert train["text"].shape[-1] < 24 and train["text_negatives"].shape[-1] < 24
    text.eval()
    with torch.no_grad():
        full = tokenize(CAPTIONS)
        torch.testing.assert_close(text(val["text"]), text(full), atol=1e-5, rtol=1e-5)
