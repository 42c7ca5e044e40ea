"""Distillation (``distill.*``): a frozen teacher's embeddings, the student's projection heads, the terms.

The teacher (:func:`load_teacher`: a checkpoint, an export, an open_clip ``NAME:TAG`` or ``hf-hub:`` id) is
held outside the module's children: never in a checkpoint, the optimiser or DDP's buckets, always in
eval mode, run without autograd on the batch the student sees (the images resized to the teacher's
size; the captions' token ids as they are, for a teacher with the student's tokenizer). Under
``distill.cached=true`` the batch brings the teacher's embeddings instead (``teacher_<m>_features``,
stored by ``mmpretrain data teacher-embeddings``) and no teacher is loaded.

Feature distillation projects each student embedding to the teacher's size through a learned linear
head (identity when the sizes agree), trained with the student and kept in the training checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.losses.distill import FEATURE_LOSSES, feature_distill_loss, logit_distill_loss
from mmpretrain.losses.pairs import logit_scale_for
from mmpretrain.model import ContrastiveModel

#: The batch keys (and output keys) of the teacher's embeddings and temperature.
TEACHER_PREFIX = "teacher_"


def load_teacher(spec: str) -> ContrastiveModel:
    """The teacher named by ``spec``: a training checkpoint (its EMA weights where it kept them), an
    export directory (mmpretrain or open_clip layout), ``hf-hub:ORG/REPO`` (an open_clip model on the
    hub) or an open_clip registry ``NAME:TAG`` (``ViT-B-32:laion2b_s34b_b79k``), in eval mode, frozen."""
    import open_clip

    from mmpretrain.export import model_from_checkpoint
    from mmpretrain.interop.open_clip import open_clip_model_config
    from mmpretrain.model import build_model
    from mmpretrain.pretrained import check_available, is_hub_id

    spec = str(spec)
    if Path(spec).exists():
        teacher = model_from_checkpoint(spec, weights="ema")
    elif is_hub_id(spec):
        cfg = open_clip_model_config(spec)
        check_available(cfg)
        teacher = build_model(cfg)
    elif open_clip.get_model_config(spec.split(":")[0]) is not None:
        name, _, tag = spec.partition(":")
        cfg = open_clip_model_config(name) | {"config": name, "pretrained": tag or None}
        for tower in cfg["towers"].values():
            tower["pretrained"] = tag or None
        check_available(cfg)
        teacher = build_model(cfg)
    else:
        raise FileNotFoundError(
            f"distill.teacher={spec}: no such checkpoint or export, and not an open_clip NAME:TAG or an "
            "hf-hub:ORG/REPO id"
        )
    teacher.eval().requires_grad_(False)
    return teacher


def image_size(tower: nn.Module) -> tuple[int, int] | None:
    """The (height, width) an image tower's evaluation preprocessing gives, or None when unknown."""
    from mmpretrain.interop.open_clip import preprocess_cfg

    if hasattr(tower, "data_config"):  # timm
        return tuple(int(s) for s in tower.data_config["input_size"][-2:])
    if hasattr(tower, "model_cfg"):  # open_clip
        size = preprocess_cfg(tower.model_cfg)["size"]
        return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    return None


def _tokenizer_key(tower: nn.Module) -> tuple | None:
    cfg = getattr(tower, "model_cfg", None)
    if cfg is None:
        return None
    text = cfg["text_cfg"]
    return (text.get("hf_tokenizer_name") or "open_clip-bpe", int(text.get("vocab_size", 49408)))


class Distillation(nn.Module):
    """The distillation terms of a student (``distill.*``): ``distill_logit_loss`` (weight
    ``logit_weight``) and ``distill_feature_loss`` (``feature_weight``, ``feature_loss`` cosine | mse).

    ``teacher``: a frozen model (online) or None (cached: the batch carries ``teacher_*`` entries).
    ``student_dims``/``teacher_dims``: the embedding size of each modality (for the heads).
    """

    def __init__(
        self,
        teacher: ContrastiveModel | None,
        student_dims: dict[str, int],
        teacher_dims: dict[str, int],
        logit_weight: float = 1.0,
        feature_weight: float = 0.0,
        feature_loss: str = "cosine",
    ):
        super().__init__()
        if feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"distill.feature_loss must be one of {FEATURE_LOSSES}, got '{feature_loss}'")
        if logit_weight < 0 or feature_weight < 0 or logit_weight + feature_weight == 0:
            raise ValueError("distill.logit_weight and distill.feature_weight are >= 0, one of them > 0")
        shared = [m for m in student_dims if m in teacher_dims]
        if logit_weight and not {"image", "text"} <= set(shared):
            raise ValueError(
                f"distill.logit_weight>0 needs image and text towers in student and teacher; "
                f"the student has {sorted(student_dims)}, the teacher {sorted(teacher_dims)}"
            )
        self.logit_weight, self.feature_weight, self.feature_loss = logit_weight, feature_weight, feature_loss
        self.modalities = shared
        self.heads = nn.ModuleDict(
            {
                m: nn.Identity()
                if student_dims[m] == teacher_dims[m]
                else nn.Linear(student_dims[m], teacher_dims[m])
                for m in (shared if feature_weight else [])
            }
        )
        self._teacher = (teacher,)  # a tuple: not a child module (no checkpoint, optimiser, DDP or .train())

    @property
    def teacher(self) -> ContrastiveModel | None:
        return self._teacher[0]

    def setup(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        """Move the teacher to ``device`` (and ``dtype``: a ``*-true`` precision's)."""
        if self.teacher is not None:
            self.teacher.to(device=device, dtype=dtype).eval()

    def check_student(self, student: ContrastiveModel) -> None:
        """Refuse a teacher that cannot read the student's batches (another tokenizer)."""
        if self.teacher is None or "text" not in self.modalities:
            return
        mine, theirs = _tokenizer_key(student.towers["text"]), _tokenizer_key(self.teacher.towers["text"])
        if mine != theirs:
            raise ValueError(
                f"the teacher's text tokenizer {theirs} differs from the student's {mine}: online "
                "distillation feeds both the same token ids; use a teacher with the student's tokenizer"
            )

    @torch.no_grad()
    def teacher_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``teacher_<m>_features`` (L2-normalised) and ``teacher_logit_scale`` of the batch: read from it
        (cached) or computed by the teacher on the same images at its size."""
        if self.teacher is None:
            out = {k: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}
            missing = [m for m in self.modalities if f"{TEACHER_PREFIX}{m}_features" not in out]
            if missing:
                raise ValueError(
                    f"distill.cached=true but the batch has no teacher embeddings for {missing}: train on "
                    "shards written by `mmpretrain data teacher-embeddings`"
                )
            return out
        teacher = self.teacher
        out = {}
        for m in self.modalities:
            x = batch[m]
            if m == "image" and x.ndim == 4:
                x = _resize(x, image_size(teacher.towers[m]))
            elif m == "text":
                x = x[..., : _context_length(teacher.towers[m], x.shape[-1])]
            out[f"{TEACHER_PREFIX}{m}_features"] = teacher.encode(m, x)
        scales = teacher.logit_scale_outputs()
        out[f"{TEACHER_PREFIX}logit_scale"] = logit_scale_for(scales, "image", "text")
        return out

    def student(self, model: ContrastiveModel) -> nn.Module:
        """``model`` with the heads' outputs ``distill_<m>_features`` added (what the terms read)."""
        return _Student(model, self.heads)

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted terms, from the student's outputs merged with :meth:`teacher_outputs`."""
        terms = {}
        t = TEACHER_PREFIX
        if self.logit_weight:
            terms["distill_logit_loss"] = self.logit_weight * logit_distill_loss(
                outputs["image_features"],
                outputs["text_features"],
                logit_scale_for(outputs, "image", "text"),
                outputs[f"{t}image_features"].to(outputs["image_features"].dtype),
                outputs[f"{t}text_features"].to(outputs["text_features"].dtype),
                outputs[f"{t}logit_scale"].reshape(-1)[0],  # cached: one per row, all equal
            )
        if self.feature_weight:
            per = [
                feature_distill_loss(
                    outputs[f"distill_{m}_features"], outputs[f"{t}{m}_features"], self.feature_loss
                )
                for m in self.heads
            ]
            terms["distill_feature_loss"] = self.feature_weight * sum(per) / len(per)
        return terms


class _Student(nn.Module):
    def __init__(self, model: ContrastiveModel, heads: nn.ModuleDict):
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.model(batch)
        for m, head in self.heads.items():
            x = out[f"{m}_features"]
            weight = next(head.parameters(), None)  # FSDP's mixed precision: bf16 features, fp32 head
            out[f"distill_{m}_features"] = head(x if weight is None else x.to(weight.dtype))
        return out


def _resize(images: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """uint8 (or normalised float) images at ``size`` (antialiased bicubic), unchanged when equal."""
    if size is None or tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else out


def _context_length(tower: nn.Module, n: int) -> int:
    mask = getattr(getattr(tower, "encoder", None), "attn_mask", None)
    return min(n, mask.shape[0]) if mask is not None else n


def embedding_dims(model: ContrastiveModel) -> dict[str, int]:
    return {m: int(model.embed_dim) for m in model.modalities}


def build_distillation(cfg: Any, student: ContrastiveModel) -> Distillation | None:
    """The ``distill`` config's :class:`Distillation` for ``student``, or None without ``distill.teacher``."""
    if not cfg or not cfg.get("teacher"):
        if cfg and cfg.get("cached"):
            raise ValueError(
                "distill.cached=true needs distill.teacher (the teacher the embeddings came from)"
            )
        return None
    known = {"teacher", "cached", "logit_weight", "feature_weight", "feature_loss"}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"distill has unknown keys {sorted(unknown)}; use {sorted(known)}")
    teacher = load_teacher(cfg["teacher"])
    distill = Distillation(
        None if cfg.get("cached") else teacher,
        embedding_dims(student),
        embedding_dims(teacher),
        float(cfg.get("logit_weight", 1.0)),
        float(cfg.get("feature_weight", 0.0)),
        str(cfg.get("feature_loss", "cosine")),
    )
    distill.check_student(student)
    return distill
