"""The non-finite gradient check of NonFiniteGuard: one fused reduction, same verdict as per tensor."""

import math

import pytest
import torch

from mmpretrain.training.callbacks import all_finite


def _grads() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(64, 32, generator=g),
        torch.randn(32, generator=g),
        torch.randn(3, 3, 8, 8, generator=g),
    ]


def test_all_finite_grads_pass():
    assert all_finite(_grads())
    assert all_finite([])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_one_non_finite_entry_anywhere_is_found(bad, which):
    grads = _grads()
    grads[which].view(-1)[5] = bad
    assert not all_finite(grads)
    assert all_finite([g for i, g in enumerate(grads) if i != which])


def test_mixed_dtypes():
    grads = [torch.randn(10, dtype=torch.float32), torch.randn(10, dtype=torch.bfloat16)]
    assert all_finite(grads)
    grads[1][3] = math.nan
    assert not all_finite(grads)
