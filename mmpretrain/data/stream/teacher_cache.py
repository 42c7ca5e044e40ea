"""A teacher's embeddings stored with the samples (``mmpretrain data teacher-embeddings``; MobileCLIP's
"reinforced" data): one ``teacher.npz`` member per sample holding

- ``image`` ``[K, D]``: the teacher's embedding of each of the sample's K stored augmentations,
- ``text`` ``[C, D]``: of each of its captions, in the order the sample lists them,
- ``logit_scale``: the teacher's temperature (exp of log s).

Under ``distill.cached=true`` a training stream augments a sample in pass ``p`` with augmentation
``p mod K``, seeded by the sample's key alone (:func:`augmentation_seed`: the same crop in the builder and in
every run, whatever ``seed``), so the stored embedding is the one of the crop the student sees.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from mmpretrain.data.stream.seeds import derive, key_hash

MEMBER = "teacher.npz"


def augmentation_seed(key: str | None, augmentation: int) -> int:
    """The seed of stored augmentation ``augmentation`` of the sample ``key``."""
    return derive(0, "teacher_augment", key_hash(key), augmentation)


def encode(image: np.ndarray, text: np.ndarray, logit_scale: float) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        image=image.astype(np.float32),
        text=text.astype(np.float32),
        logit_scale=np.float32(logit_scale),
    )
    return buf.getvalue()


def decode(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in ("image", "text", "logit_scale")}


def sample_features(cache: dict[str, np.ndarray], augmentation: int, caption: int) -> dict[str, torch.Tensor]:
    """The batch entries of one sample: ``teacher_image_features``, ``teacher_text_features`` and
    ``teacher_logit_scale``."""
    return {
        "teacher_image_features": torch.from_numpy(cache["image"][augmentation].copy()),
        "teacher_text_features": torch.from_numpy(cache["text"][caption].copy()),
        "teacher_logit_scale": torch.tensor(float(cache["logit_scale"])),
    }
