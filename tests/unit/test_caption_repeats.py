"""Repeated captions in a val set, as the retrieval plot and the end-of-run summary decide by them:
equal captions get equal keys whatever their padding, different ones different keys."""

import pytest
import torch

from mmpretrain.evaluation.retrieval import caption_keys, repeated_caption_fraction

PAD = 0


def tokens(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


def test_equal_captions_get_equal_keys_whatever_the_batch_padding():
    a = caption_keys(tokens([[49406, 320, 1125, 49407]], 6), PAD)
    b = caption_keys(tokens([[49406, 320, 1125, 49407], [49406, 320, 1125, 539, 2368, 49407]], 9), PAD)
    assert a[0] == b[0] and b[0] != b[1]
    # a padding id other than 0 (a Hugging Face tokenizer's) drops out the same way
    assert caption_keys(torch.tensor([[5, 6, 1, 1]]), 1)[0] == caption_keys(torch.tensor([[5, 6]]), 1)[0]


def test_permuted_or_shifted_captions_differ():
    keys = caption_keys(tokens([[1, 2, 3], [3, 2, 1], [2, 3], [1, 2, 3, 3]], 5), PAD)
    assert len(set(keys.tolist())) == 4


def test_repeated_fraction_counts_every_row_sharing_its_caption():
    keys = caption_keys(tokens([[7, 8], [7, 8], [9], [7, 8], [10]], 3), PAD)
    assert repeated_caption_fraction(keys) == pytest.approx(
        0.6
    )  # the three "7 8" rows; "9" and "10" are unique
    assert repeated_caption_fraction(keys[2:3]) == 0.0
    assert repeated_caption_fraction(torch.zeros(0, dtype=torch.long)) == 0.0
