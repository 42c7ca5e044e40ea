"""Multi-caption samples: one caption per sample per pass, a pure function of (seed, key, pass);
validation carries every caption, the negatives with their kinds and the task labels."""

import json

import pytest
import torch

from mmpretrain.data import ShardStream, Source
from mmpretrain.data.stream.captions import NEGATIVE_KINDS, pick_caption, pick_negatives
from mmpretrain.data.stream.decode import decode_captions
from tests.unit.test_data import png_bytes, write_shard

CAPTIONS = [f"caption number {i}" for i in range(8)]
TOKENIZE = {
    "image": lambda img: torch.tensor(next(iter(img.getdata())), dtype=torch.float32),
    "text": lambda t: torch.tensor([len(t), sum(map(ord, t))]),
}


def scene(i, n_caps=3, n_negs=2):
    meta = {
        "captions": [f"scene {i} caption {c}" for c in range(n_caps)],
        "negatives": [f"scene {i} negative {c}" for c in range(n_negs)],
        "negative_kinds": ["swap_att", "replace_obj", "made_up"][:n_negs],
        "labels": {"color": i % 3, "count": -1 if i % 2 else 2},
    }
    return {
        "__key__": f"k{i:03d}",
        "png": png_bytes(i),
        "txt": meta["captions"][0],
        "json": json.dumps(meta).encode(),
    }


def test_the_pick_is_a_pure_function_of_seed_key_and_pass():
    assert pick_caption(CAPTIONS, 0, "a", 3) == pick_caption(CAPTIONS, 0, "a", 3)
    by_pass = [pick_caption(CAPTIONS, 0, "a", p) for p in range(10)]
    assert len(set(by_pass)) > 1  # passes pick differently
    assert [pick_caption(CAPTIONS, 1, "a", p) for p in range(10)] != by_pass  # and seeds too
    assert [pick_caption(CAPTIONS, 0, "b", p) for p in range(10)] != by_pass  # and keys
    import random

    random.seed(123)
    again = [pick_caption(CAPTIONS, 0, "a", p) for p in range(10)]
    assert again == by_pass  # no global RNG involved
    picked = pick_negatives(CAPTIONS, 2, 0, "a", 0)
    assert len(set(picked)) == 2 and picked == pick_negatives(CAPTIONS, 2, 0, "a", 0)
    assert pick_negatives(CAPTIONS[:1], 2, 0, "a", 0) == CAPTIONS[:1]


def test_caption_sources():
    meta = json.dumps({"captions": ["x", "y"], "caption": "z"}).encode()
    sample = {"txt": b"t", "txt2": b"u", "json": meta}
    assert decode_captions(sample) == ["t"]  # default: txt first, as before
    assert decode_captions(sample, ["json"], "captions") == ["x", "y"]
    assert decode_captions(sample, ["json"], "caption") == ["z"]
    assert decode_captions(sample, ["txt", "txt2"]) == ["t", "u"]
    assert decode_captions({"json": meta}, None, "captions") == ["x", "y"]


def _stream(urls, train, **kw):
    return ShardStream(
        [Source("s", urls)],
        TOKENIZE,
        batch_size=4,
        train=train,
        batches_per_worker=8,
        shuffle_buffer=1,
        caption_keys=["json"],
        caption_field="captions",
        **kw,
    )


def test_training_picks_one_caption_per_pass_and_resume_sees_the_same(tmp_path):
    urls = [write_shard(tmp_path / "a.tar", [scene(i) for i in range(8)])]
    full = list(iter(_stream(urls, True)))  # 4 passes of 2 batches
    batches = [b["text"] for b in full]
    picked = [sorted(map(tuple, torch.cat(batches[2 * p : 2 * p + 2]).tolist())) for p in range(4)]
    assert len({tuple(p) for p in picked}) > 1  # another pass, other captions
    # an exact resume after batch 3 (from its saved position) yields the same batches 4..7
    resumed = _stream(urls, True, start_batch=4, positions={0: full[3]["__position__"]})
    assert [b["text"].tolist() for b in resumed] == [b.tolist() for b in batches[4:]]


def test_training_negatives_are_padded_and_masked(tmp_path):
    samples = [scene(i, n_negs=2 if i % 2 else 0) for i in range(8)]
    urls = [write_shard(tmp_path / "a.tar", samples)]
    batch = next(iter(_stream(urls, True, negatives=2)))
    assert batch["text_negatives"].shape == (4, 2, 2)
    assert batch["text_negatives_mask"].shape == (4, 2)
    has = batch["text_negatives_mask"].all(1)
    assert (batch["text_negatives_mask"].any(1) == has).all()  # 0 or 2 negatives per sample


def test_validation_carries_every_caption_negative_and_label(tmp_path):
    samples = [scene(i, n_caps=1 + i % 3, n_negs=i % 3) for i in range(6)]
    urls = [write_shard(tmp_path / "v.tar", samples)]
    batches = list(iter(_stream(urls, False)))
    text_more = torch.cat([b["text_more"] for b in batches])
    assert len(text_more) == sum(i % 3 for i in range(6))
    owners = torch.cat([b["text_more_owner"] + 4 * j for j, b in enumerate(batches)])
    assert owners.tolist() == [i for i in range(6) for _ in range(i % 3)]
    kinds = torch.cat([b["probe_negatives_kind"] for b in batches]).tolist()
    assert kinds == [
        NEGATIVE_KINDS.index(k) for i in range(6) for k in ["swap_att", "replace_obj", "other"][: i % 3]
    ]
    assert torch.cat([b["label/color"] for b in batches]).tolist() == [i % 3 for i in range(6)]
    assert torch.cat([b["label/count"] for b in batches]).tolist() == [2, -1, 2, -1, 2, -1]


def test_several_captions_per_sample_are_distinct_padded_and_resume_exactly(tmp_path):
    """data.captions_per_sample=3: ``text`` and ``text_positives`` [B, 2] are distinct captions of
    the sample (a one-caption sample's extra columns masked), the same after an exact resume."""
    samples = [scene(i, n_caps=1 if i % 4 == 0 else 5) for i in range(8)]
    urls = [write_shard(tmp_path / "a.tar", samples)]
    full = list(iter(_stream(urls, True, captions_per_sample=3)))
    for b in full:
        assert b["text_positives"].shape == (4, 2, 2) and b["text_positives_mask"].shape == (4, 2)
        for row in range(4):
            mask = b["text_positives_mask"][row]
            assert mask.all() or not mask.any()
            rows = [b["text"][row], *b["text_positives"][row][mask]]
            assert len({tuple(t.tolist()) for t in rows}) == len(rows)  # distinct captions
    assert any(not b["text_positives_mask"].all() for b in full)  # the one-caption samples
    resumed = _stream(
        urls, True, captions_per_sample=3, start_batch=4, positions={0: full[3]["__position__"]}
    )
    for got, want in zip(resumed, full[4:]):
        assert torch.equal(got["text"], want["text"]) and torch.equal(
            got["text_positives"], want["text_positives"]
        )
    with pytest.raises(ValueError, match="captions_per_sample"):
        _stream(urls, True, captions_per_sample=0)
