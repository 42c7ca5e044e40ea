"""TorchScript out: one traced ``encode_<modality>.pt`` per tower, loadable with ``torch.jit.load``."""

from __future__ import annotations

from pathlib import Path

import torch


class _Encoder(torch.nn.Module):
    def __init__(self, model, modality: str):
        super().__init__()
        self.tower, self.projection = model.towers[modality], model.projections[modality]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.projection(self.tower(x)), dim=-1)


def export_torchscript(model, out: str | Path) -> Path:
    """One traced ``encode_<modality>.pt`` per tower of a ContrastiveModel (normalised embeddings).

    Traced with an example of each tower's own preprocessing, so the shapes are fixed except batch,
    and so is the input dtype: the image encoder takes the uint8 pixels the preprocessing yields and
    normalises them inside (the tower's float path is not in the trace).
    """
    import numpy as np
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    prep = model.preprocess(train=False)
    examples = {
        "image": lambda: prep["image"](Image.new("RGB", (64, 64)))[None],
        "text": lambda: prep["text"]("a caption")[None],
        "video": lambda: prep["video"](np.zeros((2, 64, 64, 3), dtype=np.uint8))[None],
    }
    for m in model.modalities:
        if m not in examples:
            raise ValueError(f"format=torchscript supports image, text and video towers, not '{m}'")
        x = torch.cat([examples[m]()] * 2)
        with torch.no_grad():
            traced = torch.jit.trace(_Encoder(model, m), x, check_trace=False)
        traced.save(str(out / f"encode_{m}.pt"))
    return out
