"""Evaluation on embeddings: pure functions, no Lightning, no Hydra."""

from mmpretrain.evaluation.retrieval import retrieval_metrics
from mmpretrain.evaluation.zeroshot import class_embeddings, zero_shot_accuracy

__all__ = ["class_embeddings", "zero_shot_accuracy", "retrieval_metrics"]
