"""``compile=true``: towers compiled in place give the same features and gradients, same keys."""

import pytest
import torch

from mmpretrain.losses import InfoNCE
from tests.integration.test_ddp_scale import global_batch, grads, make_model


@pytest.mark.slow  # inductor compiles C++ on the CPU: ~40-90 s on the 2 shared cores
def test_compiled_towers_match_eager_outputs_and_gradients():
    eager, compiled = make_model(), make_model()
    for tower in compiled.towers.values():
        tower.compile()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints/export unchanged
    out_e, out_c = eager(global_batch()), compiled(global_batch())
    for key in ("image_features", "text_features"):
        assert torch.allclose(out_c[key], out_e[key], atol=1e-6)
    sum(InfoNCE()(out_e).values()).backward()
    sum(InfoNCE()(out_c).values()).backward()
    want, got = grads(eager), grads(compiled)
    assert set(want) == set(got)
    for name, g in want.items():
        assert torch.allclose(got[name], g, atol=1e-6), name
