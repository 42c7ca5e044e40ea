"""Evaluation on embeddings: retrieval (``retrieval``), zero-shot (``zeroshot``), the compositional
probe (``probe``) and VQA accuracy (``vqa``) as pure functions, the validation collector (``validate``)
that gathers a val set's embeddings across ranks and scores them, and captioning (``captioning``:
caption scores, the retrieval baseline, the captioning evaluation of a model).

May import ``losses``, ``model``, ``data`` (caption conventions, reading captioned shards; the scenes'
grammar words) and ``runtime.distributed``;
no Lightning, no Hydra.
"""

from mmpretrain.evaluation.probe import compositional_probe
from mmpretrain.evaluation.retrieval import (
    class_retrieval_metrics,
    multi_caption_retrieval,
    retrieval_metrics,
    rows_multi_caption_retrieval,
)
from mmpretrain.evaluation.zeroshot import class_embeddings, class_prototypes, zero_shot_accuracy

__all__ = [
    "class_embeddings",
    "class_prototypes",
    "class_retrieval_metrics",
    "compositional_probe",
    "multi_caption_retrieval",
    "retrieval_metrics",
    "rows_multi_caption_retrieval",
    "zero_shot_accuracy",
]
