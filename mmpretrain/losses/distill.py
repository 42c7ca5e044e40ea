"""Distillation from a frozen teacher: the student's and the teacher's outputs in, ``*_loss`` terms out.

- :func:`logit_distill_loss` (open_clip's ``DistillClipLoss``): the soft cross-entropy from the
  teacher's image-text similarity matrix to the student's, in both directions, each model at its own
  temperature; under DDP this rank's rows against the global batch, as :func:`clip_loss` does.
- :func:`feature_distill_loss` (encoder distillation, CLIP-KD): cosine distance or mean squared error
  between the student's (projected) embeddings and the teacher's.

May import ``runtime.distributed`` only: no Lightning, no Hydra.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmpretrain.runtime import distributed

FEATURE_LOSSES = ("cosine", "mse")


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_j softmax(teacher)_j * log_softmax(student)_j``."""
    target = teacher_logits.float().softmax(dim=-1)
    return -(target * student_logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


def logit_distill_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    teacher_a: torch.Tensor,
    teacher_b: torch.Tensor,
    teacher_logit_scale: torch.Tensor,
    gather: bool = True,
) -> torch.Tensor:
    """Soft cross-entropy from the teacher's logits to the student's, ``a -> b`` and ``b -> a`` averaged.

    ``a``/``b``: this rank's L2-normalised student features ``[B, D]``; ``teacher_a``/``teacher_b`` the
    teacher's ``[B, D_t]`` for the same rows (no gradient). Under DDP the columns are the global batch
    (student features gathered with gradient, the teacher's without); the mean over local rows,
    averaged over ranks by DDP, is the mean over the global batch.
    """
    if gather and distributed.world_size() > 1:
        all_a, all_b = distributed.gather_with_grad(a), distributed.gather_with_grad(b)
        all_ta, all_tb = distributed.all_gather(teacher_a), distributed.all_gather(teacher_b)
    else:
        all_a, all_b, all_ta, all_tb = a, b, teacher_a, teacher_b
    teacher_logit_scale = teacher_logit_scale.detach()
    ab = soft_cross_entropy(logit_scale * a @ all_b.T, teacher_logit_scale * teacher_a @ all_tb.T)
    ba = soft_cross_entropy(logit_scale * b @ all_a.T, teacher_logit_scale * teacher_b @ all_ta.T)
    return (ab + ba) / 2


def feature_distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """``cosine``: mean ``1 - cos(student, teacher)``; ``mse``: mean squared error of the L2-normalised
    embeddings (summed over dimensions, averaged over rows). ``student`` already has the teacher's size."""
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"distill.feature_loss must be one of {FEATURE_LOSSES}, got '{kind}'")
    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    if kind == "cosine":
        return (1 - (s * t).sum(dim=-1)).mean()
    return (s - t).pow(2).sum(dim=-1).mean()
